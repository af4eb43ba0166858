"""Accelerator of the vCPU run loop (``vcpu_enter_guest`` / KVM_RUN, kvm/vcpu.py) while
the guest touches memory: the selftests' populate phases.

``run_bulk`` replaces a run of a vCPU's run-loop steps (Vcpu.run) with one ``Bulk``: the
guest touching consecutive pages of one 1 GiB region (one level-2 table) of a 4 KiB-mapped
memslot.  Exact mode spends, per page:

* a present leaf with the needed permission, not in the TLB: one step (the access walks,
  sets A/D, fills the TLB and the PDE cache), cost ``guest_access``;
* an absent leaf: three steps: the access misses and exits, fault phase 1 (``fault_4k//4``);
  fault phase 2 maps the page, allocating the 4 KiB table on the region's first fault
  (``fault_4k - fault_4k//4`` + ``sp_alloc``); the retried access (``guest_access``).

The bulk plans the same sequence for every page the guest will touch before the
need_resched deadline and applies its effects lazily (see ``Engine.settle``) through the
owners' batch operations: the vCPU's statistics and observations, the mm's accessed bits,
mmu_lock's statistics, the TDP MMU's tables and leaves, the store's A/D bits, the TLB.
Resources: the vCPU (requests, guest mode), its CPU (need_resched), mmu_lock (a writer
would block phase 2), the level-2 table and the existing 4 KiB tables of the region
(another task reading or writing them).  Anything the bulk does not model exactly stops it
before the page concerned, and the exact path takes over: huge mappings, a read-only leaf
for a write, a REMOVED or huge entry, a TLB hit, a stale PDE-cache entry, a missing host
PTE, dirty logging, a missing level-2 table, an invalidation in progress.

``_huge_bulk`` does the same for accesses through present huge leaves (``-H``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

import numpy as np

from ..host.mm import PAGE
from ..kvm.vcpu import Accesses, TouchGuest
from ..mmu import spte as S
from ..mmu.page import ROLE_CR0_WP, make_role
from ..mmu.store import LeafRows
from ..sim.engine import Bulk
from ..sim.steps import Costs
from .fresh import FreshSpans

if TYPE_CHECKING:
    from ..kvm.vm import Kvm

REGION_SHIFT = 18          # one level-2 table covers 2^18 4 KiB pages (1 GiB)
PLAN_WINDOW = 4096         # pages planned at first by a populate bulk (widened as needed)
#: pages a populate bulk plans at most (its arrays live until it is applied: with many
#: vCPUs in bulks at once, this bounds the memory)
PLAN_MAX = 1 << 16
U64 = np.uint64


class Populate:
    """The accelerator of one VM's vCPU run loops (``kvm.accel["vcpu_run"]``)."""

    def __init__(self, kvm: "Kvm"):
        self.kvm = kvm
        self.tdp = kvm.arch.tdp
        self.fresh = FreshSpans(self)

    # ---- planning ------------------------------------------------------------------------

    def slot_for(self, gfn: int, write: bool):
        """The memslot of ``gfn`` if populate bulks may touch it: valid, not logging dirty
        pages, writable for a write (the rest is the exact path's); None if not."""
        slot = self.kvm.memslots[0].find(gfn)
        if slot is None or slot.invalid or slot.dirty_logging or (write and slot.readonly):
            return None
        return slot

    def table_at(self, root, gfn: int, level: int):
        """The table at ``level`` on the path to ``gfn`` (None if not all linked)."""
        it = self.tdp.pt.walk(root, level, gfn, report=False)
        while it.level > level:
            if not it.try_step_down():
                return None
        return it.sp

    def run_bulk(self, vcpu, th, guest) -> Generator:
        """One bulk of the vCPU run loop; returns the number of steps done (0: none)."""
        if not isinstance(guest, TouchGuest):
            return 0
        kvm = self.kvm
        root = vcpu.root
        lock = kvm.mmu_lock
        if root is None or root.invalid or vcpu.requests or lock.writer is not None \
                or lock.queue or kvm.mmu_notifier_count or vcpu.fault is not None:
            return 0
        gfn0, write = guest.current()[:2]
        slot = self.slot_for(gfn0, write)
        if slot is None:
            return 0
        if slot.host_level_pages > 1:
            return (yield from self._huge_bulk(vcpu, th, guest, gfn0, write))
        bulk = self.fresh.bulk(vcpu, th, guest, write)
        if bulk is not None:                # untouched memory: the closed form
            k = yield bulk
            return k
        l2 = self.table_at(root, gfn0, 2)
        if l2 is None:
            return 0
        stride = guest.stride
        region_end = ((gfn0 >> REGION_SHIFT) + 1) << REGION_SHIFT
        limit = min(region_end, slot.end_gfn)
        n_all = min(guest.n - guest.pos, -(-(limit - gfn0) // stride))
        # Plan a window of pages, widened while the bulk would run to its end before
        # need_resched: a plan is a prefix of the plan of a wider window, so the bulk is the
        # same, and arrays stay the size of what the bulk can reach (memory, and time when
        # need_resched comes often).  The window starts as wide as the deadline allows.
        n_all = min(n_all, PLAN_MAX)
        # every page costs at least one guest access: no more pages than that can start
        # before need_resched, so a window that wide is planned once
        ga = kvm.costs.guest_access
        room = th.host.sched.need_resched_at(th.cpu) - kvm.engine.now
        reach = room // ga + 1 if ga > 0 and room > 0 else 0
        n = min(n_all, max(PLAN_WINDOW, reach))
        while True:
            p = self._plan(vcpu, th, guest, slot, l2, root, gfn0, write, stride, n)
            if p is None:
                return 0
            bulk, whole = p
            if not whole or n == n_all:
                break
            n = min(n_all, 4 * n)
        k = yield bulk
        return k

    def _huge_bulk(self, vcpu, th, guest, gfn0: int, write: bool) -> Generator:
        """Accesses through a present huge leaf (hugetlb backing, ``-H``): each page of the
        huge page is a TLB miss whose walk finds the leaf with A (and D) already set, so it
        changes nothing but the TLB: one ``guest_access`` step per page.  Anything else
        (absent leaf, A/D to set, a TLB hit, a freed host page) is left to the exact path."""
        kvm = self.kvm
        eng = kvm.engine
        pt = self.tdp.pt
        it = pt.walk(vcpu.root, 1, gfn0, report=False)   # the walk hw_walk does, reading
        path = []
        while True:
            e = it.old_spte
            if not S.is_shadow_present_pte(e):
                return 0
            path.append((it.sp, it.index, it.index + 1, 0, 0))   # read, never written
            if S.is_last_spte(e, it.level):
                break
            if it.level == 2 or not it.try_step_down():
                return 0                         # 4 KiB leaves: the populate bulk's job
        sp, i, level = it.sp, it.index, it.level
        need = S.SHADOW_ACCESSED | ((S.EPT_W | S.SHADOW_DIRTY) if write else 0)
        if (e & need) != need:
            return 0
        span = S.pages_per_hpage(level)
        stride = guest.stride
        end = (gfn0 & -span) + span
        n = min(guest.n - guest.pos, -(-(end - gfn0) // stride))
        gfns = gfn0 + stride * np.arange(n, dtype=np.int64)
        in_tlb = vcpu.tlb.gfns_in(gfn0, int(gfns[-1]) + 1)
        if in_tlb:
            n = _cut(n, np.isin(gfns, np.array(in_tlb, dtype=np.int64)))
        gen = pt.gen(sp, i)
        pfns = S.spte_to_pfn(e) + (gfns[:n] & (span - 1))
        mem = kvm.host.memory
        n = _cut(n, ~mem.live_mask(pfns, np.full(n, gen, dtype=np.uint32)))
        ga = kvm.costs.guest_access
        room = th.host.sched.need_resched_at(th.cpu) - eng.now
        m = min(n, (room - 1) // ga + 1) if room > 0 else 0
        if m < 1:
            return 0
        t0 = eng.now
        tlb = vcpu.tlb
        writable, executable = bool(e & S.EPT_W), bool(e & S.EPT_X)

        def apply(k: int) -> None:
            times = t0 + ga * np.arange(k, dtype=np.int64)
            gens = np.full(k, gen, dtype=np.uint32)
            tlb.count_misses(k)
            tlb.fill_many(gfns[:k], pfns[:k], gens, times, writable, write, level, executable)
            vcpu.observe_accesses(Accesses(gfns[:k], pfns[:k], gens, times, False, write))
            guest.advance(k)
            vcpu.enter_guest()

        k = yield Bulk((m, ga), apply, [vcpu, th.cpu, mem, *path])
        return k

    def _plan(self, vcpu, th, guest, slot, l2, root, gfn0, write, stride, n):
        """The bulk for the next ``n`` pages at most, and whether it does all of them."""
        kvm = self.kvm
        eng = kvm.engine
        lock = kvm.mmu_lock
        n_req = n
        gfns = gfn0 + stride * np.arange(n, dtype=np.int64)
        # host PTEs (phase 1 resolves them; a missing one would allocate: exact path)
        hvas = slot.userspace_addr + (gfns - slot.base_gfn) * PAGE
        vma = kvm.mm.find_vma(int(hvas[0]))
        if vma is None:
            return None
        idx = (hvas - vma.start) // PAGE
        n = _cut(n, idx >= vma.npages)
        idx = idx[:n]
        pfns, pte_gens = vma.ptes(idx)    # other bulks never change PTEs: no settle needed
        n = _cut(n, pfns < 0)
        # TLB entries: a hit is not modelled in bulk
        tlb = vcpu.tlb
        if n:
            in_tlb = tlb.gfns_in(int(gfns[0]), int(gfns[n - 1]) + 1)
            if in_tlb:
                n = _cut(n, np.isin(gfns[:n], np.array(in_tlb, dtype=np.int64)))
        if n <= 0:
            return None
        gfns, idx = gfns[:n], idx[:n]
        # leaf tables of the 2 MiB regions touched: pages come in ascending gfn order, so
        # each PDE is one contiguous segment [seg_lo, seg_hi) of the page arrays
        pdes = (gfns >> 9) & 511
        seg_lo = np.concatenate(([0], np.flatnonzero(np.diff(pdes)) + 1))
        seg_pde = pdes[seg_lo]
        seg_hi = np.append(seg_lo[1:], n)
        leaf_tables: dict[int, object] = {}
        nseg = int(np.searchsorted(seg_lo, n, side="left"))     # segments that start < n
        pt = self.tdp.pt
        if nseg:
            ents = pt.entries_at(l2, seg_pde[:nseg], int(seg_pde[0]),
                                 int(seg_pde[nseg - 1]) + 1)
            g_lo = gfns[seg_lo[:nseg]]
            psc2 = tlb.psc.get(2) or {}
            # segments with an existing table or a PDE-cache entry need a look; the others
            # (no table yet, nothing cached) are fine as they are
            look = ents != 0
            if psc2:
                look |= np.isin(g_lo >> 9, np.fromiter(psc2, dtype=np.int64, count=len(psc2)))
            stop = nseg
            found = {}
            for s_i in np.flatnonzero(look).tolist():
                e, g0 = int(ents[s_i]), int(g_lo[s_i])
                sp = None
                if e != 0:
                    if not S.is_shadow_present_pte(e) or S.is_large_pte(e):
                        stop = s_i
                        break
                    sp = pt.lookup(S.spte_to_pfn(e))
                    g1 = int(gfns[seg_hi[s_i] - 1])
                    pt.claim(sp, g0 & 511, (g1 & 511) + 1)
                # the PDE cache must not point at another table
                c = psc2.get(g0 >> 9)
                if c is not None and (sp is None or c != sp.pfn):
                    stop = s_i
                    break
                found[int(seg_pde[s_i])] = sp
            if stop < nseg:
                n = int(seg_lo[stop])
            leaf_tables = dict.fromkeys(seg_pde[:stop].tolist())
            leaf_tables.update(found)
        if n <= 0:
            return None
        gfns, idx, pdes = gfns[:n], idx[:n], pdes[:n]
        nseg = len(leaf_tables)
        seg_pde, seg_lo = seg_pde[:nseg], seg_lo[:nseg]
        seg_hi = np.minimum(np.append(seg_lo[1:], n), n)
        # the leaf entries
        cur = np.zeros(n, dtype=np.uint64)
        for s_i, pde in enumerate(seg_pde.tolist()):
            sp = leaf_tables[pde]
            if sp is not None:
                lo_j, hi_j = int(seg_lo[s_i]), int(seg_hi[s_i])
                ii = gfns[lo_j:hi_j] & 511
                cur[lo_j:hi_j] = pt.entries_at(sp, ii, int(ii[0]), int(ii[-1]) + 1)
        present = S.present_mask(cur)
        ok_present = present & ((cur & U64(S.PT_PAGE_SIZE_MASK)) == 0)
        if write:
            ok_present &= (cur & U64(S.EPT_W)) != 0
        odd = (cur != 0) & ~ok_present
        n = _cut(n, odd)
        if n <= 0:
            return None
        gfns, idx, pdes, absent = gfns[:n], idx[:n], pdes[:n], ~present[:n]
        nseg = int(np.searchsorted(seg_lo, n, side="left"))
        seg_pde, seg_lo = seg_pde[:nseg], seg_lo[:nseg]
        seg_hi = np.minimum(np.append(seg_lo[1:], n), n)
        leaf_tables = {p: leaf_tables[p] for p in seg_pde.tolist()}
        # ---- the step sequence and its costs ----
        costs = kvm.costs
        c1 = costs.fault_4k // 4
        c2 = costs.fault_4k - c1
        ga = costs.guest_access
        steps = np.where(absent, 3, 1)
        first_step = np.concatenate(([0], np.cumsum(steps)[:-1]))
        total = int(steps.sum())
        cost = np.full(total, ga, dtype=np.int64)
        a_idx = first_step[absent]
        cost[a_idx] = c1
        cost[a_idx + 1] = c2
        # the region's first page (all absent: no table) allocates the missing 4 KiB table
        alloc_page = {}
        for s_i, pde in enumerate(seg_pde.tolist()):
            if leaf_tables[pde] is None:
                j = int(seg_lo[s_i])
                alloc_page[pde] = j
                cost[first_step[j] + 1] += costs.sp_alloc
        # iterations must start before need_resched can turn true
        room = th.host.sched.need_resched_at(th.cpu) - eng.now
        cum = np.cumsum(cost)
        timeline = Costs.from_cum(cum)
        m = timeline.started_before(room)
        if m <= 1:
            return None
        plan = _Plan(self, vcpu, th, guest, slot, vma, l2, leaf_tables, alloc_page, gfns, idx,
                     pfns[:n], pte_gens[:n], pdes, absent, steps, first_step, write, root,
                     seg_pde, seg_lo, seg_hi, cost)
        mp = m_pages(first_step, m)               # pages the bulk reaches
        im = idx[:mp]
        # level-2 entries: read for every PDE reached, written only where a table is added
        # (so vCPUs sharing a boundary PDE do not cut each other's bulks once it exists)
        allocs = [pde for pde, j in alloc_page.items() if j < mp]
        wlo, whi = (min(allocs), max(allocs) + 1) if allocs else (0, 0)
        resources = [vcpu, th.cpu, lock, kvm.memslots[0], kvm.host.memory,
                     (vma, int(im.min()), int(im.max()) + 1),
                     (l2, int(pdes[0]), int(pdes[mp - 1]) + 1, wlo, whi)]
        for s_i, pde in enumerate(seg_pde.tolist()):
            sp = leaf_tables[pde]
            lo_j, hi_j = int(seg_lo[s_i]), min(int(seg_hi[s_i]), mp)
            if sp is not None and lo_j < hi_j:
                resources.append((sp, int(gfns[lo_j]) & 511, (int(gfns[hi_j - 1]) & 511) + 1))
        plan.cum = cum
        bulk = Bulk(timeline.prefix(m), plan.apply, resources)
        return bulk, n == n_req and m == total


def m_pages(first_step: np.ndarray, m: int) -> int:
    """Number of pages whose first step is among the first m steps."""
    return int(np.searchsorted(first_step, m, side="left"))


def _cut(n: int, bad: np.ndarray) -> int:
    """Length of the prefix of the first n items with no ``bad`` item."""
    bad = bad[:n]
    if bad.any():
        return int(np.argmax(bad))
    return n


class _Plan:
    """The effects of the first k steps of a populate bulk (Bulk.apply), applied through
    the owners' batch operations."""

    def __init__(self, fp, vcpu, th, guest, slot, vma, l2, leaf_tables, alloc_page, gfns, idx,
                 pfns, pte_gens, pdes, absent, steps, first_step, write, root, seg_pde, seg_lo,
                 seg_hi, cost):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.t0 = fp.kvm.engine.now

    def apply(self, k: int) -> None:
        fp, vcpu, kvm = self.fp, self.vcpu, self.fp.kvm
        tdp = fp.tdp
        gfns, absent, first_step, steps = self.gfns, self.absent, self.first_step, self.steps
        done = np.clip(k - first_step, 0, steps)           # steps done per page
        n = len(gfns)
        full = done == steps
        npages = int(np.argmin(full)) if not full.all() else n   # pages fully done (prefix)
        a_done = absent & (done >= 1)
        b_done = absent & (done >= 2)
        vma = self.vma
        # fault phase 1: exits, faults taken, host PTE accessed; phase 2: faults fixed
        na = int(a_done.sum())
        nb = int(b_done.sum())
        vcpu.account(exits=na, pf_taken=na, pf_fixed=nb)
        kvm.mm.mark_young(vma, self.idx[a_done])
        # fault phase 2: tables, leaves (mmu_lock read taken and dropped each time)
        kvm.mmu_lock.account_uncontended_reads(nb)
        role1 = make_role(1, self.slot.as_id, bool(self.root.role & ROLE_CR0_WP))
        new = [pde for pde, j in sorted(self.alloc_page.items(), key=lambda x: x[1])
               if b_done[j]]
        segs = list(zip(self.seg_pde.tolist(), self.seg_lo.tolist(), self.seg_hi.tolist()))
        full, full_at = [], []  # new tables filled whole: installed with their leaves
        rest = []           # (table, entries, leaves) installed into an existing SP
        if nb:
            sel = np.flatnonzero(b_done)
            vals = S.make_4k_sptes(self.pfns[sel], writable=not self.slot.readonly)
            gens = self.pte_gens[sel]
            ii = gfns[sel] & 511
            # the installed pages of each table are one run of ``sel``
            cuts = np.searchsorted(sel, self.seg_lo).tolist() + [len(sel)]
            fresh = set(new)
            for s_i, (pde, _lo, _hi) in enumerate(segs):
                a, b = cuts[s_i], cuts[s_i + 1]
                if a == b:
                    continue
                i0, i1 = int(ii[a]), int(ii[b - 1]) + 1
                if pde in fresh and b - a == S.SPTE_ENTRIES:
                    full.append(pde)
                    full_at.append(a)
                    continue
                at = slice(i0, i1) if i1 - i0 == b - a else ii[a:b]   # contiguous: a slice
                rest.append((pde, i0, i1, at, vals[a:b], gens[a:b]))
        table_pfn = {pde: sp.pfn for pde, sp in self.leaf_tables.items() if sp is not None}
        if new:
            rows = np.asarray(full_at, dtype=np.int64)[:, None] + np.arange(S.SPTE_ENTRIES)
            leaves = LeafRows(full, vals[rows], gens[rows]) if full else None
            table_pfn.update(zip(new, tdp.install_tables(self.l2, new, role1, leaves)))
        for pde, i0, i1, at, v, g in rest:
            sp = self.leaf_tables[pde] or tdp.pt.lookup(table_pfn[pde])
            tdp.install_leaves(sp, i0, i1, at, v, g)
        # accesses (the retried access of a fault, or the one access of a present page)
        tlb = vcpu.tlb
        tlb.count_misses(na + npages)
        pres = np.flatnonzero(~absent[:npages])
        if len(pres):
            bits = S.SHADOW_ACCESSED | (S.SHADOW_DIRTY if self.write else 0)
            # the present pages of each table are one stretch of ``pres``
            pp = self.pdes[pres]
            cuts = [0, *(np.flatnonzero(np.diff(pp)) + 1).tolist(), len(pres)]
            for a, b in zip(cuts, cuts[1:]):
                ii = gfns[pres[a:b]] & 511
                tdp.pt.set_bits(self.leaf_tables[int(pp[a])], ii, int(ii[0]), int(ii[-1]) + 1,
                                bits)
        # PDE cache: one fill per region, at the first walk that passes its level-2 entry
        # (the region's first access if its table existed, else the access retried after
        # the fault that created it)
        d0 = done[self.seg_lo]
        reached = int(np.argmin(d0 >= 1)) if not (d0 >= 1).all() else len(d0)
        existed = np.array([self.leaf_tables[p] is not None for p in self.seg_pde.tolist()],
                           dtype=bool)
        walked = np.flatnonzero(np.where(existed, d0 >= 1, d0 == 3)[:reached])
        if len(walked):
            tlb.psc_fill_new(2, gfns[self.seg_lo[walked]],
                             [table_pfn[p] for p in self.seg_pde[walked].tolist()])
        if npages:
            self._accessed(vcpu, npages)
        self.guest.advance(npages)
        # where the vCPU stands after the last step done
        if npages < n and done[npages] >= 1:
            # the next page faulted (its exit and pf_taken are counted above) ...
            vcpu.left_guest()
            if done[npages] == 1:
                # ... and stands between the two phases of its fault (phase 1 changes
                # nothing else for a present host PTE)
                vcpu.fault_phase1(int(gfns[npages]), self.write)
        elif npages:
            vcpu.enter_guest()

    def _accessed(self, vcpu, npages: int) -> None:
        """The first ``npages`` accesses completed: TLB fills (LRU: only the newest
        ``capacity`` stay) and the observations."""
        pfns, gens = self.pfns[:npages], self.pte_gens[:npages]
        tlb = vcpu.tlb
        cap = tlb.capacity
        lo = 0 if cap is None else max(0, npages - cap)
        tlb.fill_many(self.gfns[lo:npages], pfns[lo:], gens[lo:], self._times(lo, npages),
                      not self.slot.readonly, self.write)
        vcpu.observe_accesses(Accesses(self.gfns[:npages], pfns, gens,
                                       lambda: self._times(0, npages), False, self.write))

    def _times(self, lo: int, hi: int) -> np.ndarray:
        """When the accesses of pages [lo, hi) happened: the start of each page's last step."""
        last_step = self.first_step[lo:hi] + self.steps[lo:hi] - 1
        return self.t0 + np.where(last_step > 0, self.cum[np.maximum(last_step - 1, 0)], 0)
