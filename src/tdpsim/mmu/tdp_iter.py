"""The TDP iterator (arch/x86/kvm/mmu/tdp_iter.c), same semantics in 5.17 and 5.18, and
the one walker of the project.

A pre-order walk over a paging structure for ``[start, end)``, descending to
``min_level``.  It reads SPTEs through the page-table store (as the kernel reads them
itself), so a walk that reaches a freed page table sees the poison and reports it.  Every
walk in tdpsim is a ``TdpIter``: the TDP MMU's loops, the fault path, the hardware walker
(started at a cached PDE), the fast-path accelerators' planning, the oracles and the
harness (the last three with ``report=False``: a walk that only looks must not report).

Yield/restart contract (spec s2): a caller that yields sets ``yielded`` (through
``tdp_mmu_iter_cond_resched``) and must not touch the SPTE; the next ``next()`` restarts from
the root at ``next_last_level_gfn``.  Forward progress: a yield is only allowed when
``next_last_level_gfn != yielded_gfn``.
"""

from __future__ import annotations

from itertools import count
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .spte import (SPTE_ENTRIES, is_last_spte, is_shadow_present_pte, pages_per_hpage,
                   present_mask, round_gfn_for_level, spte_index,
                   spte_to_pfn)

if TYPE_CHECKING:
    from .page import ShadowPage
    from .store import PageTableStore


class TdpIter:
    """``struct tdp_iter``.  Use: ``it = TdpIter(store, root, min_level, start)`` then
    ``while it.valid and it.gfn < end: ...; it.next()``.  ``root`` may be any table (the
    hardware walker starts at a cached level-1 table)."""

    __slots__ = ("pt", "next_last_level_gfn", "yielded_gfn", "pt_path", "sp", "index", "gfn",
                 "root_level", "min_level", "level", "as_id", "old_spte", "valid", "yielded",
                 "root", "serial", "report")

    _serials = count()

    def __init__(self, pt: "PageTableStore", root: "ShadowPage", min_level: int, start: int,
                 report: bool = True):
        self.serial = next(TdpIter._serials)   # identifies one walk (for the progress oracle)
        self.pt = pt
        self.root = root
        self.report = report
        self.pt_path: list = [None] * (root.level + 1)
        self.pt_path[root.level] = root
        self.root_level = root.level
        self.min_level = min_level
        self.as_id = root.as_id
        self.next_last_level_gfn = start
        self.yielded = False
        self.restart()

    def _read(self) -> None:
        sp = self.sp
        if sp.freed and self.report:
            # reading a freed table: poison looks like present leaves, so say it here
            self.pt.host.report("use_after_free", None, pfn=sp.pfn,
                                what=f"tdp_iter read of freed L{sp.level} table", reused=False,
                                now_owner=None)
            self.valid = False
        self.old_spte = self.pt.read(sp, self.index)

    def restart(self) -> None:
        """tdp_iter_restart: walk again from the root towards next_last_level_gfn."""
        self.yielded = False
        self.yielded_gfn = self.next_last_level_gfn
        self.level = self.root_level
        self.gfn = round_gfn_for_level(self.next_last_level_gfn, self.level)
        self.sp = self.root
        self.index = spte_index(self.gfn, self.level)
        self._read()
        self.valid = True

    def _child(self, spte: int):
        sp = self.pt.child(spte)
        if sp is None and self.report:
            # a present non-leaf entry that does not point to a live page table: the walk
            # read a freed (poisoned) table or a stale entry
            self.pt.host.report("use_after_free", None, pfn=spte_to_pfn(spte),
                                what="tdp_iter step down", reused=False, now_owner=None)
        return sp

    def try_step_down(self) -> bool:
        if self.level == self.min_level:
            return False
        # re-read: the SPTE may have been zapped since it was first read
        self._read()
        spte = self.old_spte
        if not is_shadow_present_pte(spte) or is_last_spte(spte, self.level):
            return False
        child = self._child(spte)
        if child is None:
            return False
        self.level -= 1
        self.pt_path[self.level] = child
        self.sp = child
        self.gfn = round_gfn_for_level(self.next_last_level_gfn, self.level)
        self.index = spte_index(self.gfn, self.level)
        self._read()
        return True

    def try_step_side(self) -> bool:
        if self.index == SPTE_ENTRIES - 1:
            return False
        self.gfn += pages_per_hpage(self.level)
        self.next_last_level_gfn = self.gfn
        self.index += 1
        self._read()
        return True

    def try_step_up(self) -> bool:
        if self.level == self.root_level:
            return False
        self.level += 1
        self.gfn = round_gfn_for_level(self.gfn, self.level)
        self.sp = self.pt_path[self.level]
        self.index = spte_index(self.gfn, self.level)
        self._read()
        return True

    def next(self) -> None:
        """tdp_iter_next: pre-order step (restart from the root after a yield)."""
        if self.yielded:
            self.restart()
            return
        if self.try_step_down():
            return
        self.step_over()

    def step_over(self) -> None:
        """The entry after the current one and its subtree (``next`` without stepping
        down): for a look-only walk that accounted for the subtree itself."""
        while True:
            if self.try_step_side():
                return
            if not self.try_step_up():
                break
        self.valid = False

    # ---- the rest of a table at once (vectorised walks) -------------------------------------

    def table_end(self, end: int) -> int:
        """Index one past the last entry of the current table that a walk to ``end`` visits
        (as side steps) from the current entry."""
        span = pages_per_hpage(self.level)
        return min(SPTE_ENTRIES, self.index + -(-(end - self.gfn) // span))

    def step_side_to(self, index: int) -> None:
        """Stand on entry ``index`` of the current table, as ``index - self.index`` side
        steps would have left the iterator (the caller has processed the entries between)."""
        k = index - self.index
        if k:
            self.gfn += k * pages_per_hpage(self.level)
            self.next_last_level_gfn = self.gfn
            self.index = index
        self._read()


# ---- walks built on the iterator (look, never yield) -----------------------------------------

def for_each_leaf(pt: "PageTableStore", root: "ShadowPage", start: int, end: int,
                  min_level: int = 1, report: bool = True) -> Iterator[TdpIter]:
    """The iterator at each present leaf of ``root`` in [start, end) at or above
    ``min_level`` (for_each_tdp_pte_min_level, skipping non-leaf and non-present entries)."""
    it = TdpIter(pt, root, min_level, start, report)
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
            yield it
        it.next()


def _skip_absent(pt: "PageTableStore", it: TdpIter, end: int) -> None:
    """On an absent entry of an upper-level table: stand on the last entry before the
    next present one of the table (or on the last the walk visits), as side steps would,
    so that ``next`` goes on from there (look-only walks skip empty stretches at once)."""
    hi = it.table_end(end)
    pres = np.flatnonzero(present_mask(pt.entries(it.sp, it.index, hi)))
    it.step_side_to(it.index + int(pres[0]) - 1 if len(pres) else hi - 1)


def count_leaves(pt: "PageTableStore", root: "ShadowPage", g0: int, g1: int) -> int:
    """Present leaves of ``root`` mapping a gfn in [g0, g1) (REMOVED excluded).  A table
    the store keeps in a run of full tables counts without being walked."""
    n = 0
    it = TdpIter(pt, root, 1, g0, report=False)
    while it.valid and it.gfn < g1:
        if it.level == 1:
            hi = it.table_end(g1)
            ents = pt.entries(it.sp, it.index, hi)
            n += int(present_mask(ents).sum())
            it.step_side_to(hi - 1)
        elif is_shadow_present_pte(it.old_spte):
            if is_last_spte(it.old_spte, it.level):
                n += 1
            elif it.level == 2 and pt.run_child(it.sp, it.index):
                n += min(g1, it.gfn + SPTE_ENTRIES) - max(g0, it.gfn)
                it.step_over()
                continue
        else:
            _skip_absent(pt, it, g1)
        it.next()
    return n


def count_present(pt: "PageTableStore", root: "ShadowPage") -> int:
    """Present entries (leaves and tables, REMOVED excluded) anywhere under ``root``."""
    n = 0
    it = TdpIter(pt, root, 1, 0, report=False)
    end = pages_per_hpage(root.level + 1)
    while it.valid and it.gfn < end:
        if it.level == 1:
            hi = it.table_end(end)
            n += pt.count_present(it.sp, it.index, hi)
            it.step_side_to(hi - 1)
        elif is_shadow_present_pte(it.old_spte):
            n += 1
            if it.level == 2 and not is_last_spte(it.old_spte, 2) and \
                    pt.run_child(it.sp, it.index):
                n += SPTE_ENTRIES           # a full table kept in a run
                it.step_over()
                continue
        else:
            _skip_absent(pt, it, end)
        it.next()
    return n
