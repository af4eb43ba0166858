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

if TYPE_CHECKING:
    from .host import Host
    from .sched import Thread

PAGE = 4096
HPAGE_PAGES = 512
HPAGE = HPAGE_PAGES * PAGE
GPAGE_PAGES = 512 * 512
HVA_BASE = 0x7F00_0000_0000


class MemFd:
    """A memfd: pages owned by the file, allocated on first touch (or ``prefault``).
    A hugetlb memfd holds 2 MiB pages: physically contiguous, aligned blocks of 512."""

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
        self.pfn = np.full(npages, -1, dtype=np.int64)
        self.gen = np.zeros(npages, dtype=np.uint32)
        self.closed = False

    def page(self, idx: int) -> tuple[int, int]:
        if self.pfn[idx] < 0:
            mem = self.host.memory
            if self.hugetlb:      # the whole huge page, physically contiguous and aligned
                hp = self.huge_pages
                b = idx - idx % hp
                pfns = mem.alloc_block(hp, self.name)
                self.pfn[b:b + hp] = pfns[:len(self.pfn[b:b + hp])]
                self.gen[b:b + hp] = mem.gen[self.pfn[b:b + hp]]
            else:
                p = mem.alloc(self.name)
                self.pfn[idx] = p
                self.gen[idx] = mem.gen[p]
        return int(self.pfn[idx]), int(self.gen[idx])

    def prefault(self) -> None:
        missing = np.flatnonzero(self.pfn < 0)
        if not len(missing):
            return
        if self.hugetlb:
            for idx in missing.tolist():
                if self.pfn[idx] < 0:
                    self.page(idx)
            return
        mem = self.host.memory
        pfns = mem.alloc_many(len(missing), self.name)
        self.pfn[missing] = pfns
        self.gen[missing] = mem.gen[pfns]

    def close(self) -> None:
        present = self.pfn[self.pfn >= 0]
        if len(present):
            self.host.memory.free_many(present)
        self.pfn[:] = -1
        self.closed = True


class Vma(Resource):
    """A mapping and its host PTEs.  As a Resource it stands for the PTEs and their accessed
    bits: a fast-mode bulk faulting through it declares it, and host operations that change
    PTEs or read and clear accessed bits settle it first (``Mm._settle``).  Faults and
    lookups do not: they commute with a bulk's reads of present PTEs and accessed-bit sets."""

    __slots__ = ("start", "npages", "memfd", "pgoff", "pte", "pte_gen", "young", "writable")

    def __init__(self, start: int, npages: int, memfd: MemFd | None, pgoff: int, writable: bool):
        super().__init__()
        self.start = start
        self.npages = npages
        self.memfd = memfd          # None: anonymous private memory
        self.pgoff = pgoff
        self.pte = np.full(npages, -1, dtype=np.int64)   # host PTE: pfn or -1
        self.pte_gen = np.zeros(npages, dtype=np.uint32)
        self.young = np.zeros(npages, dtype=bool)
        self.writable = writable

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
        if v.pte[i] < 0:
            if v.memfd is not None:
                pfn, gen = v.memfd.page(v.pgoff + i)
            else:
                pfn = self.host.memory.alloc(f"anon@{self.name}")
                gen = int(self.host.memory.gen[pfn])
            v.pte[i] = pfn
            v.pte_gen[i] = gen
        self.mark_young(v, i)
        return int(v.pte[i]), int(v.pte_gen[i])

    def mark_young(self, v: Vma, idx) -> None:
        """The Accessed bit of the PTEs ``idx`` (an index or an array) of ``v``, set by a
        fault (GUP); ``fault`` sets one, a bulk of faults many."""
        v.young[idx] = True

    def lookup(self, hva: int) -> tuple[int, int] | None:
        """The current PTE at hva, without faulting."""
        v = self.find_vma(hva)
        if v is None:
            return None
        i = (hva - v.start) // PAGE
        return (int(v.pte[i]), int(v.pte_gen[i])) if v.pte[i] >= 0 else None

    def prefault(self, hva: int, npages: int) -> None:
        """Touch every page (like the selftest writing one byte per page)."""
        v = self.find_vma(hva)
        i0 = (hva - v.start) // PAGE
        self._settle(v, i0, i0 + npages)
        if v.memfd is not None:
            v.memfd.prefault()
            idx = np.arange(v.pgoff + i0, v.pgoff + i0 + npages)
            v.pte[i0:i0 + npages] = v.memfd.pfn[idx]
            v.pte_gen[i0:i0 + npages] = v.memfd.gen[idx]
        else:
            for i in range(i0, i0 + npages):
                self.fault(v.start + i * PAGE, True)
        v.young[i0:i0 + npages] = True

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
        ptes = v.pte[i0:i0 + n]
        freed = ptes[ptes >= 0].tolist() if v.memfd is None else []
        v.pte[i0:i0 + n] = -1
        v.young[i0:i0 + n] = False
        return freed

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
        ksm_gen = int(mem.gen[ksm_pfn])
        rng = NotifierRange(hva, hva + PAGE, "clear")
        yield from self._start(th, rng)
        old = self._zap(v, i, 1)
        for ops in list(self.notifiers):
            yield self.host.costs.notifier_call
            yield from ops.change_pte(th, hva, ksm_pfn, ksm_gen, False)
        v.pte[i] = ksm_pfn
        v.pte_gen[i] = ksm_gen
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
            y = bool(v.young[i])
            v.young[i] = False
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
        y = bool(v.young[i])
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
            head.pte[:], head.pte_gen[:], head.young[:] = v.pte[:i0], v.pte_gen[:i0], v.young[:i0]
            self.vmas.append(head)
        tail_n = v.npages - i0 - n
        if tail_n > 0:
            s = i0 + n
            tail = Vma(v.start + s * PAGE, tail_n, v.memfd, v.pgoff + s, v.writable)
            tail.pte[:], tail.pte_gen[:], tail.young[:] = v.pte[s:], v.pte_gen[s:], v.young[s:]
            self.vmas.append(tail)
        self.vmas.sort(key=lambda x: x.start)
