"""The TDP MMU fault path: ``kvm_tdp_mmu_map`` and ``tdp_mmu_map_handle_target_level``.

Runs with mmu_lock held for read and RCU (the caller, the vCPU's fault phase 2, takes
both).  Walks from the root towards ``fault.gfn``: a huge SPTE in the way is frozen, flushed
and zeroed (``tdp_mmu_zap_spte_atomic``); a missing table is allocated and linked by
cmpxchg (a lost race frees the unused SP at once, it was never reachable); a REMOVED entry
makes the fault retry.  At the goal level the leaf is installed by cmpxchg; replacing a
table with a huge leaf flushes under RCU (5.18).

The walk is one step of the model: the SP allocations it makes are charged in the returned
cost, not yielded, so a fault is not interleaved with other tasks except at the remote
flushes the huge-page paths need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

from . import spte as S
from .page import ROLE_CR0_WP, make_role
from .tdp_iter import TdpIter

if TYPE_CHECKING:
    from ..host.sched import Thread
    from ..kvm.vcpu import Fault, Vcpu
    from .tdp_mmu import TdpMmu

RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_RETRY = "fixed", "spurious", "retry"


def kvm_mmu_hugepage_adjust(mmu: "TdpMmu", fault: "Fault") -> None:
    """kvm_mmu_hugepage_adjust: the goal level is the largest the slot and host allow,
    unless the NX mitigation disallows huge pages for this (exec) fault."""
    fault.req_level = fault.max_level
    fault.goal_level = S.PG_LEVEL_4K if fault.huge_page_disallowed else fault.req_level


def disallowed_hugepage_adjust(fault: "Fault", spte: int, level: int) -> None:
    """disallowed_hugepage_adjust (5.18): a present table at the goal level keeps the
    mapping small (go one level down) instead of replacing the table with a huge page."""
    if (level > S.PG_LEVEL_4K and level == fault.goal_level and S.is_shadow_present_pte(spte)
            and not S.is_large_pte(spte)):
        fault.goal_level -= 1


def kvm_tdp_mmu_map(mmu: "TdpMmu", vcpu: "Vcpu", th: "Thread", fault: "Fault",
                    nx_workaround: bool = False) -> Generator:
    """kvm_tdp_mmu_map.  Returns (RET_PF_*, extra cost in ns)."""
    kvm_mmu_hugepage_adjust(mmu, fault)
    root = vcpu.root
    pt = mmu.pt
    extra = 0
    gfn = fault.gfn
    it = TdpIter(pt, root, S.PG_LEVEL_4K, gfn)
    while it.valid and it.gfn < gfn + 1:
        it.old_spte = pt.read(it.sp, it.index)       # changes go through set_spte_atomic
        if nx_workaround:
            disallowed_hugepage_adjust(fault, it.old_spte, it.level)
        if it.level == fault.goal_level:
            break
        if S.is_shadow_present_pte(it.old_spte) and S.is_large_pte(it.old_spte):
            # a huge page where a table must go: freeze, flush, zero, then link a table
            if not (yield from mmu.tdp_mmu_zap_spte_atomic(th, it)):
                break
            it.old_spte = pt.read(it.sp, it.index)
        if not S.is_shadow_present_pte(it.old_spte):
            if S.is_removed_spte(it.old_spte):
                break      # frozen by another thread: retry rather than allocate
            sp = pt.alloc(it.gfn, make_role(it.level - 1, it.as_id, bool(root.role & ROLE_CR0_WP)),
                          (it.sp, it.index))
            extra += mmu.costs.sp_alloc
            account_nx = fault.huge_page_disallowed and fault.req_level >= it.level
            if not (yield from tdp_mmu_link_sp(mmu, th, it, sp, account_nx, shared=True)):
                pt.free(sp)      # never reachable: freed at once
                break
        it.next()
    if it.level != fault.goal_level or (mmu.policy.removed_spte_checks
                                        and S.is_removed_spte(it.old_spte)):
        return RET_PF_RETRY, extra
    ret = yield from tdp_mmu_map_handle_target_level(mmu, vcpu, th, fault, it)
    return ret, extra


def tdp_mmu_link_sp(mmu: "TdpMmu", th: "Thread", it: TdpIter, sp, account_nx: bool,
                    shared: bool) -> Generator:
    """tdp_mmu_link_sp: install the non-leaf SPTE (cmpxchg when shared), add the SP to
    tdp_mmu_pages and, if it replaced a disallowed huge page, to the NX list."""
    new = S.make_nonleaf_spte(sp.pfn)
    if shared:
        ok = yield from mmu.tdp_mmu_set_spte_atomic(th, it, new)
        if not ok:
            return False
    else:
        yield from mmu.tdp_mmu_set_spte(th, it, new)
    mmu.nr_pages += 1
    if account_nx:
        mmu.account_huge_nx_page(sp)
    return True


def tdp_mmu_map_handle_target_level(mmu: "TdpMmu", vcpu: "Vcpu", th: "Thread",
                                    fault: "Fault", it: TdpIter) -> Generator:
    """tdp_mmu_map_handle_target_level: make the leaf SPTE and cmpxchg it in."""
    level = it.level
    pfn = fault.pfn & ~(S.pages_per_hpage(level) - 1) if level > 1 else fault.pfn
    # NX huge pages: huge mappings are not executable, so an instruction fetch faults and
    # is mapped small (make_spte clears ACC_EXEC_MASK above 4K)
    executable = not (level > S.PG_LEVEL_4K and mmu.kvm.arch.nx_huge_pages)
    new = S.make_spte(pfn, level, writable=fault.map_writable, executable=executable)
    if new == it.old_spte:
        return RET_PF_SPURIOUS
    replaced_table = S.is_shadow_present_pte(it.old_spte) and \
        not S.is_last_spte(it.old_spte, level)
    ok = yield from mmu.tdp_mmu_set_spte_atomic(th, it, new, gen=fault.gen)
    if not ok:
        return RET_PF_RETRY
    if replaced_table:
        # 5.18: the removed subtree must be flushed before RCU is dropped
        yield from mmu.kvm.flush_remote_tlbs_with_address(th, it.gfn,
                                                          S.pages_per_hpage(level + 1))
    mmu.handle_changed_spte_dirty_log(it.as_id, it.gfn, it.old_spte, new, level)
    return RET_PF_FIXED
