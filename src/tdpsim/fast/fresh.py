"""Populate bulks in closed form: a vCPU touching memory that nothing maps yet.

Accelerates the same loop as ``populate.py`` (``vcpu_enter_guest`` while the guest touches
memory) in the case that dominates the selftests at scale: the guest writes consecutive
4 KiB pages (stride 1) of 4 KiB-backed memslots, and none of them has a leaf yet.  There,
exact mode spends three steps per page, whatever the page:

* the access misses the TLB, its walk stops at the missing leaf (or table): an exit, then
  fault phase 1 (``fault_4k // 4``);
* fault phase 2 maps the page (``fault_4k - fault_4k // 4``), allocating the 4 KiB table
  at the first page of each 2 MiB (``sp_alloc``) and the level-2 table at the first page
  of a 1 GiB region that has none (``sp_alloc`` more);
* the retried access walks and fills the TLB (``guest_access``).

So the costs are periodic (``sim.steps``: a ``Repeat`` per 2 MiB, one ``Seq`` per
region), and the effects are affine: the leaves of a table map consecutive host pages of
one generation (store.py's ``AffineLeaves``, which the compressed layout keeps as a run of
tables), the accessed bits of the host PTEs are a range, the accesses are ranges
(``Accesses.by_runs``), and only the last ``capacity`` TLB fills and PDE-cache fills
survive.  A bulk covers segments (the pages of one region within one memslot) one after
the other, across regions and memslots, up to the need_resched deadline: its cost grows
with segments, not pages.

A segment qualifies when its memslot is usable as ``populate.py`` requires, the
level-3 table on its path exists, its level-2 entry is empty or leads to a table whose
entries for the segment are empty except the first (a 4 KiB table already holding the
pages before the segment's first), the pages' leaves are empty, neither the TLB nor the
PDE cache knows any of its pages (except that first table's PDE-cache entry), and the host
PTEs map consecutive pages of one generation.  A segment is cut where one of these stops
holding, and the plan stops at the first page that does not qualify: ``populate.py`` and
the exact path take over from there.

The bulk may also start with the page a fault has just mapped (``_Touched``: its retried
access, one step), so that a bulk cut between the phases of a fault resumes in closed
form once the exact path has finished that fault.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ..host.mm import PAGE
from ..kvm.vcpu import Accesses
from ..mmu import spte as S
from ..mmu.page import ROLE_CR0_WP, make_role
from ..mmu.store import AffineLeaves
from ..sim.engine import Bulk
from ..sim.steps import Repeat, Run, Seq

if TYPE_CHECKING:
    from .populate import Populate

REGION_SHIFT = 18               # a level-2 table maps 2^18 4 KiB pages (1 GiB)
PDE_PAGES = S.SPTE_ENTRIES      # a 4 KiB table maps 512 pages (2 MiB)
#: segments a bulk plans at most (when need_resched is far off)
MAX_SEGMENTS = 256


class _Seg:
    """Pages [gfn, gfn + n) of one region and memslot, none mapped yet (see the module doc).

    ``l2`` is None when the region's level-2 table does not exist (the first fault makes
    it); ``t0`` is the 4 KiB table of the first page's PDE when it already exists.
    ``head``: pages in the first PDE; ``allocs0``: tables the first page's fault allocates."""

    __slots__ = ("gfn", "n", "slot", "vma", "i0", "pfn0", "pgen", "l3", "l3i", "l2", "t0",
                 "head", "allocs0", "steps")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    @property
    def region_base(self) -> int:
        return self.gfn >> REGION_SHIFT << REGION_SHIFT

    @property
    def first_pde(self) -> int:
        return (self.gfn >> 9) & (S.SPTE_ENTRIES - 1)

    def pde_gfn(self, p: int) -> int:
        return self.region_base + p * PDE_PAGES

    def new_pdes(self, npages: int) -> range:
        """PDEs (level-2 entries) that get a new table while mapping the first npages."""
        last = ((self.gfn + npages - 1) >> 9) & (S.SPTE_ENTRIES - 1)
        return range(self.first_pde + (self.t0 is not None), last + 1)

    def access_times(self, j: np.ndarray, c: tuple) -> np.ndarray:
        """When the retried accesses of pages ``j`` start, from the segment's start: the
        start of each page's third step (what ``steps.start_of(3 * j + 2)`` gives)."""
        c1, c2, ga, sp = c
        allocs = self.allocs0 + np.where(j >= self.head, (j - self.head) // PDE_PAGES + 1, 0)
        return j * (c1 + c2 + ga) + c1 + c2 + sp * allocs


class _Touched:
    """The bulk's first page when a fault has just mapped it: its leaf is present with the
    access's permissions and Accessed (and Dirty) bits, in the 4 KiB table ``t0``, and
    the TLB does not hold it.  One step: the access walks and fills the TLB."""

    __slots__ = ("gfn", "n", "slot", "pfn0", "pgen", "l3", "l3i", "l2", "t0", "steps")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def access_times(self, j: np.ndarray, c: tuple) -> np.ndarray:
        return np.zeros(len(j), dtype=np.int64)


class FreshSpans:
    """The closed-form populate bulk of one VM (used by ``Populate.run_bulk``)."""

    def __init__(self, pop: "Populate"):
        self.pop = pop
        self.kvm = pop.kvm
        self.tdp = pop.tdp

    # ---- planning ------------------------------------------------------------------------

    def bulk(self, vcpu, th, guest, write: bool) -> Bulk | None:
        """The bulk from the guest's next page, or None if that page does not qualify."""
        if guest.stride != 1:
            return None
        kvm = self.kvm
        costs = kvm.costs
        c1 = costs.fault_4k // 4
        c2, ga, sp = costs.fault_4k - c1, costs.guest_access, costs.sp_alloc
        if min(c1, c2, ga) < 1 or sp < 0:
            return None
        room = th.host.sched.need_resched_at(th.cpu) - kvm.engine.now
        if room <= 0:
            return None
        segs: list = []
        g, left, total = guest.current()[0], guest.n - guest.pos, 0
        first = self._touched(vcpu, g, write, ga)
        if first is not None:
            segs.append(first)
            g, left, total = g + 1, left - 1, ga
        while left > 0 and total < room and len(segs) < MAX_SEGMENTS:
            seg = self._segment(vcpu, g, left, write, (c1, c2, ga, sp),
                                segs[-1].l3 if segs else None)
            if seg is None or segs and seg.slot.readonly != segs[0].slot.readonly:
                break                           # (the TLB fills take one writable flag)
            segs.append(seg)
            total += seg.steps.total
            g += seg.n
            left -= seg.n
            if g & ((1 << REGION_SHIFT) - 1):
                # cut inside its region: what comes next depends on this segment's tables
                # (which the plan cannot read before they exist), so the bulk ends here
                break
        if not segs:
            return None
        steps = Seq([s.steps for s in segs])
        m = steps.started_before(room)
        if m <= 1:
            return None
        plan = _Plan(self, vcpu, th, guest, segs, write, (c1, c2, ga, sp))
        return Bulk(steps.prefix(m), plan.apply, plan.resources(m))

    def _slot(self, g: int, write: bool):
        """The memslot of g if populate bulks may touch it and it is 4 KiB-backed."""
        slot = self.pop.slot_for(g, write)
        return slot if slot is not None and slot.host_level_pages == 1 else None

    def _touched(self, vcpu, g: int, write: bool, ga: int) -> _Touched | None:
        """The first page as a ``_Touched`` if it is one."""
        pt = self.tdp.pt
        slot = self._slot(g, write)
        l3 = self.pop.table_at(vcpu.root, g, 3) if slot is not None else None
        if l3 is None:
            return None
        l3i = S.spte_index(g, 3)
        tables = [l3]
        for i in (l3i, S.spte_index(g, 2)):
            e = pt.read(tables[-1], i)
            if not S.is_shadow_present_pte(e) or S.is_large_pte(e):
                return None
            tables.append(pt.lookup(S.spte_to_pfn(e)))
        _, l2, t0 = tables
        i = g & (PDE_PAGES - 1)
        e = pt.read(t0, i)
        need = S.SHADOW_ACCESSED | S.EPT_X | ((S.EPT_W | S.SHADOW_DIRTY) if write else 0)
        if not S.is_shadow_present_pte(e) or (e & need) != need or \
                bool(e & S.EPT_W) == slot.readonly:
            return None
        tlb = vcpu.tlb
        cached = (tlb.psc.get(2) or {}).get(g >> 9)
        if tlb.gfns_in(g, g + 1) or cached not in (None, t0.pfn):
            return None
        return _Touched(gfn=g, n=1, slot=slot, pfn0=S.spte_to_pfn(e), pgen=pt.gen(t0, i),
                        l3=l3, l3i=l3i, l2=l2, t0=t0, steps=Run(1, ga))

    def _segment(self, vcpu, g: int, left: int, write: bool, c: tuple,
                 l3=None) -> _Seg | None:
        """The segment from g (``left`` pages at most); ``l3``: the level-3 table of the
        segment before it, which this one is likely to share."""
        kvm = self.kvm
        pt = self.tdp.pt
        slot = self._slot(g, write)
        if slot is None:
            return None
        region_end = ((g >> REGION_SHIFT) + 1) << REGION_SHIFT
        e = min(region_end, slot.end_gfn, g + left)
        # the path: the level-3 table, the region's level-2 entry
        if l3 is None or not l3.gfn <= g < l3.gfn + l3.span():
            l3 = self.pop.table_at(vcpu.root, g, 3)
            if l3 is None:
                return None
        l3i = S.spte_index(g, 3)
        ent = pt.read(l3, l3i)
        l2 = t0 = None
        if ent:
            if not S.is_shadow_present_pte(ent) or S.is_large_pte(ent):
                return None
            l2 = pt.lookup(S.spte_to_pfn(ent))
            p0, p1 = S.spte_index(g, 2), S.spte_index(e - 1, 2) + 1
            pdes = pt.entries(l2, p0, p1)
            later = np.flatnonzero(pdes[1:])
            if len(later):                      # a table further on: stop before it
                e = (g >> 9 << 9) + (int(later[0]) + 1) * PDE_PAGES
            if pdes[0]:
                if not S.is_shadow_present_pte(int(pdes[0])) or S.is_large_pte(int(pdes[0])):
                    return None
                t0 = pt.lookup(S.spte_to_pfn(int(pdes[0])))
                i0 = g & (PDE_PAGES - 1)
                i1 = min(PDE_PAGES, i0 + e - g)
                leaves = np.flatnonzero(pt.entries(t0, i0, i1))
                if len(leaves):
                    e = g + int(leaves[0])
        # the TLB and the PDE cache know none of the pages (but t0's PDE-cache entry)
        tlb = vcpu.tlb
        hit = tlb.gfns_in(g, e)
        if hit:
            e = min(hit)
        psc2 = tlb.psc.get(2)
        if psc2:
            k0, k1 = g >> 9, (e - 1) >> 9
            for key, pfn in psc2.items():
                if k0 <= key <= k1 and not (t0 is not None and key == k0 and pfn == t0.pfn):
                    e = min(e, max(g, key << 9))
        if e <= g:
            return None
        # the host PTEs: consecutive pages of one generation
        hva = slot.userspace_addr + (g - slot.base_gfn) * PAGE
        vma = kvm.mm.find_vma(hva)
        if vma is None:
            return None
        i0 = (hva - vma.start) // PAGE
        pfn0, pgen, count = vma.pte_run(i0, e - g)
        if count <= 0:
            return None
        n = min(e - g, count)
        head = min(n, PDE_PAGES - (g & (PDE_PAGES - 1)))
        allocs0 = (t0 is None) + (l2 is None)
        return _Seg(gfn=g, n=n, slot=slot, vma=vma, i0=i0, pfn0=pfn0, pgen=pgen, l3=l3,
                    l3i=l3i, l2=l2, t0=t0, head=head, allocs0=allocs0,
                    steps=_seg_steps(n, head, allocs0, *c))


@lru_cache(maxsize=256)
def _seg_steps(n: int, head: int, allocs0: int, c1: int, c2: int, ga: int, sp: int) -> Seq:
    """Three steps per page (phase 1, phase 2, the retried access); phase 2 of the first
    page allocates ``allocs0`` tables, that of the first page of every later PDE one.
    (Cached: step structures are immutable, and whole regions all look alike.)"""
    def page(allocs: int) -> Seq:
        return Seq((Run(1, c1), Run(1, c2 + allocs * sp), Run(1, ga)))
    plain = page(0)
    q, r = divmod(n - head, PDE_PAGES)
    parts = [page(allocs0), Repeat(plain, head - 1)]
    if q:
        parts.append(Repeat(Seq((page(1), Repeat(plain, PDE_PAGES - 1))), q))
    if r:
        parts += [page(1), Repeat(plain, r - 1)]
    return Seq(parts)


class _Plan:
    """The effects of the first k steps of a closed-form populate bulk (``Bulk.apply``),
    through the owners' batch operations, as ``populate._Plan`` applies them page by
    page."""

    def __init__(self, fs: FreshSpans, vcpu, th, guest, segs: list[_Seg], write: bool,
                 costs: tuple):
        self.fs, self.vcpu, self.th, self.guest = fs, vcpu, th, guest
        self.segs, self.write, self.costs = segs, write, costs
        self.t0 = fs.kvm.engine.now
        self.offs_n = [0]
        self.offs_t = [0]
        for s in segs:
            self.offs_n.append(self.offs_n[-1] + s.steps.n)
            self.offs_t.append(self.offs_t[-1] + s.steps.total)

    def resources(self, m: int) -> list:
        """What the first m steps depend on; claims the table entries they will write."""
        kvm = self.fs.kvm
        pt = self.fs.tdp.pt
        vmas: dict[int, list] = {}          # id -> [vma, lo, hi]: PTEs read, marked young
        tables: dict[int, list] = {}        # id -> [sp, lo, hi, wlo, whi]: entries

        def add(d: dict, obj, lo: int, hi: int, wlo: int = 0, whi: int = 0) -> None:
            r = d.setdefault(id(obj), [obj, lo, hi, wlo, whi])
            r[1], r[2] = min(r[1], lo), max(r[2], hi)
            if wlo < whi:
                r[3], r[4] = (wlo, whi) if r[3] == r[4] else (min(r[3], wlo), max(r[4], whi))

        for s, off in zip(self.segs, self.offs_n):
            if off >= m:
                break
            if isinstance(s, _Touched):               # a walk: reads only
                i = s.gfn & (PDE_PAGES - 1)
                add(tables, s.l3, s.l3i, s.l3i + 1)
                p = S.spte_index(s.gfn, 2)
                add(tables, s.l2, p, p + 1)
                add(tables, s.t0, i, i + 1)
                continue
            npages = min(s.n, -(-(m - off) // 3))     # pages the bulk reaches
            add(vmas, s.vma, s.i0, s.i0 + npages)
            if s.l2 is None:                          # the fault links a level-2 table
                add(tables, s.l3, s.l3i, s.l3i + 1, s.l3i, s.l3i + 1)
            else:
                add(tables, s.l3, s.l3i, s.l3i + 1)
                new = s.new_pdes(npages)
                add(tables, s.l2, s.first_pde, max(new.stop, s.first_pde + 1),
                    new.start, new.stop)
            if s.t0 is not None:                      # leaves written from the first page
                i0 = s.gfn & (PDE_PAGES - 1)
                add(tables, s.t0, i0, i0 + min(npages, s.head), i0, i0 + min(npages, s.head))
        out = [self.vcpu, self.th.cpu, kvm.mmu_lock, kvm.memslots[0], kvm.host.memory]
        out += [(v, lo, hi) for v, lo, hi, _, _ in vmas.values()]
        for sp, lo, hi, wlo, whi in tables.values():
            if wlo < whi:
                pt.claim(sp, wlo, whi)
            out.append((sp, lo, hi, wlo, whi))
        return out

    def apply(self, k: int) -> None:
        vcpu, kvm = self.vcpu, self.fs.kvm
        tlb = vcpu.tlb
        wp = bool(vcpu.root.role & ROLE_CR0_WP)
        na_all = nb_all = done_all = 0
        runs = []                               # accesses done, as runs
        tail = []                               # (segment, its start time, pages done)
        fills = []                              # PDE-cache fills of each segment
        last = None
        for s, off_n, off_t in zip(self.segs, self.offs_n, self.offs_t):
            ks = min(k - off_n, s.steps.n)
            if ks <= 0:
                break
            if isinstance(s, _Touched):
                na = nb = rem = 0
                done = 1
                fills.append(([s.gfn], [s.t0.pfn], 0))
            else:
                done, rem = divmod(ks, 3)
                na, nb = done + (rem >= 1), done + (rem >= 2)
                kvm.mm.mark_young_range(s.vma, s.i0, na)
                fills.append(self._psc(s, na, done, self._map(s, nb, wp) if nb else []))
            na_all, nb_all, done_all = na_all + na, nb_all + nb, done_all + done
            tlb.count_misses(na + done)
            if done:
                runs.append((s.gfn, s.pfn0, done, s.pgen))
                tail.append((s, off_t, done))
            last = (s, done, rem)
        # the PDE-cache fills, in order; a segment that fills at least capacity new entries
        # leaves only its newest: what came before it does not matter
        cap = tlb.psc_capacity
        first = max((x for x, f in enumerate(fills) if cap is not None and f[2] >= cap),
                    default=0)
        for gfns, tables, _ in fills[first:]:
            if gfns:
                tlb.psc_fill_new(2, np.array(gfns, dtype=np.int64), tables)
        vcpu.account(exits=na_all, pf_taken=na_all, pf_fixed=nb_all)
        kvm.mmu_lock.account_uncontended_reads(nb_all)
        if done_all:
            self._fill_tlb(tail, done_all)
            vcpu.observe_accesses(Accesses.by_runs(runs, lambda: self._times(tail),
                                                   self.write))
        self.guest.advance(done_all)
        # where the vCPU stands after the last step done
        s, done, rem = last
        if rem:
            vcpu.left_guest()           # the next page faulted ...
            if rem == 1:                # ... and stands between the phases of its fault
                vcpu.fault_phase1(s.gfn + done, self.write)
        elif done_all:
            vcpu.enter_guest()

    def _map(self, s: _Seg, nb: int, wp: bool):
        """Fault phase 2 of pages [0, nb) of ``s``: tables, then leaves.  Returns the PFNs
        of the new 4 KiB tables (``s.new_pdes(nb)``)."""
        tdp = self.fs.tdp
        pt = tdp.pt
        as_id = s.slot.as_id
        l2 = s.l2
        if l2 is None:
            pfn = tdp.install_tables(s.l3, [s.l3i], make_role(2, as_id, wp))[0]
            l2 = pt.lookup(pfn)
        writable = not s.slot.readonly
        base = S.make_spte(0, S.PG_LEVEL_4K, writable)
        end = s.gfn + nb
        new = s.new_pdes(nb)
        # the PDEs whose 512 pages all lie in [gfn, end)
        rb = s.region_base
        full = range(max(new.start, -(-(s.gfn - rb) // PDE_PAGES)),
                     min(new.stop, (end - rb) // PDE_PAGES))
        step = 1 << S.PFN_SHIFT
        leaves = AffineLeaves(full.start, len(full),
                              int(base) + (s.pfn0 - s.gfn + rb + PDE_PAGES * full.start) * step,
                              PDE_PAGES * step, s.pgen)
        pfns = tdp.install_tables(l2, new, make_role(1, as_id, wp), leaves)
        # the tables not filled whole: the first PDE's (new or not) and the last new one
        parts = []
        if s.t0 is not None:
            parts.append((s.t0, s.first_pde))
        for p, pfn in ((new.start, pfns[0]), (new.stop - 1, pfns[-1])) if len(new) else ():
            if p not in full and all(q != p for _, q in parts):
                parts.append((pt.lookup(pfn), p))
        for sp, p in parts:
            g0, g1 = max(s.gfn, s.pde_gfn(p)), min(end, s.pde_gfn(p) + PDE_PAGES)
            i0, i1 = g0 - s.pde_gfn(p), g1 - s.pde_gfn(p)
            pf = s.pfn0 + (g0 - s.gfn) + np.arange(g1 - g0, dtype=np.int64)
            tdp.install_leaves(sp, i0, i1, slice(i0, i1), S.make_4k_sptes(pf, writable),
                               np.full(g1 - g0, s.pgen, dtype=np.uint32))
        return pfns

    def _psc(self, s: _Seg, na: int, done: int, pfns) -> tuple[list, list, int]:
        """The PDE-cache fills of a segment, in order, as (gfns, table PFNs, how many of
        them are of new tables): the first walk through each PDE's table (page 0's own
        access when its table existed, else the access retried after the fault that made
        it)."""
        cap = self.vcpu.tlb.psc_capacity
        gfns, tables = [], []
        if s.t0 is not None and na:
            gfns.append(s.gfn)
            tables.append(s.t0.pfn)
        new = s.new_pdes(s.n)
        # PDE p's first page is walked once its retried access is done: the PDEs up to
        # that of the last page done
        walked = range(new.start, s.new_pdes(done).stop if done else new.start)
        if cap is not None:
            walked = walked[-cap:]      # the older fills are evicted by these anyway
        g, rb = s.gfn, s.region_base
        gfns += [max(g, rb + p * PDE_PAGES) for p in walked]
        tables += pfns[walked.start - new.start:walked.stop - new.start]
        return gfns, tables, len(walked)

    def _fill_tlb(self, tail: list, done_all: int) -> None:
        """The TLB fills of the last accesses (LRU keeps only the newest ``capacity``)."""
        tlb = self.vcpu.tlb
        cap = tlb.capacity
        want = done_all if cap is None else min(cap, done_all)
        g, p, gen, t = [], [], [], []
        for s, off_t, done in reversed(tail):
            if want <= 0:
                break
            j = np.arange(max(0, done - want), done, dtype=np.int64)
            g.append(s.gfn + j)
            p.append(s.pfn0 + j)
            gen.append(np.full(len(j), s.pgen, dtype=np.uint32))
            t.append(self.t0 + off_t + s.access_times(j, self.costs))
            want -= len(j)
        cat = np.concatenate
        tlb.fill_many(cat(g[::-1]), cat(p[::-1]), cat(gen[::-1]), cat(t[::-1]),
                      not self.segs[0].slot.readonly, self.write)

    def _times(self, tail: list) -> np.ndarray:
        return np.concatenate([self.t0 + off_t + s.access_times(np.arange(done), self.costs)
                               for s, off_t, done in tail])
