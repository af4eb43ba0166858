"""Safety oracles (architecture s5), checked while the simulation runs.

A ``Checker`` listens to the host's reports and the VM's observations.  Each violation
becomes a ``Finding``: its kind, the simulated time, the task, the details, and an excerpt
of the events that led to it (the last ``EXCERPT`` observations and reports, kept in a ring
buffer so the check stays cheap enough to leave on).

Excerpts leave out guest accesses and page-table unlinks (``NOT_IN_EXCERPT``).

Invariants checked, and where:

* **stale translation**: when an mmu_notifier invalidation's start hook returns (KVM has
  zapped and flushed), no root may still map a gfn of the range and no vCPU TLB may hold
  one; a guest access through a TLB entry filled before a completed invalidation of its
  gfn (notifier, memslot deletion, kvm_zap_gfn_range) is a finding;
* **page-table use after free**: a hardware walk or a software walk reading a freed table
  (reported by the walkers); a table freed before it was unlinked; a non-root table freed
  while a vCPU in guest mode on that root has not flushed since the unlink (checked per
  batch for tables a compressed store freed as a run, per table where it fails);
* **host page use after free**: an A/D write-back or a guest access to a freed page
  (reported by the host allocator);
* **roots**: refcount underflow, a root freed twice, an invalid root gaining an SPTE, a
  reader (mmu_lock held for read) taking a reference to an invalid root (5.18 rule),
  ``kvm_mmu_zap_all_fast`` returning while an invalid root still has entries;
* **REMOVED** written by a thread other than its freezer; a yield without forward
  progress (two yields of one walk at the same gfn);
* every kernel WARN the model raises (``warn`` reports, spec s3.7).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np

from ..kvm.vm import IN_GUEST_MODE, KVM_REQ_TLB_FLUSH
from ..mmu.tdp_iter import count_leaves, count_present

if TYPE_CHECKING:
    from ..host.host import Host
    from ..kvm.vm import Kvm

EXCERPT = 24
#: observations kept out of excerpts: guest accesses (one per access) and page-table
#: unlinks (one per table, 512 per 1 GiB torn down: they would fill every excerpt)
NOT_IN_EXCERPT = frozenset({"guest_accesses", "sp_unlinked", "sps_unlinked"})

_UNSEEN = object()

#: observations of many at once, put into excerpts one entry each by their handlers
_BATCHES = frozenset({"sps_freed", "remote_flushes"})

#: host report kinds that are findings (the rest are monitor material)
FINDING_REPORTS = {"warn", "use_after_free", "double_free", "refcount_underflow",
                   "invalid_root_gains_spte", "removed_written_by_non_owner"}


@dataclass
class Finding:
    kind: str
    t: int
    task: str | None
    details: dict
    excerpt: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "t": self.t, "task": self.task, "details": self.details,
                "excerpt": self.excerpt}

    def __str__(self) -> str:
        det = ", ".join(f"{k}={v}" for k, v in self.details.items())
        return f"[{self.t} ns] {self.kind} ({self.task}): {det}"


class Checker:
    """Attach to a host and a VM; ``findings`` fills up as the run goes."""

    def __init__(self, host: "Host", kvm: "Kvm"):
        self.host = host
        self.kvm = kvm
        self.findings: list[Finding] = []
        self.recent: deque = deque(maxlen=EXCERPT)
        #: completed invalidations: (completion time, first gfn, end gfn)
        self.invalidated: list[tuple[int, int, int]] = []
        self._last_yield: dict[str, int] = {}
        #: observation kind -> its handler (None: none), looked up once per kind
        self._handlers: dict = {}
        host.listen(self._on_report)
        kvm.observers.append(self._on_observe)

    # ---- plumbing -------------------------------------------------------------------------

    def _find(self, kind: str, task: str | None, **details) -> None:
        f = Finding(kind, self.host.engine.now, task, details, list(self.recent))
        self.findings.append(f)

    def _on_report(self, rec: dict) -> None:
        self.recent.append(("report", rec["t"], rec["kind"], rec.get("task")))
        if rec["kind"] in FINDING_REPORTS:
            details = {k: v for k, v in rec.items() if k not in ("t", "kind", "task")}
            self._find(rec["kind"], rec["task"], **details)

    def _on_observe(self, kind: str, **f) -> None:
        t = f.get("t", self.host.engine.now)
        if kind not in NOT_IN_EXCERPT and kind not in _BATCHES:
            self.recent.append(("kvm", t, kind, f.get("task") or _name(f.get("vcpu"))))
        handler = self._handlers.get(kind, _UNSEEN)
        if handler is _UNSEEN:
            handler = self._handlers[kind] = getattr(self, "_on_" + kind, None)
        if handler is not None:
            handler(**f)

    # ---- stale translations ---------------------------------------------------------------

    def _gfn_ranges_of_hva(self, start: int, end: int):
        for as_id in (0, 1):
            for slot, g0, g1 in self.kvm.memslots[as_id].by_hva(start, end):
                yield g0, g1

    def _on_invalidate_start(self, start: int, end: int, t: int, **_) -> None:
        """KVM's invalidate_range_start returned: nothing of the range may be left."""
        for g0, g1 in self._gfn_ranges_of_hva(start, end):
            self._assert_unmapped(g0, g1, "mmu_notifier invalidate_range_start")
            self.invalidated.append((t, g0, g1))

    def _on_memslot_deleted(self, slot, t: int, **_) -> None:
        self._assert_unmapped(slot.base_gfn, slot.end_gfn, "memslot deletion", tlb=False)
        self.invalidated.append((t, slot.base_gfn, slot.end_gfn))

    def _on_zap_gfn_range_done(self, start: int, end: int, t: int, **_) -> None:
        self._assert_unmapped(start, end, "kvm_zap_gfn_range")
        self.invalidated.append((t, start, end))

    def _assert_unmapped(self, g0: int, g1: int, what: str, tlb: bool = True) -> None:
        arch = self.kvm.arch
        for root in arch.tdp.roots:
            n = count_leaves(arch.pt, root, g0, g1)
            if n:
                self._find("stale_translation", None, what=what, root=root.id,
                           gfns=(g0, g1), present_leaves=n)
        if not tlb:
            return
        for v in self.kvm.vcpus:
            if v.bulks:                     # a bulk may owe it a flush request
                self.host.engine.settle(v)
            if KVM_REQ_TLB_FLUSH in v.requests and v.mode != IN_GUEST_MODE:
                continue    # it flushes before it can enter the guest again
            if v.root is None or v.root.invalid:
                continue    # it must load a new root (and flush) before entering again
            stale = [g for g in v.tlb.entries if g0 <= g < g1]
            if stale:
                self._find("stale_translation", v.name, what=f"{what}: TLB not flushed",
                           gfns=(g0, g1), tlb_entries=len(stale))

    def _on_guest_accesses(self, vcpu, acc, **_) -> None:
        """Guest accesses in order (one from the run loop, many from a bulk of it): each
        must use a live host page and, through the TLB, a translation filled after every
        completed invalidation of its gfn."""
        mem = self.host.memory
        if acc.runs is not None:            # walks in closed form: look at freed pages only
            for g0, p0, n, gen in acc.runs:
                j = mem.first_dead(p0, n, gen)
                while j < n:
                    self._find("guest_access_freed_page", vcpu.name, gfn=g0 + j, pfn=p0 + j,
                               via_tlb=False)
                    j += 1
                    j += mem.first_dead(p0 + j, n - j, gen)
            return
        gfns, pfns, gens, tlb = acc.gfns, acc.pfns, acc.gens, acc.via_tlb
        if len(gfns) == 1:
            live = [mem.is_live(int(pfns[0]), int(gens[0]))]
            check = (0,)
        else:
            live = mem.live_mask(pfns, np.asarray(gens))
            # without the TLB only a freed page can be a finding: look at those alone
            check = range(len(gfns)) if tlb else np.flatnonzero(~live).tolist()
        for j in check:
            gfn = int(gfns[j])
            if not live[j]:
                self._find("guest_access_freed_page", vcpu.name, gfn=gfn, pfn=int(pfns[j]),
                           via_tlb=tlb)
                continue
            if tlb:
                fill_t = int(acc.fill_t[j])
                for done_t, g0, g1 in self.invalidated:
                    if fill_t < done_t and g0 <= gfn < g1:
                        self._find("stale_translation", vcpu.name, gfn=gfn,
                                   filled=fill_t, invalidated=done_t,
                                   what="guest access through a TLB entry")
                        break

    # ---- page tables ------------------------------------------------------------------------

    def _on_sp_freed(self, sp, t: int, **_) -> None:
        if not sp.unlinked:
            self._find("pt_freed_while_linked", None, sp=sp.id, level=sp.level)
            return
        if sp.is_root:
            return
        self._freed_before_flush(sp.id, sp.level, sp.root, sp.unlink_t)

    def _freed_before_flush(self, sp_id: int, level: int, root, unlink_t: int) -> None:
        for v in self.kvm.vcpus:
            if v.mode == IN_GUEST_MODE and v.root is root and \
                    v.tlb.last_flush_t < unlink_t:
                self._find("pt_freed_before_flush", v.name, sp=sp_id, level=level,
                           unlinked=unlink_t)

    def _on_sps_freed(self, tables, t: int, **_) -> None:
        """The frees of a batch of tables unlinked together (a run), in order: the checks
        of ``sp_freed`` for each (each unlinked; freed after every vCPU running on their
        root flushed), per table only where one fails."""
        vs = [v for v in self.kvm.vcpus if v.mode == IN_GUEST_MODE and v.root is tables.root]
        flushed = min((v.tlb.last_flush_t for v in vs), default=None)
        if flushed is None or flushed >= int(tables.unlink_t.max()):
            self.recent.extend(repeat(("kvm", t, "sp_freed", None), min(tables.n, EXCERPT)))
            return
        for k in range(tables.n):
            self.recent.append(("kvm", t, "sp_freed", None))
            self._freed_before_flush(tables.id0 + k, tables.level, tables.root,
                                     int(tables.unlink_t[k]))

    def _on_remote_flushes(self, times, task: str, **_) -> None:
        """Remote TLB flushes that a bulk made back to back (``remote_flush`` each)."""
        for t in times[-EXCERPT:].tolist():
            self.recent.append(("kvm", t, "remote_flush", task))

    # ---- roots ------------------------------------------------------------------------------

    def _on_reader_ref_invalid_root(self, root, task: str, **_) -> None:
        self._find("reader_ref_invalid_root", task, root=root.id)

    def _on_zap_all_fast_done(self, task: str, **_) -> None:
        arch = self.kvm.arch
        for root in arch.tdp.roots:
            if root.invalid:
                n = count_present(arch.pt, root)
                if n:
                    self._find("zap_all_fast_returned_early", task, root=root.id,
                               present_entries=n)

    def _on_yield(self, task: str, gfn: int, it_id: int, **_) -> None:
        key = f"{task}:{it_id}"
        if self._last_yield.get(key) == gfn:
            self._find("yield_without_progress", task, gfn=gfn)
        self._last_yield[key] = gfn

    # ---- results -------------------------------------------------------------------------------

    def verdict(self) -> str:
        return "clean" if not self.findings else f"{len(self.findings)} finding(s)"


def _name(v) -> str | None:
    return getattr(v, "name", None)
