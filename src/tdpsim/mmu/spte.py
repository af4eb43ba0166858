"""SPTE encoding: the EPT layout KVM 5.17/5.18 uses (spec section 1.1), and its helpers.

Helpers are named as in arch/x86/kvm/mmu/spte.h and work on Python ints.  The ``*_mask``
variants used by bulk paths work on NumPy ``uint64`` arrays too (plain bit operations).

Deliberate simplifications: A/D bits are always enabled (EPT A/D on; no access-tracked
SPTEs from make_spte), MMIO SPTEs are not modelled, the memory type is always WB.
"""

from __future__ import annotations

import numpy as np

PAGE_SHIFT = 12
SPTE_ENTRIES = 512
LEVEL_BITS = 9

# hardware-defined EPT bits
EPT_R = 1 << 0
EPT_W = 1 << 1            # PT_WRITABLE_MASK
EPT_X = 1 << 2
EPT_MT_WB = 6 << 3        # memory type (leaf only)
EPT_IPAT = 1 << 6
PT_PAGE_SIZE_MASK = 1 << 7
SHADOW_ACCESSED = 1 << 8  # with EPT A/D enabled
SHADOW_DIRTY = 1 << 9
# KVM software bits
SPTE_MMU_PRESENT_MASK = 1 << 11
SPTE_TDP_AD_SHIFT = 52    # 0 = A/D enabled, 1 = disabled, 2 = write-protect only
SPTE_SAVED_R = 1 << 54    # access tracking: stashed R/X
SPTE_SAVED_X = 1 << 56
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58

PFN_SHIFT = PAGE_SHIFT
PFN_BITS = 40             # bits 12..51
PFN_MASK = ((1 << PFN_BITS) - 1) << PFN_SHIFT

#: the frozen value: no RWX, not MMU-present, no PFN (bits 5, 7, 8, 10)
REMOVED_SPTE = 0x5A0

PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, PG_LEVEL_512G = 1, 2, 3, 4

assert REMOVED_SPTE & SPTE_MMU_PRESENT_MASK == 0
assert REMOVED_SPTE & (EPT_R | EPT_W | EPT_X) == 0
assert REMOVED_SPTE & PFN_MASK == 0


def pages_per_hpage(level: int) -> int:
    """KVM_PAGES_PER_HPAGE: 4K pages mapped by one SPTE at ``level``."""
    return 1 << ((level - 1) * LEVEL_BITS)


def spte_index(gfn: int, level: int) -> int:
    """SPTE_INDEX: the entry for ``gfn`` in a table of ``level``."""
    return (gfn >> ((level - 1) * LEVEL_BITS)) & (SPTE_ENTRIES - 1)


def round_gfn_for_level(gfn: int, level: int) -> int:
    return gfn & -pages_per_hpage(level)


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_removed_spte(spte: int) -> bool:
    return spte == REMOVED_SPTE


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    """A leaf: any level-1 SPTE, or a large page at level 2 or 3."""
    return level == PG_LEVEL_4K or is_large_pte(spte)


def is_writable_pte(spte: int) -> bool:
    return bool(spte & EPT_W)


def is_accessed_spte(spte: int) -> bool:
    return bool(spte & SHADOW_ACCESSED)


def is_dirty_spte(spte: int) -> bool:
    return bool(spte & SHADOW_DIRTY)


def spte_to_pfn(spte: int) -> int:
    return (spte & PFN_MASK) >> PFN_SHIFT


def is_mmu_writable_spte(spte: int) -> bool:
    return bool(spte & EPT_SPTE_MMU_WRITABLE)


def make_nonleaf_spte(child_pfn: int) -> int:
    """A link to a child page table: RWX, accessed, MMU-present."""
    return (EPT_R | EPT_W | EPT_X | SHADOW_ACCESSED | SPTE_MMU_PRESENT_MASK
            | (child_pfn << PFN_SHIFT))


def make_spte(pfn: int, level: int, writable: bool, host_writable: bool = True,
              prefetch: bool = False, executable: bool = True) -> int:
    """A leaf SPTE for guest memory (make_spte, TDP flavour).

    Accessed is set unless it is a prefetch; a writable SPTE is made Dirty at once (as
    make_spte does with spte_shadow_dirty_mask), so zapping it writes the dirty bit back to
    the host page.  Invariants: host-writable clear => W clear and
    MMU-writable clear; MMU-writable set => host-writable set."""
    spte = EPT_R | EPT_MT_WB | EPT_IPAT | SPTE_MMU_PRESENT_MASK | (pfn << PFN_SHIFT)
    if executable:
        spte |= EPT_X
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if not prefetch:
        spte |= SHADOW_ACCESSED
    if host_writable:
        spte |= EPT_SPTE_HOST_WRITABLE
        if writable:
            spte |= EPT_W | EPT_SPTE_MMU_WRITABLE | SHADOW_DIRTY
    return spte


def make_huge_page_split_spte(huge_spte: int, level: int, index: int) -> int:
    """The child SPTE for entry ``index`` when splitting a huge SPTE at ``level``."""
    child_level = level - 1
    spte = huge_spte + ((index * pages_per_hpage(child_level)) << PFN_SHIFT)
    if child_level == PG_LEVEL_4K:
        spte &= ~PT_PAGE_SIZE_MASK
    return spte


# ---- vectorised forms (NumPy uint64 arrays) ---------------------------------------------

U64 = np.uint64


def present_mask(sptes: np.ndarray) -> np.ndarray:
    return (sptes & U64(SPTE_MMU_PRESENT_MASK)) != 0


def leaf_mask(sptes: np.ndarray, level: int) -> np.ndarray:
    """Present leaves at ``level`` (all present entries at level 1)."""
    p = present_mask(sptes)
    if level == PG_LEVEL_4K:
        return p
    return p & ((sptes & U64(PT_PAGE_SIZE_MASK)) != 0)


def pfns_of(sptes: np.ndarray) -> np.ndarray:
    return ((sptes & U64(PFN_MASK)) >> U64(PFN_SHIFT)).astype(np.int64)


def make_4k_sptes(pfns: np.ndarray, writable: bool, host_writable: bool = True) -> np.ndarray:
    """Vectorised make_spte for 4 KiB leaves."""
    base = make_spte(0, PG_LEVEL_4K, writable, host_writable)
    return np.asarray(pfns, dtype=np.uint64) << U64(PFN_SHIFT) | U64(base)


def describe(spte: int, level: int = 1) -> str:
    """Human-readable form for findings and debugging."""
    if spte == 0:
        return "0"
    if is_removed_spte(spte):
        return "REMOVED"
    if not is_shadow_present_pte(spte):
        return f"nonpresent({spte:#x})"
    kind = "leaf" if is_last_spte(spte, level) else "table"
    bits = "".join(c for c, b in (("R", EPT_R), ("W", EPT_W), ("X", EPT_X),
                                 ("A", SHADOW_ACCESSED), ("D", SHADOW_DIRTY)) if spte & b)
    return f"{kind}(pfn={spte_to_pfn(spte):#x},{bits})"
