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

if TYPE_CHECKING:
    from .host import Host

POISON = 0x6B6B6B6B6B6B6B6B   # slab's POISON_FREE byte, repeated
FREE, ALLOCATED = 0, 1
#: ``live_gen`` of a page that is not allocated: no reference carries it (generations
#: count allocations from 1 and never get near 2^32 - 1)
NOT_LIVE = np.uint32(0xFFFFFFFF)


class PageAllocator(Resource):
    """As a Resource it stands for the allocation counters: fast-mode bulks that allocate
    declare it, and every free settles them first, so ``peak`` (the live count just before
    a free) is what ``exact`` mode would see.  Allocations commute and do not settle."""

    def __init__(self, host: "Host", total_pages: int | None = None):
        super().__init__()
        self.host = host
        self.total = total_pages          # None: unbounded
        cap = 1 << 16
        self.state = np.zeros(cap, dtype=np.uint8)
        self.gen = np.zeros(cap, dtype=np.uint32)
        #: gen where the page is allocated, NOT_LIVE elsewhere: a reference (pfn, gen) is
        #: live iff live_gen[pfn] == gen (one lookup for the many checks of fast paths)
        self.live_gen = np.full(cap, NOT_LIVE, dtype=np.uint32)
        self.refs = np.zeros(cap, dtype=np.uint32)   # mappings of a shared page (KSM, anon)
        self.owner: list[str | None] = [None] * cap
        self.contents: dict[int, np.ndarray] = {}
        self._free: list[int] = []
        self._next = 1                    # PFN 0 is never handed out
        self.allocated = 0
        self.peak = 0
        self.allocs = 0
        self.frees = 0

    def _grow(self, need: int) -> None:
        cap = len(self.state)
        if need < cap:
            return
        new = max(cap * 2, need + 1)
        self.state = np.concatenate([self.state, np.zeros(new - cap, dtype=np.uint8)])
        self.gen = np.concatenate([self.gen, np.zeros(new - cap, dtype=np.uint32)])
        self.live_gen = np.concatenate([self.live_gen,
                                        np.full(new - cap, NOT_LIVE, dtype=np.uint32)])
        self.refs = np.concatenate([self.refs, np.zeros(new - cap, dtype=np.uint32)])
        self.owner.extend([None] * (new - cap))

    def alloc(self, owner: str = "", content: np.ndarray | None = None) -> int:
        """Allocate one page; ``content`` is an optional buffer to poison on free."""
        if self._free:
            pfn = self._free.pop()
        else:
            if self.total is not None and self.allocated >= self.total:
                raise MemoryError("host out of memory")
            pfn = self._next
            self._next += 1
            self._grow(pfn)
        self.state[pfn] = ALLOCATED
        self.gen[pfn] += 1
        self.live_gen[pfn] = self.gen[pfn]
        self.refs[pfn] = 1
        self.owner[pfn] = owner
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
        if self.state[pfn] != ALLOCATED:
            self.host.report("double_free", who, pfn=pfn, owner=self.owner[pfn])
            return
        self.state[pfn] = FREE
        self.live_gen[pfn] = NOT_LIVE
        buf = self.contents.pop(pfn, None)
        if buf is not None:
            buf.fill(POISON)
        self._free.append(pfn)
        self.allocated -= 1
        self.frees += 1

    def alloc_block(self, n: int, owner: str = "") -> np.ndarray:
        """Allocate n fresh physically contiguous pages aligned to n (a huge page)."""
        if self.total is not None and self.allocated + n > self.total:
            raise MemoryError("host out of memory")
        start = -(-self._next // n) * n
        out = np.arange(start, start + n, dtype=np.int64)
        self._next = start + n
        self._grow(self._next)
        return self._mark_allocated(out, owner)

    def alloc_many(self, n: int, owner: str = "") -> np.ndarray:
        """Allocate n pages at once (free list first, most recent first)."""
        if self.total is not None and self.allocated + n > self.total:
            raise MemoryError("host out of memory")
        take = min(n, len(self._free))
        out = np.empty(n, dtype=np.int64)
        if take:
            out[:take] = self._free[:-take - 1:-1]
            del self._free[-take:]
        fresh = n - take
        if fresh:
            out[take:] = np.arange(self._next, self._next + fresh, dtype=np.int64)
            self._next += fresh
            self._grow(self._next)
        return self._mark_allocated(out, owner)

    def _mark_allocated(self, out: np.ndarray, owner: str) -> np.ndarray:
        """Bookkeeping shared by the bulk allocators."""
        self.state[out] = ALLOCATED
        self.gen[out] += 1
        self.live_gen[out] = self.gen[out]
        self.refs[out] = 1
        for p in out.tolist():
            self.owner[p] = owner
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
        live = self.state[uniq] == ALLOCATED
        # a free page, or a page named twice in the batch, is a double free
        for p, n, ok in zip(uniq.tolist(), counts.tolist(), live.tolist()):
            for _ in range(n - 1 if ok else n):
                self.host.report("double_free", who, pfn=p, owner=self.owner[p])
        good = uniq[live][np.argsort(first[live], kind="stable")]  # keep the caller's order
        self.state[good] = FREE
        self.live_gen[good] = NOT_LIVE
        for p in good.tolist():
            buf = self.contents.pop(p, None)
            if buf is not None:
                buf.fill(POISON)
        self._free.extend(good.tolist())
        self.allocated -= len(good)
        self.frees += len(good)

    # ---- shared pages (mapped more than once) ------------------------------------------

    def get(self, pfn: int) -> None:
        """Take one more reference (another mapping of a shared page)."""
        self.refs[pfn] += 1

    def put_many(self, pfns: np.ndarray, who=None) -> None:
        """Drop one reference per entry; pages whose last reference goes are freed."""
        pfns = np.asarray(pfns, dtype=np.int64)
        if not len(pfns):
            return
        uniq, counts = np.unique(pfns, return_counts=True)
        dead = self.state[uniq] != ALLOCATED
        if dead.any():
            self.free_many(uniq[dead], who)        # reports the double free
        uniq, counts = uniq[~dead], counts[~dead]
        refs = self.refs[uniq].astype(np.int64) - counts
        if (refs < 0).any():
            for p in uniq[refs < 0].tolist():
                self.host.report("double_free", who, pfn=p, owner=self.owner[p])
        self.refs[uniq] = np.maximum(refs, 0).astype(np.uint32)
        gone = uniq[refs <= 0]
        if len(gone):
            self.free_many(gone, who)

    # ---- checks ------------------------------------------------------------------------

    def is_live(self, pfn: int, gen: int) -> bool:
        if not 0 < pfn < len(self.state):
            return False            # a garbage PFN (e.g. read from a poisoned table)
        return bool(self.live_gen[pfn] == gen)

    def live_mask(self, pfns: np.ndarray, gens: np.ndarray) -> np.ndarray:
        """``is_live`` for many references at once (PFNs >= 0; garbage ones are not live)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        try:        # PFN 0 is never allocated; a PFN past the end raises
            return self.live_gen[pfns] == gens
        except IndexError:
            ok = pfns < len(self.state)
            live = np.zeros(len(pfns), dtype=bool)
            live[ok] = self.live_gen[pfns[ok]] == np.broadcast_to(gens, pfns.shape)[ok]
            return live

    def check(self, pfn: int, gen: int, who=None, what: str = "access") -> bool:
        """Validate a reference ``(pfn, gen)``; report a use after free if it is stale."""
        if self.is_live(pfn, gen):
            return True
        reused = 0 < pfn < len(self.state) and bool(self.state[pfn] == ALLOCATED)
        self.host.report("use_after_free", who, pfn=pfn, what=what, reused=reused,
                         now_owner=self.owner[pfn] if reused else None)
        return False

    def write_back(self, pfn: int, gen: int, who=None, what: str = "dirty") -> bool:
        """A/D write-back to a page's ``struct page`` (kvm_set_pfn_dirty/accessed)."""
        return self.check(pfn, gen, who, what=f"{what} write-back")
