"""A process address space: memfd-backed shared mappings, anonymous memory, mmu_notifier.

Addresses (hva) are bytes; pages are 4 KiB.  Host-side events call the notifier hooks in
the order the kernel does (mm/mmap.c, mm/madvise.c, mm/ksm.c, mm/rmap.c):

* ``munmap``: invalidate_range_start, zap PTEs, invalidate_range_end, then drop the
  anonymous pages (tlb_finish_mmu frees after the range ends); memfd pages stay in the file.
  Anonymous pages are reference counted per mapping, so a KSM page shared by several
  mappings is freed when its last mapping goes.
* ``madvise(MADV_DONTNEED)``: the same bracket; anonymous pages are freed, memfd pages stay.
* ``ksm_merge`` (KSM-like): start, clear the PTE, ``change_pte`` with the new read-only PTE,
  install it, end; the old anonymous page is freed.
* ``age``: ``clear_flush_young`` (reclaim) or ``clear_young`` (idle tracking) per page, and
  ``test_young``.
* ``exit``: ``release`` on every subscriber, which is then unregistered; the mappings are torn
  down and the memfd closed.

``notifier_count`` is the number of invalidations in progress (between start and end), the
host-side counterpart of KVM's ``mmu_notifier_count``.  Hooks are generators taking the
calling thread, so a subscriber can block (KVM takes mmu_lock in them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generator

import numpy as np

from ..sim.engine import Resource
from ..sim.runs import RunMap

if TYPE_CHECKING:
    from .host import Host
    from .sched import Thread

PAGE = 4096
HPAGE_PAGES = 512
HPAGE = HPAGE_PAGES * PAGE
GPAGE_PAGES = 512 * 512
HVA_BASE = 0x7F00_0000_0000


#: pages a run-wide host operation hands the allocator at once (bounds its arrays)
CHUNK = 1 << 20


class MemFd:
    """A memfd: pages owned by the file, allocated on first touch (or ``prefault``).
    A hugetlb memfd holds 2 MiB pages: physically contiguous, aligned blocks of 512.

    Which host page backs each file page, and its generation, are run maps (sim/runs.py):
    a file pre-faulted in one go is a handful of runs whatever its size."""

    def __init__(self, host: "Host", npages: int, hugetlb: bool = False, name: str = "memfd",
                 huge_pages: int = HPAGE_PAGES):
        if npages < 1:
            raise ValueError("memfd needs at least one page")
        if huge_pages not in (HPAGE_PAGES, GPAGE_PAGES):
            raise ValueError("huge page size: 2 MiB (512 pages) or 1 GiB (262144 pages)")
        #: pages per huge page (512: 2 MiB, 262144: 1 GiB); 1 when not hugetlb
        self.huge_pages = huge_pages if hugetlb else 1
        if hugetlb and npages % huge_pages:
            raise ValueError("a hugetlb memfd is a whole number of huge pages")
        self.host = host
        self.name = name
        self.npages = npages
        self.hugetlb = hugetlb
        self._pfn = RunMap(-1)          # file page -> host PFN (-1: not allocated)
        self._gen = RunMap(0)           # file page -> generation of that host page
        self.closed = False

    def pfn_of(self, idx: int) -> int:
        """The host page backing file page ``idx`` (-1 if none yet)."""
        return self._pfn.value(idx)

    def pages(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host PFNs (-1: none) and generations of file pages ``idx``."""
        return self._pfn.values(idx), self._gen.values(idx).astype(np.uint32)

    def _set(self, lo: int, pfns: np.ndarray) -> None:
        """File pages [lo, lo + len(pfns)) are now backed by the freshly allocated ``pfns``."""
        keys = np.arange(lo, lo + len(pfns), dtype=np.int64)
        self._pfn.assign_many(keys, pfns)
        self._gen.assign_many(keys, self.host.memory.gens_of(pfns))

    def page(self, idx: int) -> tuple[int, int]:
        pfn = self._pfn.value(idx)
        if pfn < 0:
            mem = self.host.memory
            if self.hugetlb:      # the whole huge page, physically contiguous and aligned
                hp = self.huge_pages
                b = idx - idx % hp
                pfns = mem.alloc_block(hp, self.name)
                self._set(b, pfns[:min(hp, self.npages - b)])
            else:
                p = mem.alloc(self.name)
                self._pfn.assign(idx, idx + 1, p)
                self._gen.assign(idx, idx + 1, mem.gen_of(p))
            pfn = self._pfn.value(idx)
        return pfn, self._gen.value(idx)

    def prefault(self) -> None:
        missing = [(lo, hi) for lo, hi, v, _, _ in self._pfn.runs(0, self.npages) if v < 0]
        if self.hugetlb:            # whole huge pages (missing ranges are made of them)
            for lo, hi in missing:
                for idx in range(lo, hi, self.huge_pages):
                    self.page(idx)
            return
        # one allocation of every missing page, in file order (fresh pages as one run)
        mem = self.host.memory
        for lo, hi in missing:
            first = mem.alloc_run(hi - lo, self.name)
            if first is not None:
                self._pfn.assign(lo, hi, first, 1)
                self._gen.assign(lo, hi, 1)
                continue
            for a in range(lo, hi, CHUNK):
                self._set(a, mem.alloc_many(min(CHUNK, hi - a), self.name))

    def close(self) -> None:
        mem = self.host.memory
        for lo, hi, v, step, _ in list(self._pfn.runs(0, self.npages)):
            if v < 0:
                continue
            if step == 1:
                mem.free_run(v, hi - lo)
                continue
            for a in range(lo, hi, CHUNK):
                n = min(CHUNK, hi - a)
                mem.free_many(v + step * np.arange(a - lo, a - lo + n, dtype=np.int64))
        self._pfn.assign(0, self.npages, -1)
        self.closed = True


class Vma(Resource):
    """A mapping and its host PTEs.  As a Resource it stands for the PTEs and their accessed
    bits: a fast-mode bulk faulting through it declares it, and host operations that change
    PTEs or read and clear accessed bits settle it first (``Mm._settle``).  Faults and
    lookups do not: they commute with a bulk's reads of present PTEs and accessed-bit sets.

    The PTEs (PFN, -1 if none, and the generation of the page) and the accessed bits are
    run maps over the mapping's pages (sim/runs.py)."""

    __slots__ = ("start", "npages", "memfd", "pgoff", "_pte", "_gen", "_young", "writable")

    def __init__(self, start: int, npages: int, memfd: MemFd | None, pgoff: int, writable: bool):
        super().__init__()
        self.start = start
        self.npages = npages
        self.memfd = memfd          # None: anonymous private memory
        self.pgoff = pgoff
        self._pte = RunMap(-1)      # host PTE: pfn or -1
        self._gen = RunMap(0)
        self._young = RunMap(0, affine=False)
        self.writable = writable

    # ---- PTEs ----------------------------------------------------------------------------

    def pte_at(self, i: int) -> tuple[int, int]:
        """``(pfn, gen)`` of page ``i``'s PTE (pfn -1: none)."""
        return self._pte.value(i), self._gen.value(i)

    def ptes(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PFNs (-1: none) and generations of the PTEs of pages ``idx``."""
        return self._pte.values(idx), self._gen.values(idx).astype(np.uint32)

    def pte_run(self, i: int, n: int) -> tuple[int, int, int]:
        """``(pfn, gen, count)``: pages i, i + 1, ... (n at most, within the mapping) have
        present PTEs mapping pages pfn, pfn + 1, ..., all of generation gen, for ``count``
        pages (0 if page i has no PTE)."""
        n = min(n, self.npages - i)
        if n <= 0:
            return -1, 0, 0
        lo, hi, pfn, step, _ = next(self._pte.runs(i, i + n))
        if pfn < 0:
            return pfn, 0, 0
        if step != 1:
            hi = i + 1
        glo, ghi, gen, gstep, _ = next(self._gen.runs(i, hi))
        if gstep:
            ghi = i + 1
        return pfn, gen, min(hi, ghi) - i

    def set_pte(self, i: int, pfn: int, gen: int) -> None:
        self._pte.assign(i, i + 1, pfn)
        self._gen.assign(i, i + 1, gen)

    def map_file(self, i0: int, n: int) -> None:
        """PTEs [i0, i0 + n) map the memfd's pages (present ones; the rest stay none)."""
        src = self.pgoff + i0
        for m, dst in ((self.memfd._pfn, self._pte), (self.memfd._gen, self._gen)):
            for lo, hi, v, step, _ in list(m.runs(src, src + n)):
                dst.assign(lo - src + i0, hi - src + i0, v, step)

    def clear_ptes(self, i0: int, n: int, collect: bool) -> list[int]:
        """PTEs [i0, i0 + n) become none and not young; returns the PFNs they mapped if
        ``collect``."""
        pfns: list[int] = []
        for lo, hi, v, step, _ in list(self._pte.runs(i0, i0 + n)) if collect else ():
            if v >= 0:
                pfns += range(v, v + step * (hi - lo), step) if step else [v] * (hi - lo)
        self._pte.assign(i0, i0 + n, -1)
        self._young.assign(i0, i0 + n, 0)
        return pfns

    # ---- accessed bits -------------------------------------------------------------------

    def young_at(self, i: int) -> bool:
        return bool(self._young.value(i))

    def set_young(self, idx, young: bool = True) -> None:
        """The accessed bit of page ``idx`` (an index, or an array of them)."""
        if isinstance(idx, (int, np.integer)):
            self._young.assign(int(idx), int(idx) + 1, int(young))
        else:
            idx = np.asarray(idx, dtype=np.int64)
            self._young.assign_many(idx, np.full(len(idx), int(young), dtype=np.int64))

    def set_young_range(self, i0: int, n: int, young: bool = True) -> None:
        self._young.assign(i0, i0 + n, int(young))

    def young_ranges(self) -> list[tuple[int, int]]:
        """The young pages, as [lo, hi) ranges."""
        return [(lo, hi) for lo, hi, v, _, _ in self._young.runs(0, self.npages) if v]

    def copy_from(self, other: "Vma", s: int) -> None:
        """Take ``other``'s state for pages [s, s + npages) (a part split out of it)."""
        for src, dst in ((other._pte, self._pte), (other._gen, self._gen),
                         (other._young, self._young)):
            for lo, hi, v, step, _ in list(src.runs(s, s + self.npages)):
                dst.assign(lo - s, hi - s, v, step)

    @property
    def end(self) -> int:
        return self.start + self.npages * PAGE


@dataclass(frozen=True)
class NotifierRange:
    """``struct mmu_notifier_range``: [start, end) in bytes."""
    start: int
    end: int
    event: str
    may_block: bool = True


class MmuNotifierOps:
    """A subscriber.  Override the hooks you need; each is a generator."""

    def invalidate_range_start(self, th: "Thread", rng: NotifierRange) -> Generator:
        return
        yield

    def invalidate_range_end(self, th: "Thread", rng: NotifierRange) -> Generator:
        return
        yield

    def change_pte(self, th: "Thread", address: int, pfn: int, gen: int,
                   writable: bool) -> Generator:
        return
        yield

    def clear_flush_young(self, th: "Thread", start: int, end: int) -> Generator:
        return False
        yield

    def clear_young(self, th: "Thread", start: int, end: int) -> Generator:
        return False
        yield

    def test_young(self, th: "Thread", address: int) -> Generator:
        return False
        yield

    def release(self, th: "Thread") -> Generator:
        return
        yield


class Mm:
    def __init__(self, host: "Host", name: str = "mm"):
        self.host = host
        self.name = name
        self.vmas: list[Vma] = []
        self.notifiers: list[MmuNotifierOps] = []
        self.notifier_count = 0
        self.invalidations = 0
        self._next_hva = HVA_BASE
        self.memfds: list[MemFd] = []
        self.exited = False

    # ---- mappings -----------------------------------------------------------------------

    def memfd_create(self, npages: int, hugetlb: bool = False,
                     huge_pages: int = HPAGE_PAGES) -> MemFd:
        fd = MemFd(self.host, npages, hugetlb, name=f"memfd{len(self.memfds)}",
                   huge_pages=huge_pages)
        self.memfds.append(fd)
        return fd

    def mmap(self, npages: int, memfd: MemFd | None = None, pgoff: int = 0,
             writable: bool = True) -> int:
        """MAP_SHARED of ``memfd`` (or anonymous private memory); returns the hva."""
        if memfd is not None and pgoff + npages > memfd.npages:
            raise ValueError("mapping extends past the end of the memfd")
        hva = self._next_hva
        if memfd is not None and memfd.hugetlb:
            align = memfd.huge_pages * PAGE      # hugetlbfs mappings are huge-page aligned
            hva = -(-hva // align) * align
        self._next_hva = hva + (npages + 1) * PAGE  # leave a guard page
        self.vmas.append(Vma(hva, npages, memfd, pgoff, writable))
        return hva

    def find_vma(self, hva: int) -> Vma | None:
        for v in self.vmas:
            if v.start <= hva < v.end:
                return v
        return None

    def fault(self, hva: int, write: bool = False) -> tuple[int, int]:
        """Host page fault / GUP: return (pfn, gen) mapped at hva, populating the PTE."""
        v = self.find_vma(hva)
        if v is None:
            raise ValueError(f"{self.name}: no mapping at {hva:#x}")
        # no settle: a bulk only reads present PTEs and sets accessed bits, which commutes
        # with this (a missing PTE is never in a bulk's range)
        i = (hva - v.start) // PAGE
        pfn, gen = v.pte_at(i)
        if pfn < 0:
            if v.memfd is not None:
                pfn, gen = v.memfd.page(v.pgoff + i)
            else:
                pfn = self.host.memory.alloc(f"anon@{self.name}")
                gen = self.host.memory.gen_of(pfn)
            v.set_pte(i, pfn, gen)
        self.mark_young(v, i)
        return pfn, gen

    def mark_young(self, v: Vma, idx) -> None:
        """The Accessed bit of the PTEs ``idx`` (an index or an array) of ``v``, set by a
        fault (GUP); ``fault`` sets one, a bulk of faults many."""
        v.set_young(idx)

    def mark_young_range(self, v: Vma, i0: int, n: int) -> None:
        """``mark_young`` of the PTEs [i0, i0 + n) of ``v``."""
        v.set_young_range(i0, n)

    def lookup(self, hva: int) -> tuple[int, int] | None:
        """The current PTE at hva, without faulting."""
        v = self.find_vma(hva)
        if v is None:
            return None
        pfn, gen = v.pte_at((hva - v.start) // PAGE)
        return (pfn, gen) if pfn >= 0 else None

    def prefault(self, hva: int, npages: int) -> None:
        """Touch every page (like the selftest writing one byte per page)."""
        v = self.find_vma(hva)
        i0 = (hva - v.start) // PAGE
        self._settle(v, i0, i0 + npages)
        if v.memfd is not None:
            v.memfd.prefault()
            v.map_file(i0, npages)
        else:
            for i in range(i0, i0 + npages):
                self.fault(v.start + i * PAGE, True)
        v.set_young_range(i0, npages)

    # ---- notifier plumbing --------------------------------------------------------------

    def register_notifier(self, ops: MmuNotifierOps) -> None:
        self.notifiers.append(ops)

    def _start(self, th: "Thread", rng: NotifierRange) -> Generator:
        self.notifier_count += 1
        self.invalidations += 1
        for ops in list(self.notifiers):
            yield self.host.costs.notifier_call
            yield from ops.invalidate_range_start(th, rng)

    def _end(self, th: "Thread", rng: NotifierRange) -> Generator:
        for ops in list(self.notifiers):
            yield self.host.costs.notifier_call
            yield from ops.invalidate_range_end(th, rng)
        self.notifier_count -= 1

    def _zap(self, v: Vma, i0: int, n: int) -> list[int]:
        """Clear host PTEs; returns anonymous PFNs to free after the range ends."""
        return v.clear_ptes(i0, n, collect=v.memfd is None)

    def _range(self, hva: int, npages: int) -> tuple[Vma, int]:
        v = self.find_vma(hva)
        if v is None or hva + npages * PAGE > v.end:
            raise ValueError(f"{self.name}: range {hva:#x}+{npages} pages is not one mapping")
        i0 = (hva - v.start) // PAGE
        self._settle(v, i0, i0 + npages)
        return v, i0

    def _settle(self, v: Vma, lo: int | None = None, hi: int | None = None) -> None:
        """Settle bulks depending on the PTEs [lo, hi) of ``v`` (all if no range)."""
        eng = self.host.engine
        if v.bulks:
            eng.settle(v, lo, hi)
        if eng.check_settle:
            eng.assert_settled(v, lo, hi, False)

    # ---- host-side events (generators run by a host thread) -----------------------------

    def munmap(self, th: "Thread", hva: int, npages: int) -> Generator:
        v, i0 = self._range(hva, npages)
        rng = NotifierRange(hva, hva + npages * PAGE, "unmap")
        yield from self._start(th, rng)
        freed = self._zap(v, i0, npages)
        yield max(1, npages * self.host.costs.host_pte_zap)
        yield from self._end(th, rng)
        if freed:
            self.host.memory.put_many(np.array(freed, dtype=np.int64))
        self._split_out(v, i0, npages)

    def madvise_dontneed(self, th: "Thread", hva: int, npages: int) -> Generator:
        v, i0 = self._range(hva, npages)
        rng = NotifierRange(hva, hva + npages * PAGE, "clear")
        yield from self._start(th, rng)
        freed = self._zap(v, i0, npages)
        yield max(1, npages * self.host.costs.host_pte_zap)
        yield from self._end(th, rng)
        if freed:
            self.host.memory.put_many(np.array(freed, dtype=np.int64))

    def ksm_merge(self, th: "Thread", hva: int, ksm_pfn: int | None = None) -> Generator:
        """Replace the anonymous page at hva with a read-only shared (KSM) page.

        Returns the KSM page's pfn (allocated when ``ksm_pfn`` is None)."""
        v, i = self._range(hva, 1)
        if v.memfd is not None:
            raise ValueError("KSM merges anonymous private pages only")
        mem = self.host.memory
        if ksm_pfn is None:
            ksm_pfn = mem.alloc("ksm")      # its first reference is this mapping's
        else:
            mem.get(ksm_pfn)                # one more mapping of the shared page
        ksm_gen = mem.gen_of(ksm_pfn)
        rng = NotifierRange(hva, hva + PAGE, "clear")
        yield from self._start(th, rng)
        old = self._zap(v, i, 1)
        for ops in list(self.notifiers):
            yield self.host.costs.notifier_call
            yield from ops.change_pte(th, hva, ksm_pfn, ksm_gen, False)
        v.set_pte(i, ksm_pfn, ksm_gen)
        yield from self._end(th, rng)
        if old:
            mem.put_many(np.array(old, dtype=np.int64))
        return ksm_pfn

    def age(self, th: "Thread", hva: int, npages: int, flush: bool = True) -> Generator:
        """Page aging over a range: returns the number of pages found young."""
        v, i0 = self._range(hva, npages)
        young = 0
        for i in range(i0, i0 + npages):
            a = hva + (i - i0) * PAGE
            y = v.young_at(i)
            v.set_young(i, False)
            for ops in list(self.notifiers):
                yield self.host.costs.notifier_call
                if flush:
                    y |= bool((yield from ops.clear_flush_young(th, a, a + PAGE)))
                else:
                    y |= bool((yield from ops.clear_young(th, a, a + PAGE)))
            young += y
        return young

    def test_young(self, th: "Thread", hva: int) -> Generator:
        v, i = self._range(hva, 1)
        y = v.young_at(i)
        for ops in list(self.notifiers):
            yield self.host.costs.notifier_call
            y |= bool((yield from ops.test_young(th, hva)))
        return y

    def exit(self, th: "Thread") -> Generator:
        """exit_mmap: release every subscriber, then tear down mappings and close memfds."""
        for ops in list(self.notifiers):
            yield self.host.costs.notifier_call
            yield from ops.release(th)
        self.notifiers.clear()
        freed = []
        for v in self.vmas:
            self._settle(v)
            freed += self._zap(v, 0, v.npages)
        self.vmas.clear()
        if freed:
            self.host.memory.put_many(np.array(freed, dtype=np.int64))
        for fd in self.memfds:
            fd.close()
        self.exited = True

    def _split_out(self, v: Vma, i0: int, n: int) -> None:
        """Remove [i0, i0+n) pages from a VMA after munmap (keeps head and tail parts)."""
        self.vmas.remove(v)
        if i0 > 0:
            head = Vma(v.start, i0, v.memfd, v.pgoff, v.writable)
            head.copy_from(v, 0)
            self.vmas.append(head)
        tail_n = v.npages - i0 - n
        if tail_n > 0:
            s = i0 + n
            tail = Vma(v.start + s * PAGE, tail_n, v.memfd, v.pgoff + s, v.writable)
            tail.copy_from(v, s)
            self.vmas.append(tail)
        self.vmas.sort(key=lambda x: x.start)
