"""Fast-mode bulk paths of the MMU, exact with respect to ``exact`` mode.

``run_bulk`` replaces a run of a vCPU's run-loop steps (Vcpu.run) with one ``Bulk``: the
guest touching consecutive pages of one 1 GiB region (one level-2 table) of a 4 KiB-mapped
memslot.  Exact mode spends, per page:

* a present leaf with the needed permission, not in the TLB: one step (the access walks,
  sets A/D, fills the TLB and the PDE cache), cost ``guest_access``;
* an absent leaf: three steps: the access misses and exits, fault phase 1 (``fault_4k//4``);
  fault phase 2 maps the page, allocating the 4 KiB table on the region's first fault
  (``fault_4k - fault_4k//4`` + ``sp_alloc``); the retried access (``guest_access``).

The bulk computes the same sequence for every page the guest will touch before the
need_resched deadline and applies its effects lazily (see ``Engine.settle``).  Resources:
the vCPU (requests, guest mode), its CPU (need_resched), mmu_lock (a writer would block
phase 2), the level-2 table and the existing 4 KiB tables of the region (another task
reading or writing them).  Anything the bulk does not model exactly stops it before the
page concerned, and the exact path takes over: huge mappings, a read-only leaf for a write,
a REMOVED or huge entry, a TLB hit, a stale PDE-cache entry, a missing host PTE, dirty
logging, a missing level-2 table, an invalidation in progress.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

import numpy as np

from ..host.mm import PAGE
from ..kvm.vcpu import Fault, TouchGuest
from ..kvm.vm import IN_GUEST_MODE, OUTSIDE_GUEST_MODE
from ..sim.engine import Bulk
from . import spte as S
from .page import ROLE_CR0_WP, make_role

if TYPE_CHECKING:
    from .x86 import X86Mmu

REGION_SHIFT = 18          # one level-2 table covers 2^18 4 KiB pages (1 GiB)
PLAN_WINDOW = 4096         # pages planned at first by a populate bulk (widened as needed)
U64 = np.uint64


class FastPaths:
    def __init__(self, arch: "X86Mmu"):
        self.arch = arch
        self.tdp = arch.tdp
        self.kvm = arch.kvm
        arch.fast = self

    # ---- planning ------------------------------------------------------------------------

    def _table(self, root, gfn: int, level: int):
        """The table at ``level`` on the path to ``gfn`` (None if not all linked)."""
        pt = self.tdp.pt
        sp = root
        while sp.level > level:
            i = S.spte_index(gfn, sp.level)
            if sp.bulks:
                self.kvm.engine.settle(sp, i, i + 1, read=True)
            e = int(sp.spt[i])
            if not S.is_shadow_present_pte(e) or S.is_last_spte(e, sp.level):
                return None
            sp = pt.lookup(S.spte_to_pfn(e))
            if sp is None:
                return None
        return sp

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
        slot = kvm.memslots[0].find(gfn0)
        if slot is None or slot.invalid or slot.dirty_logging or (write and slot.readonly):
            return 0
        if slot.host_level_pages > 1:
            return (yield from self._huge_bulk(vcpu, th, guest, gfn0, write))
        l2 = self._table(root, gfn0, 2)
        if l2 is None:
            return 0
        stride = guest.stride
        region_end = ((gfn0 >> REGION_SHIFT) + 1) << REGION_SHIFT
        limit = min(region_end, slot.end_gfn)
        n_all = min(guest.n - guest.pos, -(-(limit - gfn0) // stride))
        # Plan a window of pages, widened while the bulk would run to its end before
        # need_resched: a plan is a prefix of the plan of a wider window, so the bulk is the
        # same, and arrays stay the size of what the bulk can reach (memory, and time when
        # need_resched comes often).
        n = min(n_all, PLAN_WINDOW)
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
        sp, level = vcpu.root, vcpu.root.level
        path = []
        while True:                              # the walk hw_walk does, reading only
            i = S.spte_index(gfn0, level)
            if sp.bulks:
                eng.settle(sp, i, i + 1, read=True)
            e = int(sp.spt[i])
            if not S.is_shadow_present_pte(e):
                return 0
            path.append((sp, i, i + 1, 0, 0))     # read, never written by this bulk
            if S.is_last_spte(e, level):
                break
            sp = self.tdp.pt.lookup(S.spte_to_pfn(e))
            level -= 1
            if sp is None or level == 1:
                return 0                         # 4 KiB leaves: the populate bulk's job
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
        gen = int(sp.gens[i])
        pfns = S.spte_to_pfn(e) + (gfns[:n] & (span - 1))
        mem = kvm.host.memory
        ok = (pfns > 0) & (pfns < len(mem.state))
        live = np.zeros(n, dtype=bool)
        live[ok] = (mem.state[pfns[ok]] == 1) & (mem.gen[pfns[ok]] == gen)
        n = _cut(n, ~live)
        ga = kvm.costs.guest_access
        room = th.host.sched.need_resched_at(th.cpu) - eng.now
        m = min(n, (room - 1) // ga + 1) if room > 0 else 0
        if m < 1:
            return 0
        t0 = eng.now
        tlb = vcpu.tlb

        def apply(k: int) -> None:
            tlb.misses += k
            tlb.fill_many(gfns[:k], pfns[:k], np.full(k, gen, dtype=np.uint32),
                          t0 + ga * np.arange(k, dtype=np.int64), bool(e & S.EPT_W), write,
                          level, bool(e & S.EPT_X))
            guest.pos += k
            vcpu.mode = IN_GUEST_MODE

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
        pfns = vma.pte[idx]       # other bulks never change PTEs: no settle needed
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
        if nseg:
            if l2.bulks:
                eng.settle(l2, int(seg_pde[0]), int(seg_pde[nseg - 1]) + 1, read=True)
            ents = l2.spt[seg_pde[:nseg]].tolist()
            g_lo = gfns[seg_lo[:nseg]].tolist()
            g_hi = gfns[seg_hi[:nseg] - 1].tolist()
            psc2 = tlb.psc.get(2) or {}
            lookup = self.tdp.pt.by_pfn.get
            for pde, lo_j, e, g0, g1 in zip(seg_pde.tolist(), seg_lo.tolist(), ents, g_lo,
                                            g_hi):
                sp = None
                if e != 0:
                    if not S.is_shadow_present_pte(e) or S.is_large_pte(e):
                        n = lo_j
                        break
                    sp = lookup(S.spte_to_pfn(e))
                    if sp.bulks:
                        eng.settle(sp, g0 & 511, (g1 & 511) + 1)
                # the PDE cache must not point at another table
                c = psc2.get(g0 >> 9)
                if c is not None and (sp is None or c != sp.pfn):
                    n = lo_j
                    break
                leaf_tables[pde] = sp
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
                cur[lo_j:hi_j] = sp.spt[gfns[lo_j:hi_j] & 511]
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
        m = 1 + int(np.searchsorted(cum[:-1], room, side="left"))
        if m <= 1:
            return None
        plan = _Plan(self, vcpu, th, guest, slot, vma, l2, leaf_tables, alloc_page, gfns, idx,
                     pdes, absent, steps, first_step, write, root, seg_pde, seg_lo, seg_hi,
                     cost)
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
        bulk = Bulk(None, plan.apply, resources, cum=cum[:m])
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
    """The effects of the first k steps of a populate bulk (Bulk.apply)."""

    def __init__(self, fp, vcpu, th, guest, slot, vma, l2, leaf_tables, alloc_page, gfns, idx,
                 pdes, absent, steps, first_step, write, root, seg_pde, seg_lo, seg_hi, cost):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.t0 = fp.kvm.engine.now

    def apply(self, k: int) -> None:
        fp, vcpu, kvm = self.fp, self.vcpu, self.fp.kvm
        tdp, pt = fp.tdp, fp.tdp.pt
        gfns, absent, first_step, steps = self.gfns, self.absent, self.first_step, self.steps
        done = np.clip(k - first_step, 0, steps)           # steps done per page
        n = len(gfns)
        full = done == steps
        npages = int(np.argmin(full)) if not full.all() else n   # pages fully done (prefix)
        a_done = absent & (done >= 1)
        b_done = absent & (done >= 2)
        # fault phase 1: exits, faults taken, host PTE accessed
        na = int(a_done.sum())
        vcpu.stat["exits"] += na
        vcpu.stat["pf_taken"] += na
        self.vma.young[self.idx[a_done]] = True
        # fault phase 2: tables, leaves (mmu_lock read taken and dropped each time)
        nb = int(b_done.sum())
        vcpu.stat["pf_fixed"] += nb
        kvm.mmu_lock.stats_read.acquires += nb
        role1 = make_role(1, self.slot.as_id, bool(self.root.role & ROLE_CR0_WP))
        tables = dict(self.leaf_tables)
        for pde, j in sorted(self.alloc_page.items(), key=lambda x: x[1]):
            if not b_done[j]:
                continue
            g2m = int(gfns[j]) & ~511
            sp = pt.alloc(g2m, role1, (self.l2, pde))
            self.l2.spt[pde] = S.make_nonleaf_spte(sp.pfn)
            self.l2.gens[pde] = 0
            tdp.pages[sp.id] = sp
            tables[pde] = sp
        segs = list(zip(self.seg_pde.tolist(), self.seg_lo.tolist(), self.seg_hi.tolist()))
        if nb:
            vma = self.vma
            sel = np.flatnonzero(b_done)
            vals = S.make_4k_sptes(vma.pte[self.idx[sel]], writable=not self.slot.readonly)
            gens = vma.pte_gen[self.idx[sel]]
            ii = gfns[sel] & 511
            # the installed pages of each table are one run of ``sel``
            cuts = np.searchsorted(sel, self.seg_lo).tolist() + [len(sel)]
            for s_i, (pde, _lo, _hi) in enumerate(segs):
                a, b = cuts[s_i], cuts[s_i + 1]
                if a == b:
                    continue
                sp = tables[pde]
                i0, i1 = int(ii[a]), int(ii[b - 1]) + 1
                if i1 - i0 == b - a:            # contiguous entries: slices
                    sp.spt[i0:i1] = vals[a:b]
                    sp.gens[i0:i1] = gens[a:b]
                else:
                    sp.spt[ii[a:b]] = vals[a:b]
                    sp.gens[ii[a:b]] = gens[a:b]
            kvm.stat["pages_4k"] += nb
            tdp.leaves_installed += nb
        # accesses (the retried access of a fault, or the one access of a present page)
        acc = np.zeros(n, dtype=bool)
        acc[:npages] = True
        tlb = vcpu.tlb
        tlb.misses += na + int(acc.sum())
        pres = acc & ~absent
        if pres.any():
            bits = U64(S.SHADOW_ACCESSED | (S.SHADOW_DIRTY if self.write else 0))
            for pde, lo_j, hi_j in segs:
                sel = np.flatnonzero(pres[lo_j:hi_j]) + lo_j
                if len(sel):
                    tables[pde].spt[gfns[sel] & 511] |= bits
        # PDE cache: one fill per region, at the first walk that passes its level-2 entry
        # (the region's first access if its table existed, else the access retried after
        # the fault that created it)
        for pde, lo_j, hi_j in segs:
            if done[lo_j] < 1:
                break
            if tlb.psc_lookup(2, int(gfns[lo_j])) is not None:
                continue
            walked = done[lo_j] >= 1 if self.leaf_tables[pde] is not None else done[lo_j] == 3
            if walked:
                tlb.psc_fill(2, int(gfns[lo_j]), tables[pde].pfn)
        if npages:
            self._fill_tlb(tlb, npages)
        self.guest.pos += npages
        # where the vCPU stands after the last step done
        if npages < n and done[npages] >= 1:
            j = npages
            vcpu.mode = OUTSIDE_GUEST_MODE
            if done[j] == 1:
                f = Fault(int(gfns[j]), self.write)
                f.mmu_seq = kvm.mmu_notifier_seq
                f.slot = self.slot
                f.hva = self.slot.gfn_to_hva(int(gfns[j]))
                f.map_writable = not self.slot.readonly
                f.pfn = int(self.vma.pte[self.idx[j]])
                f.gen = int(self.vma.pte_gen[self.idx[j]])
                f.max_level = 1
                vcpu.fault = f
        elif npages:
            vcpu.mode = IN_GUEST_MODE

    def _fill_tlb(self, tlb, npages: int) -> None:
        """The TLB after ``npages`` accesses in order (LRU: only the last ``capacity``)."""
        cap = tlb.capacity
        keep = npages if cap is None else min(npages, cap)
        j = np.arange(npages - keep, npages)
        # access time of page j: start of its last step
        last_step = (self.first_step + self.steps - 1)[j]
        cost_cum = self.cum
        times = self.t0 + np.where(last_step > 0, cost_cum[np.maximum(last_step - 1, 0)], 0)
        ii = self.idx[j]
        tlb.fill_many(self.gfns[j], self.vma.pte[ii], self.vma.pte_gen[ii], times,
                      not self.slot.readonly, self.write)


# ---- leaf-table bulks: zap leaves, write-protect, clear dirty --------------------------

LEAF_OPS = ("zap", "wrprot", "clear_dirty")


def leaf_table_bulk(tdp, th, it, end: int, op: str, shared: bool) -> Generator:
    """Process the rest of the 4 KiB table the iterator is in, as exact mode would one
    entry at a time (``tdp_mmu_zap_leafs``, ``kvm_tdp_mmu_wrprot_slot``,
    ``kvm_tdp_mmu_clear_dirty_slot``), and leave the iterator on the last entry done.

    Called right after the yield check passed for the current entry.  Returns (entries
    done, whether any SPTE changed); (0, False) when a bulk does not apply."""
    kvm = tdp.kvm
    eng = kvm.engine
    sched = kvm.host.sched
    lock = kvm.mmu_lock
    if not eng.fast or it.level != 1 or it.yielded or sched.need_resched(th) \
            or lock.needbreak():
        return 0, False
    sp = it.sp
    i0 = it.index
    j = min(512, i0 + (end - it.gfn))
    if j - i0 < 2 or tdp.frozen:
        return 0, False
    if sp.bulks:
        eng.settle(sp, i0, j)
    ents = sp.spt[i0:j]
    if (ents == U64(S.REMOVED_SPTE)).any() or sp.freed:
        return 0, False
    present = S.present_mask(ents)
    if op == "zap":
        target = present
    elif op == "wrprot":
        target = present & ((ents & U64(S.EPT_W)) != 0)
    else:
        target = present & ((ents & U64(S.SHADOW_DIRTY)) != 0)
    costs = kvm.costs
    cost = np.full(j - i0, costs.spte_visit, dtype=np.int64)
    if op == "zap":
        cost[target] += costs.spte_zap_4k
    room = sched.need_resched_at(th.cpu) - eng.now
    cum = np.cumsum(cost)
    m = 1 + int(np.searchsorted(cum[:-1], room, side="left"))
    if m < 2:
        return 0, False
    gfn0 = it.gfn

    def apply(k: int) -> None:
        t = np.flatnonzero(target[:k]) + i0
        if not len(t):
            return
        old = sp.spt[t].copy()
        gens = sp.gens[t].copy()
        if op == "zap":
            sp.spt[t] = U64(0)
            kvm.stat["pages_4k"] -= len(t)
            tdp.leaves_zapped += len(t)
            _write_backs(tdp, th, old, gens)
        elif op == "wrprot":
            sp.spt[t] = old & ~U64(S.EPT_W)
        else:
            sp.spt[t] = old & ~U64(S.SHADOW_DIRTY)

    k = yield Bulk(None, apply, [th.cpu, lock, kvm.host.memory, (sp, i0, i0 + m)],
                   cum=cum[:m])
    # leave the iterator on the last entry done, as k-1 side steps would have
    last = i0 + k - 1
    it.index = last
    it.gfn = gfn0 + (k - 1)
    it.next_last_level_gfn = it.gfn
    it.old_spte = int(sp.spt[last])
    return k, bool(target[:k].any())


def _write_backs(tdp, th, old: np.ndarray, gens: np.ndarray) -> None:
    """The A/D write-backs of zapped leaves, reported as exact mode reports them: per entry,
    the dirty write-back then the accessed one."""
    mem = tdp.host.memory
    pfns = S.pfns_of(old)
    ok = (pfns > 0) & (pfns < len(mem.state))
    live = np.zeros(len(pfns), dtype=bool)
    live[ok] = (mem.state[pfns[ok]] == 1) & (mem.gen[pfns[ok]] == gens[ok])
    if live.all():
        return
    dirty = (old & U64(S.SHADOW_DIRTY)) != 0
    acc = (old & U64(S.SHADOW_ACCESSED)) != 0
    for e in np.flatnonzero(~live).tolist():
        if dirty[e]:
            mem.write_back(int(pfns[e]), int(gens[e]), th, "dirty")
        if acc[e]:
            mem.write_back(int(pfns[e]), int(gens[e]), th, "accessed")
