"""Host physical memory: a 4 KiB page allocator with free-list reuse and poisoning.

* Pages are numbered by PFN.  A freed page goes on a LIFO free list (like the per-CPU page
  lists: the most recently freed page is handed out first), so a use after free quickly
  lands on a page that belongs to someone else, as it would in the kernel.
* Every allocation bumps the page's generation.  A holder keeps ``(pfn, gen)``; ``check``
  tells whether that reference is still the live allocation.
* Freeing poisons the page: its content buffer (if any, e.g. a page table's 512 SPTEs) is
  filled with ``POISON`` so a walker that reads it sees garbage, and the page's state says
  FREE so ``check`` and ``write_back`` detect the access.  Double free is reported.
* Bulk variants work on NumPy arrays of PFNs for the MMU's fast paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..sim.engine import Resource
from ..sim.runs import FreeStack, RunMap

if TYPE_CHECKING:
    from .host import Host

POISON = 0x6B6B6B6B6B6B6B6B   # slab's POISON_FREE byte, repeated
FREE, ALLOCATED = 0, 1


class PageAllocator(Resource):
    """As a Resource it stands for the allocation counters: fast-mode bulks that allocate
    declare it, and every free settles them first, so ``peak`` (the live count just before
    a free) is what ``exact`` mode would see.  Allocations commute and do not settle.

    Per-page state is kept by runs (sim/runs.py), so it costs per run of pages allocated
    or freed together, not per page: ``_pages`` maps a PFN to ``2 * gen + allocated`` with
    the tag ``(refs, owner)``, and the free list is a ``FreeStack``."""

    def __init__(self, host: "Host", total_pages: int | None = None):
        super().__init__()
        self.host = host
        self.total = total_pages          # None: unbounded
        #: pfn -> 2 * generation + (1 if allocated), tag (mappings of the page, owner)
        self._pages = RunMap(0, (0, None), affine=False)
        self.contents: dict[int, np.ndarray] = {}
        self._free = FreeStack()
        self._next = 1                    # PFN 0 is never handed out
        self.allocated = 0
        self.peak = 0
        self.allocs = 0
        self.frees = 0

    # ---- per-page state ------------------------------------------------------------------

    def gen_of(self, pfn: int) -> int:
        """The page's generation: how many times it has been allocated."""
        return self._pages.value(pfn) >> 1

    def gens_of(self, pfns: np.ndarray) -> np.ndarray:
        return (self._pages.values(pfns) >> 1).astype(np.uint32)

    def state_of(self, pfn: int) -> int:
        """ALLOCATED or FREE."""
        return self._pages.value(pfn) & 1

    def states_of(self, pfns: np.ndarray) -> np.ndarray:
        return self._pages.values(pfns) & 1

    def owner_of(self, pfn: int) -> str | None:
        """Who allocated the page last (kept after it is freed)."""
        return self._pages.get(pfn)[1][1]

    # ---- allocation ----------------------------------------------------------------------

    def alloc(self, owner: str = "", content: np.ndarray | None = None) -> int:
        """Allocate one page; ``content`` is an optional buffer to poison on free."""
        if self._free.n:
            pfn = self._free.pop()
        else:
            if self.total is not None and self.allocated >= self.total:
                raise MemoryError("host out of memory")
            pfn = self._next
            self._next += 1
        v = self._pages.value(pfn)
        self._pages.assign(pfn, pfn + 1, (v & ~1) + 3, 0, (1, owner))   # gen + 1, allocated
        if content is not None:
            self.contents[pfn] = content
        self.allocated += 1
        self.allocs += 1
        if self.allocated > self.peak:
            self.peak = self.allocated
        return pfn

    def free(self, pfn: int, who=None) -> None:
        eng = self.host.engine
        if self.bulks:
            eng.settle(self)
        if eng.check_settle:
            eng.assert_settled(self, None, None, False)
        v, tag = self._pages.get(pfn)
        if not v & 1:
            self.host.report("double_free", who, pfn=pfn, owner=tag[1])
            return
        self._pages.assign(pfn, pfn + 1, v - 1, 0, tag)
        if self.contents:
            buf = self.contents.pop(pfn, None)
            if buf is not None:
                buf.fill(POISON)
        self._free.push(pfn)
        self.allocated -= 1
        self.frees += 1

    def alloc_block(self, n: int, owner: str = "") -> np.ndarray:
        """Allocate n fresh physically contiguous pages aligned to n (a huge page)."""
        if self.total is not None and self.allocated + n > self.total:
            raise MemoryError("host out of memory")
        start = -(-self._next // n) * n
        out = np.arange(start, start + n, dtype=np.int64)
        self._next = start + n
        return self._mark_allocated(out, owner)

    def alloc_many(self, n: int, owner: str = "") -> np.ndarray:
        """Allocate n pages at once (free list first, most recent first)."""
        if self.total is not None and self.allocated + n > self.total:
            raise MemoryError("host out of memory")
        take = min(n, self._free.n)
        out = np.empty(n, dtype=np.int64)
        if take:
            out[:take] = self._free.pop_many(take)
        fresh = n - take
        if fresh:
            out[take:] = np.arange(self._next, self._next + fresh, dtype=np.int64)
            self._next += fresh
        return self._mark_allocated(out, owner)

    def alloc_run(self, n: int, owner: str = "") -> int | None:
        """Allocate n fresh contiguous pages when the free list is empty (what alloc_many
        would hand out then), at a cost independent of n; returns the first PFN, or None
        if the free list has pages (use alloc_many)."""
        if self._free.n:
            return None
        if self.total is not None and self.allocated + n > self.total:
            raise MemoryError("host out of memory")
        first = self._take_fresh(n, owner)
        self.allocated += n
        self.allocs += n
        self.peak = max(self.peak, self.allocated)
        return first

    def alloc_runs(self, n: int, owner: str = "") -> list[tuple[int, int, int]] | None:
        """``alloc_many(n)`` at a cost per run rather than per page, when the pages it would
        hand out come in runs of one generation each: returns them as ``(first, step,
        count)`` (pages first, first + step, ..., step +-1), in order.  None (nothing
        allocated) when a run mixes generations."""
        if self.total is not None and self.allocated + n > self.total:
            raise MemoryError("host out of memory")
        runs = self._free.top_runs(n)
        vals = []
        for first, step, count in runs:
            lo = first if step > 0 else first - count + 1
            v = self._pages.constant_over(lo, lo + count - 1)
            if v is None:
                return None
            vals.append((lo, count, v))
        self._free.drop(sum(c for _, _, c in runs))
        for lo, count, v in vals:
            self._pages.assign(lo, lo + count, (v & ~1) + 3, 0, (1, owner))  # gen + 1
        fresh = n - sum(c for _, _, c in runs)
        if fresh:
            runs.append((self._take_fresh(fresh, owner), 1, fresh))
        self.allocated += n
        self.allocs += n
        self.peak = max(self.peak, self.allocated)
        return runs

    def _take_fresh(self, n: int, owner: str) -> int:
        """Mark n never-used pages from ``_next`` on allocated (generation 1); the first."""
        first = self._next
        self._next += n
        self._pages.assign(first, first + n, 3, 0, (1, owner))
        return first

    def _mark_allocated(self, out: np.ndarray, owner: str) -> np.ndarray:
        """Bookkeeping shared by the bulk allocators: each page's generation goes up."""
        v = self._pages.values(out)
        self._pages.assign_many(out, (v & ~1) + 3, (1, owner))        # gen + 1, allocated
        self.allocated += len(out)
        self.allocs += len(out)
        self.peak = max(self.peak, self.allocated)
        return out

    def free_many(self, pfns: np.ndarray, who=None) -> None:
        eng = self.host.engine
        if self.bulks:
            eng.settle(self)
        if eng.check_settle:
            eng.assert_settled(self, None, None, False)
        pfns = np.asarray(pfns, dtype=np.int64)
        uniq, first, counts = np.unique(pfns, return_index=True, return_counts=True)
        vals = self._pages.values(uniq)
        run = self._pages.runs_of(uniq)
        live = (vals & 1) == 1
        if not live.all() or (counts > 1).any():
            # a free page, or a page named twice in the batch, is a double free
            for p, n, ok, r in zip(uniq.tolist(), counts.tolist(), live.tolist(),
                                   run.tolist()):
                for _ in range(n - 1 if ok else n):
                    self.host.report("double_free", who, pfn=p,
                                     owner=self._pages.tag_at(r)[1])
        good_at = np.flatnonzero(live)
        # pages keep their tag: assign per run they came from
        for r in np.unique(run[good_at]).tolist():
            sel = good_at[run[good_at] == r]
            self._pages.assign_many(uniq[sel], vals[sel] - 1, self._pages.tag_at(r))
        good = uniq[good_at[np.argsort(first[good_at], kind="stable")]]  # the caller's order
        if self.contents:
            for p in good.tolist():
                buf = self.contents.pop(p, None)
                if buf is not None:
                    buf.fill(POISON)
        self._free.push_many(good)
        self.allocated -= len(good)
        self.frees += len(good)

    def free_run(self, first: int, n: int, who=None, step: int = 1) -> None:
        """Free pages first, first + step, ... (n of them, step +1 or -1), in that order
        (``free_many`` of them), at a cost per run of their state rather than per page."""
        lo = first if step > 0 else first - n + 1
        runs = list(self._pages.runs(lo, lo + n))
        if any(not v & 1 for _, _, v, _, _ in runs) or self.contents:
            self.free_many(first + step * np.arange(n, dtype=np.int64), who)
            return
        eng = self.host.engine
        if self.bulks:
            eng.settle(self)
        if eng.check_settle:
            eng.assert_settled(self, None, None, False)
        for a, b, v, _, tag in runs:
            self._pages.assign(a, b, v - 1, 0, tag)
        self._free.push_run(first, n, step)
        self.allocated -= n
        self.frees += n

    # ---- shared pages (mapped more than once) ------------------------------------------

    def get(self, pfn: int) -> None:
        """Take one more reference (another mapping of a shared page)."""
        v, (refs, owner) = self._pages.get(pfn)
        self._pages.assign(pfn, pfn + 1, v, 0, (refs + 1, owner))

    def put_many(self, pfns: np.ndarray, who=None) -> None:
        """Drop one reference per entry; pages whose last reference goes are freed."""
        pfns = np.asarray(pfns, dtype=np.int64)
        if not len(pfns):
            return
        uniq, counts = np.unique(pfns, return_counts=True)
        vals = self._pages.values(uniq)
        dead = (vals & 1) == 0
        if dead.any():
            self.free_many(uniq[dead], who)        # reports the double free
        gone = []
        for p, n in zip(uniq[~dead].tolist(), counts[~dead].tolist()):
            v, (refs, owner) = self._pages.get(p)
            if refs < n:
                self.host.report("double_free", who, pfn=p, owner=owner)
            self._pages.assign(p, p + 1, v, 0, (max(refs - n, 0), owner))
            if refs <= n:
                gone.append(p)
        if gone:
            self.free_many(np.array(gone, dtype=np.int64), who)

    # ---- checks ------------------------------------------------------------------------

    def is_live(self, pfn: int, gen: int) -> bool:
        """``(pfn, gen)`` is the page's current allocation (a garbage PFN, e.g. read from a
        poisoned table, is not live: PFN 0 and pages never handed out read as free)."""
        return pfn > 0 and self._pages.value(pfn) == 2 * gen + 1

    def live_mask(self, pfns: np.ndarray, gens: np.ndarray) -> np.ndarray:
        """``is_live`` for many references at once (PFNs >= 0)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        if len(pfns):
            # the usual case: the pages lie in one run (one table's leaves): one compare
            v = self._pages.constant_over(int(pfns.min()), int(pfns.max()))
            if v is not None:
                if not v & 1:
                    return np.zeros(len(pfns), dtype=bool)
                return np.broadcast_to(np.asarray(gens) == v >> 1, pfns.shape).copy()
        return self._pages.values(pfns) == 2 * np.asarray(gens, dtype=np.int64) + 1

    def first_dead(self, first: int, n: int, gen: int) -> int:
        """How many of the pages first, first + 1, ... (n at most) are live with
        generation ``gen`` before the first that is not (n if all are)."""
        want = 2 * gen + 1
        for lo, _hi, v, _, _ in self._pages.runs(first, first + n):
            if v != want:
                return lo - first
        return n

    def check(self, pfn: int, gen: int, who=None, what: str = "access") -> bool:
        """Validate a reference ``(pfn, gen)``; report a use after free if it is stale."""
        if self.is_live(pfn, gen):
            return True
        reused = pfn > 0 and self.state_of(pfn) == ALLOCATED
        self.host.report("use_after_free", who, pfn=pfn, what=what, reused=reused,
                         now_owner=self.owner_of(pfn) if reused else None)
        return False

    def write_back(self, pfn: int, gen: int, who=None, what: str = "dirty") -> bool:
        """A/D write-back to a page's ``struct page`` (kvm_set_pfn_dirty/accessed)."""
        return self.check(pfn, gen, who, what=f"{what} write-back")
