"""Accelerator of handle_removed_pt's loop over the children of a removed table.

Exact mode, per child (``TdpMmu.handle_removed_pt`` on it): unlink it, freeze its entries,
zap its leaves (statistics, the dirty/accessed write-back of each), call_rcu(free) and,
on 5.17, flush its range; then one step of its cost.  For a run of consecutive children
that are plain full leaf tables (``PageTableStore.removable_children``: 512 present
leaves, nothing frozen or pending), the bulk does the same, one step of
``512 * spte_zap_4k`` per child, applied through ``TdpMmu.unlink_children``.  A
compressed store hands tables it keeps as runs over as whole runs, so the bulk costs per
run there; the bulk itself is the same for every store.

What it does not model stops it before the child concerned and the exact path takes
over: 5.17's flush per table (a remote TLB flush is many events); no RCU grace period
running (the first call_rcu would start one at its own time); a leaf whose host page is
not live (the write-back reports it at its time).  Resources: the children (tables as
SPs, runs as records: touching one settles the bulk), host memory (a free could kill a
leaf's page) and RCU (a grace period that starts or ends sees exactly the callbacks
queued before it).  The loop checks neither need_resched nor mmu_lock contention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

import numpy as np

from ..mmu import spte as S
from ..mmu.page import ShadowPage
from ..sim.engine import Bulk

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

    def handle_removed_kids(th, parent, old, idx: list[int], pos: int,
                            shared: bool) -> Generator:
        cost = S.SPTE_ENTRIES * tdp.costs.spte_zap_4k
        if not tdp.policy.deferred_flush or not rcu.gp_running or cost <= 0 or \
                parent.level != 2:
            return 0
        pieces = pt.removable_children(parent, old, idx, pos)
        m = live_children(pieces)
        if m < 1:
            return 0
        t0 = eng.now
        res = [mem, rcu]
        n = 0
        for piece in pieces:
            if n >= m:
                break
            res.append(piece if isinstance(piece, ShadowPage) else piece[0])
            n += 1 if isinstance(piece, ShadowPage) else piece[1]

        def apply(k: int) -> None:
            tdp.unlink_children(th, pieces, k, t0 + cost * np.arange(k, dtype=np.int64),
                                shared)

        k = yield Bulk((m, cost), apply, res)
        return k

    return handle_removed_kids
