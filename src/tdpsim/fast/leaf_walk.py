"""Accelerator of the leaf walks: ``tdp_mmu_zap_leafs``, ``wrprot_gfn_range`` and
``clear_dirty_gfn_range`` over a 4 KiB table; and of 5.17's ``zap_gfn_range`` over a
stretch of absent entries at any level (``absent_bulk``: the 16 K memslot deletions of the
selftest each walk the top level of empty invalid roots).

Called by the walk at a 4 KiB entry, right after its yield check passed, it processes the
rest of the table up to ``end`` as the walk would one entry at a time, and leaves the
iterator on the last entry done.  Exact mode spends, per entry, one step of
``spte_visit`` (plus ``spte_zap_4k`` for a zapped leaf) and re-checks need_resched (and, on
preemptible kernels, mmu_lock contention) before the next; the bulk's steps are the same
and end where need_resched could turn true.  Resources: the CPU (need_resched), mmu_lock
(a waiter would make the walk yield), host memory (a write-back may report a freed page)
and the entries processed.  A frozen (REMOVED) entry, a freed table or anything frozen by
the VM stops it before it starts, and the walk goes on entry by entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Generator

import numpy as np

from ..mmu import spte as S
from ..sim.engine import Bulk
from ..sim.steps import Costs

if TYPE_CHECKING:
    from ..mmu.tdp_iter import TdpIter
    from ..mmu.tdp_mmu import TdpMmu

U64 = np.uint64
_REMOVED = U64(S.REMOVED_SPTE)

#: the kernel loops accelerated here, and the bit each one clears (None: zap the leaf)
LOOPS = {"tdp_mmu_zap_leafs": None,
         "wrprot_gfn_range": S.EPT_W,
         "clear_dirty_gfn_range": S.SHADOW_DIRTY}


def make(tdp: "TdpMmu", loop: str) -> Callable:
    """The accelerator of ``loop`` for ``tdp``: ``(th, it, end) -> (entries, changed)``."""
    bit = LOOPS[loop]

    def accel(th, it: "TdpIter", end: int) -> Generator:
        return (yield from leaf_table_bulk(tdp, th, it, end, bit))
    return accel


def leaf_table_bulk(tdp: "TdpMmu", th, it: "TdpIter", end: int,
                    bit: int | None) -> Generator:
    """The rest of the iterator's 4 KiB table in one bulk.  Returns (entries done,
    whether any SPTE changed); (0, False) when a bulk does not apply."""
    kvm = tdp.kvm
    eng = kvm.engine
    sched = kvm.host.sched
    lock = kvm.mmu_lock
    if it.level != 1 or it.yielded or sched.need_resched(th) or lock.needbreak():
        return 0, False
    sp = it.sp
    i0 = it.index
    j = it.table_end(end)
    if j - i0 < 2 or tdp.frozen or sp.freed:
        return 0, False
    pt = tdp.pt
    pt.claim(sp, i0, j)
    ents = pt.entries(sp, i0, j)
    if (ents == _REMOVED).any():
        return 0, False
    present = S.present_mask(ents)
    target = present if bit is None else present & ((ents & U64(bit)) != 0)
    costs = kvm.costs
    cost = np.full(j - i0, costs.spte_visit, dtype=np.int64)
    if bit is None:
        cost[target] += costs.spte_zap_4k
    steps = Costs(cost)
    m = steps.started_before(sched.need_resched_at(th.cpu) - eng.now)
    if m < 2:
        return 0, False
    gfn0 = it.gfn

    def apply(k: int) -> None:
        t = np.flatnonzero(target[:k]) + i0
        if not len(t):
            return
        if bit is None:
            tdp.zap_leaves(th, sp, i0, i0 + k, t)
        else:
            pt.clear_bits(sp, t, i0, i0 + k, bit)

    k = yield Bulk(steps.prefix(m), apply,
                   [th.cpu, lock, kvm.host.memory, (sp, i0, i0 + m)])
    # leave the iterator on the last entry done, as k - 1 side steps would have
    it.step_side_to(i0 + k - 1)
    assert it.gfn == gfn0 + k - 1
    return k, bool(target[:k].any())


def absent_bulk(tdp: "TdpMmu", th, it: "TdpIter", end: int, can_yield: bool) -> Generator:
    """zap_gfn_range (5.17) over the absent entries that follow the iterator's, in its
    table, in one bulk: exact mode visits each (``spte_visit``), checking need_resched
    (and lock contention) before the next when the walk may yield.  Returns the entries
    done (0: no bulk), leaving the iterator on the last."""
    kvm = tdp.kvm
    eng = kvm.engine
    sched = kvm.host.sched
    lock = kvm.mmu_lock
    visit = kvm.costs.spte_visit
    if it.yielded or visit < 1 or (can_yield and (sched.need_resched(th) or lock.needbreak())):
        return 0
    sp = it.sp
    i0 = it.index
    j = it.table_end(end)
    if j - i0 < 2 or sp.freed:
        return 0
    pres = np.flatnonzero(S.present_mask(tdp.pt.entries(sp, i0, j)))
    n = int(pres[0]) if len(pres) else j - i0
    m = n
    if can_yield:
        m = min(n, -(-(sched.need_resched_at(th.cpu) - eng.now) // visit))
    if m < 2:
        return 0
    gfn0 = it.gfn
    res = [(sp, i0, i0 + m, 0, 0)]             # read only: a writer settles it
    if can_yield:
        res += [th.cpu, lock]
    k = yield Bulk((m, visit), lambda k: None, res)
    it.step_side_to(i0 + k - 1)
    assert it.gfn == gfn0 + (k - 1) * S.pages_per_hpage(it.level)
    return k
