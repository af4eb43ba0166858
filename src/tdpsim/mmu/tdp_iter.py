"""The TDP iterator (arch/x86/kvm/mmu/tdp_iter.c), same semantics in 5.17 and 5.18.

A pre-order walk over a root's paging structure for ``[start, end)``, descending to
``min_level``.  It reads SPTEs itself (as the kernel does), so a walk that reaches a freed
page table sees the poison and reports it.

Yield/restart contract (spec s2): a caller that yields sets ``yielded`` (through
``tdp_mmu_iter_cond_resched``) and must not touch the SPTE; the next ``next()`` restarts from
the root at ``next_last_level_gfn``.  Forward progress: a yield is only allowed when
``next_last_level_gfn != yielded_gfn``.
"""

from __future__ import annotations

from itertools import count
from typing import TYPE_CHECKING

from .spte import (SPTE_ENTRIES, is_last_spte, is_shadow_present_pte, pages_per_hpage,
                   round_gfn_for_level, spte_index, spte_to_pfn)

if TYPE_CHECKING:
    from .page import PageTables, ShadowPage


class TdpIter:
    """``struct tdp_iter``.  Use: ``it = TdpIter(pt, root, min_level, start)`` then
    ``while it.valid and it.gfn < end: ...; it.next()``."""

    __slots__ = ("pt", "next_last_level_gfn", "yielded_gfn", "pt_path", "sp", "index", "gfn",
                 "root_level", "min_level", "level", "as_id", "old_spte", "valid", "yielded",
                 "root", "serial")

    _serials = count()

    def __init__(self, pt: "PageTables", root: "ShadowPage", min_level: int, start: int):
        self.serial = next(TdpIter._serials)   # identifies one walk (for the progress oracle)
        self.pt = pt
        self.root = root
        self.pt_path: list = [None] * (root.level + 1)
        self.pt_path[root.level] = root
        self.root_level = root.level
        self.min_level = min_level
        self.as_id = root.as_id
        self.next_last_level_gfn = start
        self.yielded = False
        self.restart()

    # the SPTE the iterator points at: (table, index)
    @property
    def sptep(self) -> tuple["ShadowPage", int]:
        return self.sp, self.index

    def _read(self) -> None:
        sp = self.sp
        if sp.bulks:      # a fast-mode bulk may be writing this entry: settle it first
            # (a read: bulks that only read the entry stay; every write of an entry settles
            # as a writer first, in TdpMmu.touch)
            self.pt.host.engine.settle(sp, self.index, self.index + 1, read=True)
        if sp.freed:
            # reading a freed table: poison looks like present leaves, so say it here
            self.pt.host.report("use_after_free", None, pfn=sp.pfn,
                                what=f"tdp_iter read of freed L{sp.level} table", reused=False,
                                now_owner=None)
            self.valid = False
        self.old_spte = int(sp.spt[self.index])

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
        sp = self.pt.lookup(spte_to_pfn(spte))
        if sp is None:
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
        while True:
            if self.try_step_side():
                return
            if not self.try_step_up():
                break
        self.valid = False
