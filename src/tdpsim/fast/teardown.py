"""Accelerator of handle_removed_pt's loop over the children of a removed table.

Exact mode, per child (``TdpMmu.handle_removed_pt`` on it): unlink it, freeze its entries,
zap its leaves (statistics, the dirty/accessed write-back of each), on 5.17 flush its range
(``kvm_flush_remote_tlbs``: a request to every vCPU, one step), call_rcu(free), then one
step of its cost.  For a run of consecutive children that are plain full leaf tables
(``PageTableStore.removable_children``: 512 present leaves, nothing frozen or pending),
the bulk does the same, ``512 * spte_zap_4k`` per child (5.17: preceded by the flush
step), applied through ``TdpMmu.unlink_children`` and, on 5.17,
``Kvm.account_idle_flushes``.  A compressed store hands tables it keeps as runs over as
whole runs, so the bulk costs per run there; the bulk itself is the same for every store.

What it does not model stops it before the child concerned and the exact path takes
over: a flush that would kick a vCPU in guest mode (IPIs, and waiting for the exits); no
RCU grace period running (the first call_rcu would start one at its own time); a leaf
whose host page is not live (the write-back reports it at its time).  Resources: the
children (tables as SPs, runs as records: touching one settles the bulk), host memory (a
free could kill a leaf's page), RCU (a grace period that starts or ends sees exactly the
callbacks queued before it) and, on 5.17, the vCPUs (their requests and guest mode).
The loop checks neither need_resched nor mmu_lock contention.

A 5.17 bulk cut between a child's flush and its cost stops where exact mode stands after
the flush request: the accelerator finishes that child itself (the flush returns, its
callback is queued, its cost is spent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

import numpy as np

from ..kvm.vm import OUTSIDE_GUEST_MODE
from ..mmu import spte as S
from ..mmu.page import ShadowPage
from ..sim.engine import Bulk
from ..sim.steps import Repeat, Run, Seq

if TYPE_CHECKING:
    from ..mmu.tdp_mmu import TdpMmu

U64 = np.uint64
_AD = U64(S.SHADOW_ACCESSED | S.SHADOW_DIRTY)


def make(tdp: "TdpMmu"):
    """The accelerator for ``tdp``: ``(th, parent, old, idx, pos, shared) -> children
    done``, the children at parent entries ``idx[pos:]`` (ascending)."""
    kvm = tdp.kvm
    pt = tdp.pt
    mem = kvm.host.memory
    rcu = kvm.host.rcu
    eng = kvm.engine

    def live_children(pieces: list) -> int:
        """How many children in ``pieces``, in order, have every written-back page live."""
        n = 0
        for piece in pieces:
            if isinstance(piece, ShadowPage):
                sptes = pt.entries(piece)
                wb = (sptes & _AD) != 0
                if wb.any():
                    gens = pt.gens_at(piece, slice(0, S.SPTE_ENTRIES), 0, S.SPTE_ENTRIES)
                    if not mem.live_mask(S.pfns_of(sptes[wb]), gens[wb]).all():
                        return n
                n += 1
                continue
            run, c = piece
            if run.base0 & int(_AD):
                for first, npages, gen in pt.kid_pages(run, c):
                    ok = mem.first_dead(first, npages, gen)
                    if ok < npages:
                        return n + ok // S.SPTE_ENTRIES
                    n += npages // S.SPTE_ENTRIES
            else:
                n += c
        return n

    def idle_vcpus() -> bool:
        """Every vCPU is outside guest mode: a flush kicks nobody (settles what may say
        else)."""
        for v in kvm.vcpus:
            if v.bulks:
                eng.settle(v)
            if v.mode != OUTSIDE_GUEST_MODE:
                return False
        return True

    def handle_removed_kids(th, parent, old, idx: list[int], pos: int,
                            shared: bool) -> Generator:
        cost = S.SPTE_ENTRIES * tdp.costs.spte_zap_4k
        flush = not tdp.policy.deferred_flush           # 5.17: a flush per table
        if not rcu.gp_running or cost <= 0 or parent.level != 2 or \
                (flush and not idle_vcpus()):
            return 0
        pieces = pt.removable_children(parent, old, idx, pos)
        m = live_children(pieces)
        if m < 1:
            return 0
        t0 = eng.now
        res = [mem, rcu, *(kvm.vcpus if flush else ())]
        n = 0
        for piece in pieces:
            if n >= m:
                break
            res.append(piece if isinstance(piece, ShadowPage) else piece[0])
            n += 1 if isinstance(piece, ShadowPage) else piece[1]
        if not flush:
            def apply(k: int) -> None:
                tdp.unlink_children(th, pieces, k, t0 + cost * np.arange(k, dtype=np.int64),
                                    shared)

            k = yield Bulk((m, cost), apply, res)
            return k
        # 5.17: two steps per child, the flush request (f) and the child's cost
        f = kvm.request_cost()
        later = []

        def apply_flushing(k: int) -> None:
            started, flushed = (k + 1) // 2, k // 2
            at = t0 + (f + cost) * np.arange(started, dtype=np.int64)
            later[:] = tdp.unlink_children(th, pieces, started, at, shared, queue=flushed)
            kvm.account_idle_flushes(th, started, at[:flushed] + f)

        k = yield Bulk(Repeat(Seq((Run(1, f), Run(1, cost))), m), apply_flushing, res)
        if k % 2:
            # cut after a child's flush request: the rest of that child, as exact mode
            kvm.observe("remote_flush", t=eng.now, task=th.name)
            tdp.free_children(later, 1)
            yield cost
        return (k + 1) // 2

    return handle_removed_kids
