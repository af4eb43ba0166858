"""Memslots (``struct kvm_memory_slot``) and their lookup.

A memslot maps guest frames ``[base_gfn, base_gfn + npages)`` to host virtual addresses
``userspace_addr + (gfn - base_gfn) * 4 KiB``.  Limits as on x86 5.17/5.18:
KVM_USER_MEM_SLOTS = 32764 per address space, at most 2^31 - 1 pages per slot.

The largest mapping level a gfn can use (``max_mapping_level``) follows
``kvm_mmu_max_mapping_level``: the host page size backing the hva (hugetlb memfd: 2 MiB,
otherwise 4 KiB since the selftest sets MADV_NOHUGEPAGE), reduced where the gfn and the hva
are not equally aligned or the huge page would cross the slot's edges (``disallow_lpage``),
and to 4 KiB while dirty logging is on.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from ..host.mm import PAGE, Mm
from ..sim.engine import Resource

KVM_USER_MEM_SLOTS = 32764
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
VALID_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY


@dataclass
class Memslot:
    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int = 0
    as_id: int = 0
    #: host page size in 4 KiB pages backing this slot's hva range (512 for hugetlb 2 MiB)
    host_level_pages: int = 1
    dirty_bitmap: np.ndarray | None = field(default=None, repr=False)
    #: KVM_MEMSLOT_INVALID: set while the slot is being deleted or moved; faults retry
    invalid: bool = False

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        return self.userspace_addr + (gfn - self.base_gfn) * PAGE

    def hva_range_to_gfns(self, start: int, end: int) -> tuple[int, int] | None:
        """The gfn range of this slot that [start, end) hva overlaps (None if none)."""
        s_end = self.userspace_addr + self.npages * PAGE
        lo, hi = max(start, self.userspace_addr), min(end, s_end)
        if lo >= hi:
            return None
        g0 = self.base_gfn + (lo - self.userspace_addr) // PAGE
        g1 = self.base_gfn + (hi - self.userspace_addr + PAGE - 1) // PAGE
        return g0, g1

    @property
    def dirty_logging(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    def max_mapping_level(self, gfn: int, max_level: int = 3) -> int:
        """kvm_mmu_max_mapping_level for ``gfn`` (1 = 4K, 2 = 2M, 3 = 1G)."""
        if self.dirty_logging:
            return 1
        level = 1
        for lvl, pages in ((2, 512), (3, 512 * 512)):
            if lvl > max_level or self.host_level_pages < pages:
                break
            start = gfn & -pages
            if start < self.base_gfn or start + pages > self.end_gfn:
                break          # the huge page would cross the slot's edges
            if (self.base_gfn - self.userspace_addr // PAGE) % pages:
                break          # gfn and hva not equally aligned
            level = lvl
        return level


class Memslots(Resource):
    """The memslots of one address space, ordered by base gfn.

    As a Resource it stands for the slot layout: fast-mode bulks that rely on a slot
    declare it, and every change (``Kvm.set_user_memory_region``) settles them first."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[int, Memslot] = {}
        self._starts: list[int] = []
        self._sorted: list[Memslot] = []
        self.generation = 0

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self):
        return iter(self._sorted)

    def _reindex(self) -> None:
        self._sorted = sorted(self.by_id.values(), key=lambda s: s.base_gfn)
        self._starts = [s.base_gfn for s in self._sorted]
        self.generation += 1

    def add(self, slot: Memslot) -> None:
        # O(log n) search + one list insert: tens of thousands of slots stay cheap
        self.by_id[slot.id] = slot
        i = bisect.bisect_right(self._starts, slot.base_gfn)
        self._starts.insert(i, slot.base_gfn)
        self._sorted.insert(i, slot)
        self.generation += 1

    def remove(self, slot_id: int) -> Memslot:
        slot = self.by_id.pop(slot_id)
        i = bisect.bisect_left(self._starts, slot.base_gfn)
        while self._sorted[i] is not slot:
            i += 1
        del self._starts[i], self._sorted[i]
        self.generation += 1
        return slot

    def find(self, gfn: int) -> Memslot | None:
        """gfn_to_memslot."""
        i = bisect.bisect_right(self._starts, gfn) - 1
        if i >= 0:
            s = self._sorted[i]
            if gfn < s.end_gfn:
                return s
        return None

    def overlapping(self, base_gfn: int, npages: int, skip: int | None = None) -> Memslot | None:
        # slots do not overlap each other, so at most the one starting before base_gfn
        # and those starting inside [base_gfn, end) can overlap the range
        end = base_gfn + npages
        i = max(0, bisect.bisect_right(self._starts, base_gfn) - 1)
        for s in self._sorted[i:]:
            if s.base_gfn >= end:
                break
            if s.id != skip and base_gfn < s.end_gfn:
                return s
        return None

    def by_hva(self, start: int, end: int):
        """Slots whose hva range overlaps [start, end), with their gfn ranges."""
        for s in self._sorted:
            r = s.hva_range_to_gfns(start, end)
            if r is not None:
                yield s, r[0], r[1]


def check_region(slot_id: int, flags: int, base_gfn: int, npages: int, mm: Mm,
                 userspace_addr: int, max_gfn: int) -> None:
    """The argument checks of KVM_SET_USER_MEMORY_REGION (EINVAL cases), as ValueError."""
    if not 0 <= slot_id < KVM_USER_MEM_SLOTS:
        raise ValueError(f"slot: expected 0..{KVM_USER_MEM_SLOTS - 1}, got {slot_id}")
    if flags & ~VALID_FLAGS:
        raise ValueError(f"flags: unknown bits {flags & ~VALID_FLAGS:#x}")
    if npages > KVM_MEM_MAX_NR_PAGES:
        raise ValueError(f"memory_size: at most {KVM_MEM_MAX_NR_PAGES} pages per slot")
    if npages and base_gfn + npages > max_gfn:
        raise ValueError("guest_phys_addr: the slot ends above the guest's MAXPHYADDR")
    if npages and mm.find_vma(userspace_addr) is None:
        raise ValueError(f"userspace_addr: {userspace_addr:#x} is not mapped")
