"""TDP MMU operations called from outside the fault path: mmu_notifier handlers, dirty
logging, eager page splitting (arch/x86/kvm/mmu/tdp_mmu.c, spec s8).

All run with mmu_lock held in the mode the kernel uses (the caller takes it) and return
what the kernel returns (usually "flush needed").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

from . import spte as S
from .page import make_role
from .tdp_iter import TdpIter, for_each_leaf

if TYPE_CHECKING:
    from ..host.sched import Thread
    from ..kvm.vm import GfnRange
    from .tdp_mmu import TdpMmu


# ---- mmu_notifier handlers (mmu_lock held for write) ------------------------------------

def kvm_tdp_mmu_unmap_gfn_range(mmu: "TdpMmu", th: "Thread", rng: "GfnRange",
                                flush: bool) -> Generator:
    """kvm_tdp_mmu_unmap_gfn_range (5.18): zap leaves in every root, may yield if the
    notifier may block; the generic code flushes once before unlocking."""
    return (yield from mmu.kvm_tdp_mmu_zap_leafs(th, rng.slot.as_id, rng.start, rng.end,
                                                 rng.may_block, flush))


class _Pos:
    """A snapshot of an iterator position (what the SPTE setters read from an iterator)."""
    __slots__ = ("sp", "index", "gfn", "level", "as_id", "old_spte", "yielded")

    def __init__(self, it: TdpIter):
        self.sp, self.index, self.gfn, self.level = it.sp, it.index, it.gfn, it.level
        self.as_id, self.old_spte, self.yielded = it.as_id, it.old_spte, False


def _leaves_in(mmu: "TdpMmu", root, start: int, end: int):
    """Present leaves of ``root`` in [start, end), as position snapshots (no yielding)."""
    for it in for_each_leaf(mmu.pt, root, start, end):
        yield _Pos(it)


def kvm_tdp_mmu_age_gfn_range(mmu: "TdpMmu", th: "Thread", rng: "GfnRange") -> Generator:
    """kvm_tdp_mmu_age_gfn_range: clear Accessed on every accessed leaf in range, in every
    root (RCU per root in 5.18); returns young."""
    young = False
    rcu = mmu.host.rcu
    if not mmu.policy.rcu_per_root_notifier:
        rcu.read_lock(th)
    for root in mmu.for_each_tdp_mmu_root(th, rng.slot.as_id):
        if mmu.policy.rcu_per_root_notifier:
            rcu.read_lock(th)
        for it in _leaves_in(mmu, root, rng.start, rng.end):
            if not S.is_accessed_spte(it.old_spte):
                continue
            new = it.old_spte & ~S.SHADOW_ACCESSED
            yield from mmu.tdp_mmu_set_spte(th, it, new, gen=mmu.pt.gen(it.sp, it.index),
                                            record_acc_track=False, record_dirty_log=False)
            young = True
            yield mmu.costs.spte_visit
        if mmu.policy.rcu_per_root_notifier:
            rcu.read_unlock(th)
    if not mmu.policy.rcu_per_root_notifier:
        rcu.read_unlock(th)
    return young


def kvm_tdp_mmu_test_age_gfn(mmu: "TdpMmu", th: "Thread", rng: "GfnRange") -> Generator:
    """kvm_tdp_mmu_test_age_gfn: is any leaf in range accessed?  Changes nothing."""
    rcu = mmu.host.rcu
    for root in mmu.for_each_tdp_mmu_root(th, rng.slot.as_id):
        rcu.read_lock(th)
        found = any(S.is_accessed_spte(it.old_spte)
                    for it in _leaves_in(mmu, root, rng.start, rng.end))
        rcu.read_unlock(th)
        if found:
            return True
    return False
    yield


def kvm_tdp_mmu_set_spte_gfn(mmu: "TdpMmu", th: "Thread", rng: "GfnRange") -> Generator:
    """kvm_tdp_mmu_set_spte_gfn (change_pte): zap the 4K leaf for the gfn in every root and,
    if the new host PTE is read-only, install a read-only SPTE for the new PFN.  5.18
    returns whether anything changed (the generic code batches the flush)."""
    pfn, gen, writable = rng.extra
    changed = False
    rcu = mmu.host.rcu
    for root in mmu.for_each_tdp_mmu_root(th, rng.slot.as_id):
        rcu.read_lock(th)
        for it in list(_leaves_in(mmu, root, rng.start, rng.start + 1)):
            if it.level != S.PG_LEVEL_4K:
                continue
            yield from mmu.tdp_mmu_set_spte(th, it, 0)
            it.old_spte = 0
            if not writable:
                new = S.make_spte(pfn, S.PG_LEVEL_4K, writable=False)
                yield from mmu.tdp_mmu_set_spte(th, it, new, gen=gen)
            changed = True
            if not mmu.policy.batched_change_pte_flush:
                # 5.17: flush this gfn at once, inside the TDP MMU
                yield from mmu.kvm.flush_remote_tlbs_with_address(th, rng.start, 1)
        rcu.read_unlock(th)
    return changed if mmu.policy.batched_change_pte_flush else False


# ---- dirty logging -----------------------------------------------------------------------

def _valid_roots(mmu: "TdpMmu", th: "Thread", as_id: int, shared: bool, body) -> Generator:
    yield from mmu.walk_roots(th, as_id, shared, True, body)


def _clear_leaf_bit(mmu: "TdpMmu", th: "Thread", slot, min_level: int, bit: int,
                    op: str) -> Generator:
    """The walk shared by wrprot_gfn_range and clear_dirty_gfn_range (mmu_lock read, valid
    roots, yield-safe): clear ``bit`` in every present leaf at or above ``min_level`` that
    has it, by cmpxchg, retrying a lost race on the fresh value.  Returns "changed"."""
    state = {"spte_set": False}
    rcu = mmu.host.rcu
    accel = mmu.accel.get(op) if min_level == S.PG_LEVEL_4K else None

    def body(root):
        rcu.read_lock(th)
        it = TdpIter(mmu.pt, root, min_level, slot.base_gfn)
        while it.valid and it.gfn < slot.end_gfn:
            if (yield from mmu.tdp_mmu_iter_cond_resched(th, it, False, True)):
                it.next()
                continue
            if accel is not None:
                k, changed = yield from accel(th, it, slot.end_gfn)
                if k:
                    state["spte_set"] |= changed
                    it.next()
                    continue
            if not S.is_shadow_present_pte(it.old_spte) or \
                    not S.is_last_spte(it.old_spte, it.level) or not it.old_spte & bit:
                yield mmu.costs.spte_visit
                it.next()
                continue
            new = it.old_spte & ~bit
            if not (yield from mmu.tdp_mmu_set_spte_atomic(th, it, new,
                                                           gen=mmu.pt.gen(it.sp, it.index))):
                continue        # lost the race: retry on the fresh value (re-checked above)
            state["spte_set"] = True
            yield mmu.costs.spte_visit
            it.next()
        rcu.read_unlock(th)

    yield from _valid_roots(mmu, th, slot.as_id, True, body)
    return state["spte_set"]


def kvm_tdp_mmu_wrprot_slot(mmu: "TdpMmu", th: "Thread", slot, min_level: int) -> Generator:
    """kvm_tdp_mmu_wrprot_slot (mmu_lock read): clear W on present leaves at or above
    ``min_level`` in valid roots, by cmpxchg with retry; yields.  Returns "changed"."""
    return (yield from _clear_leaf_bit(mmu, th, slot, min_level, S.EPT_W, "wrprot_gfn_range"))


def kvm_tdp_mmu_clear_dirty_slot(mmu: "TdpMmu", th: "Thread", slot) -> Generator:
    """clear_dirty_gfn_range over valid roots (mmu_lock read): clear D on leaves, retrying
    a lost cmpxchg on the fresh value.  The presence re-check of 3354ef5a592d changes
    nothing with A/D bits enabled (a fresh non-present or REMOVED value has D clear and is
    skipped either way), so it is not a knob (docs/knobs.md)."""
    return (yield from _clear_leaf_bit(mmu, th, slot, S.PG_LEVEL_4K, S.SHADOW_DIRTY,
                                       "clear_dirty_gfn_range"))


def kvm_tdp_mmu_clear_dirty_pt_masked(mmu: "TdpMmu", th: "Thread", slot, gfn: int,
                                      mask: int, wrprot: bool) -> Generator:
    """kvm_tdp_mmu_clear_dirty_pt_masked (mmu_lock write, all roots, no yield): for the 4K
    leaves selected by ``mask`` from ``gfn``, clear D (or W when ``wrprot``)."""
    rcu = mmu.host.rcu
    bit = S.EPT_W if wrprot else S.SHADOW_DIRTY
    for root in mmu.for_each_tdp_mmu_root(th, slot.as_id):
        rcu.read_lock(th)
        for it in list(_leaves_in(mmu, root, gfn, gfn + 64)):
            if it.level != S.PG_LEVEL_4K or not mask >> (it.gfn - gfn) & 1:
                continue
            if it.old_spte & bit:
                yield from mmu.tdp_mmu_set_spte(th, it, it.old_spte & ~bit,
                                                gen=mmu.pt.gen(it.sp, it.index),
                                                record_dirty_log=False)
        rcu.read_unlock(th)


def kvm_tdp_mmu_write_protect_gfn(mmu: "TdpMmu", th: "Thread", slot, gfn: int,
                                  min_level: int = 1) -> Generator:
    """kvm_tdp_mmu_write_protect_gfn (mmu_lock write, all roots): clear W and MMU-writable
    on the leaf mapping ``gfn``.  Returns "changed"."""
    changed = False
    rcu = mmu.host.rcu
    for root in mmu.for_each_tdp_mmu_root(th, slot.as_id):
        rcu.read_lock(th)
        for it in list(_leaves_in(mmu, root, gfn, gfn + 1)):
            if it.level < min_level:
                continue
            new = it.old_spte & ~(S.EPT_W | S.EPT_SPTE_MMU_WRITABLE)
            if new != it.old_spte:
                yield from mmu.tdp_mmu_set_spte(th, it, new, gen=mmu.pt.gen(it.sp, it.index))
                changed = True
        rcu.read_unlock(th)
    return changed


# ---- eager page splitting ----------------------------------------------------------------

def split_sptes(huge: int, level: int):
    """The 512 child SPTEs of a huge SPTE (vectorised make_huge_page_split_spte)."""
    import numpy as np
    step = S.pages_per_hpage(level - 1) << S.PFN_SHIFT
    child = np.uint64(huge) + np.arange(S.SPTE_ENTRIES, dtype=np.uint64) * np.uint64(step)
    if level - 1 == S.PG_LEVEL_4K:
        child &= ~np.uint64(S.PT_PAGE_SIZE_MASK)
    return child


def kvm_tdp_mmu_try_split_huge_pages(mmu: "TdpMmu", th: "Thread", slot, start: int, end: int,
                                     target_level: int, shared: bool) -> Generator:
    """kvm_tdp_mmu_try_split_huge_pages: replace every huge leaf above ``target_level`` in
    [start, end) with a table of the same translations (no flush: nothing changes for the
    guest).  5.18 walks valid roots only (v4 06); 5.17 walked all roots."""
    rcu = mmu.host.rcu
    costs = mmu.costs

    def body(root):
        rcu.read_lock(th)
        it = TdpIter(mmu.pt, root, target_level + 1, start)
        while it.valid and it.gfn < end:
            if (yield from mmu.tdp_mmu_iter_cond_resched(th, it, False, shared)):
                it.next()
                continue
            if not S.is_shadow_present_pte(it.old_spte) or not S.is_large_pte(it.old_spte):
                it.next()
                continue
            huge, level = it.old_spte, it.level
            sp = mmu.pt.alloc(it.gfn, make_role(level - 1, it.as_id), (it.sp, it.index))
            gen = mmu.pt.gen(it.sp, it.index)
            mmu.pt.write_many(sp, 0, S.SPTE_ENTRIES, slice(None), split_sptes(huge, level), gen)
            if level - 1 == 1:
                mmu.kvm.stat["pages_4k"] += S.SPTE_ENTRIES
            elif level - 1 == 2:
                mmu.kvm.stat["pages_2m"] += S.SPTE_ENTRIES
            new = S.make_nonleaf_spte(sp.pfn)
            if shared:
                ok = yield from mmu.tdp_mmu_set_spte_atomic(th, it, new)
            else:
                yield from mmu.tdp_mmu_set_spte(th, it, new)
                ok = True
            if not ok:
                if level - 1 == 1:
                    mmu.kvm.stat["pages_4k"] -= S.SPTE_ENTRIES
                elif level - 1 == 2:
                    mmu.kvm.stat["pages_2m"] -= S.SPTE_ENTRIES
                mmu.pt.free(sp)
                continue
            mmu.nr_pages += 1
            yield S.SPTE_ENTRIES * costs.split_spte
            it.next()
        rcu.read_unlock(th)

    only_valid = mmu.policy.eager_split_valid_only
    yield from mmu.walk_roots(th, slot.as_id, shared, only_valid, body)
