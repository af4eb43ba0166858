"""Unit tests of the MMU building blocks against the spec (kernel-tdp-mmu.md s1.1, s2):
SPTE helpers, the TDP iterator, the page-table registry, memslots, the TLB and the EPT walker.
Each test is named after the kernel function / helper it exercises."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tdpsim.kvm.vm as kvm_vm
from tdpsim.host.host import Host
from tdpsim.host.memory import FREE, POISON
from tdpsim.host.mm import HVA_BASE, PAGE
from tdpsim.kvm.memslot import (KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_MAX_NR_PAGES,
                                KVM_USER_MEM_SLOTS, Memslot, Memslots, check_region)
from tdpsim.kvm.tlb import Tlb, TlbEntry, hw_walk
from tdpsim.mmu import spte as S
from tdpsim.mmu.page import make_role
from tdpsim.mmu.store import DenseStore
from tdpsim.mmu.tdp_iter import TdpIter
from tdpsim.workloads.vm import VmHarness, run_now

A, D = S.SHADOW_ACCESSED, S.SHADOW_DIRTY
L2M, L1G = 512, 512 * 512


# ---- SPTE helpers (s1.1) -----------------------------------------------------------------

def test_removed_spte_is_frozen_nonpresent_value():
    assert S.REMOVED_SPTE == 0x5A0
    assert not S.is_shadow_present_pte(S.REMOVED_SPTE)
    assert S.REMOVED_SPTE & (S.EPT_R | S.EPT_W | S.EPT_X) == 0
    assert S.spte_to_pfn(S.REMOVED_SPTE) == 0
    assert S.is_removed_spte(S.REMOVED_SPTE) and not S.is_removed_spte(0)
    assert S.describe(S.REMOVED_SPTE) == "REMOVED"


def test_is_shadow_present_pte_and_spte_to_pfn():
    assert not S.is_shadow_present_pte(0) and S.is_shadow_present_pte(1 << 11)
    assert not S.is_shadow_present_pte(S.EPT_R | S.EPT_W | S.EPT_X | (5 << 12))
    assert S.spte_to_pfn((0x123456 << 12) | 0xFFF | (0xFFF << 52)) == 0x123456
    assert S.spte_to_pfn(((1 << 40) - 1) << 12) == (1 << 40) - 1
    assert S.spte_to_pfn(1 << 52) == 0


def test_is_last_spte_level1_always_leaf_upper_levels_need_bit7():
    nonleaf = S.make_nonleaf_spte(42)
    for spte in (0, nonleaf, S.make_spte(9, 1, True)):
        assert S.is_last_spte(spte, 1)
    for level in (2, 3, 4):
        assert not S.is_last_spte(nonleaf, level)
        assert not S.is_last_spte(nonleaf & ~S.PT_PAGE_SIZE_MASK, level)
        assert S.is_last_spte(nonleaf | S.PT_PAGE_SIZE_MASK, level)
    assert S.is_large_pte(S.PT_PAGE_SIZE_MASK) and not S.is_large_pte(nonleaf)


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("host_writable", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_make_spte_invariants(level, writable, host_writable, prefetch):
    pfn = 0xABCDE
    s = S.make_spte(pfn, level, writable, host_writable, prefetch)
    hw, mw, w = (bool(s & S.EPT_SPTE_HOST_WRITABLE), S.is_mmu_writable_spte(s),
                 S.is_writable_pte(s))
    assert S.is_shadow_present_pte(s) and S.is_last_spte(s, level)
    assert S.spte_to_pfn(s) == pfn and s & S.EPT_R and hw == host_writable
    assert hw or (not w and not mw)             # host-writable clear => W, MMU-W clear
    assert hw or not mw                         # MMU-writable set => host-writable set
    assert mw or not w                          # MMU-writable clear => W clear
    assert w == (writable and host_writable) and S.is_dirty_spte(s) == w
    assert S.is_accessed_spte(s) == (not prefetch)   # writable, not prefetch => A and D
    assert S.is_large_pte(s) == (level > 1)


def test_make_nonleaf_spte():
    s = S.make_nonleaf_spte(0x777)
    assert S.is_shadow_present_pte(s) and S.spte_to_pfn(s) == 0x777
    assert s & S.EPT_R and s & S.EPT_W and s & S.EPT_X and S.is_accessed_spte(s)
    assert not S.is_large_pte(s) and not S.is_dirty_spte(s)
    assert all(not S.is_last_spte(s, lvl) for lvl in (2, 3, 4, 5))


@pytest.mark.parametrize("level", [2, 3])
def test_make_huge_page_split_spte(level):
    base = 0x40000
    huge = S.make_spte(base, level, writable=True)
    step = S.pages_per_hpage(level - 1)
    flags = huge & ~S.PFN_MASK
    if level - 1 == S.PG_LEVEL_4K:
        flags &= ~S.PT_PAGE_SIZE_MASK
    for i in range(512):
        c = S.make_huge_page_split_spte(huge, level, i)
        assert S.spte_to_pfn(c) == base + i * step
        assert c & ~S.PFN_MASK == flags
        assert S.is_large_pte(c) == (level - 1 > 1)
        assert S.is_last_spte(c, level - 1)


def _random_sptes(n=2000, seed=1):
    rng = np.random.default_rng(seed)
    v = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    # make bits 7 and 11 vary independently of everything else, add the special values
    v[: n // 2] &= np.uint64(~(S.PT_PAGE_SIZE_MASK | S.SPTE_MMU_PRESENT_MASK) & (2**64 - 1))
    extra = [0, S.REMOVED_SPTE, POISON, S.make_nonleaf_spte(3), S.make_spte(5, 2, True)]
    return np.concatenate([v, np.array(extra, dtype=np.uint64)])


def test_vectorised_forms_agree_with_scalar():
    v = _random_sptes()
    ints = [int(x) for x in v]
    assert S.present_mask(v).tolist() == [S.is_shadow_present_pte(x) for x in ints]
    assert S.pfns_of(v).tolist() == [S.spte_to_pfn(x) for x in ints]
    for level in (1, 2, 3, 4):
        assert S.leaf_mask(v, level).tolist() == [
            S.is_shadow_present_pte(x) and S.is_last_spte(x, level) for x in ints]
    pfns = np.random.default_rng(2).integers(0, 1 << 40, size=500)
    for w in (False, True):
        for hw in (False, True):
            got = S.make_4k_sptes(pfns, w, hw)
            assert got.dtype == np.uint64
            assert [int(x) for x in got] == [S.make_spte(int(p), 1, w, hw) for p in pfns]


# ---- page tables -------------------------------------------------------------------------

def test_page_tables_alloc_lookup_free():
    host = Host()
    pt = DenseStore(host)
    sps = [pt.alloc(i * 512, make_role(1)) for i in range(4)]
    assert len({sp.pfn for sp in sps}) == 4
    assert all(pt.lookup(sp.pfn) is sp for sp in sps) and pt.live == 4
    sp = sps[1]
    pt.write_many(sp, 0, 512, slice(None), np.full(512, S.make_spte(9, 1, True),
                                                 dtype=np.uint64), 0)
    pt.free(sp)
    assert sp.freed and (pt.entries(sp) == np.uint64(POISON)).all()
    assert pt.lookup(sp.pfn) is None and pt.live == 3
    assert host.memory.state_of(sp.pfn) == FREE
    assert pt.lookup(sps[0].pfn) is sps[0]
    assert not host.reports_of("double_free")
    pt.free(sp)
    (rep,) = host.reports_of("double_free")
    assert rep["pfn"] == sp.pfn and pt.freed == 1


# ---- TDP iterator (s2) -------------------------------------------------------------------

def build_tree():
    """root L4 -> L3 -> L2; L2[0], L2[1] -> 4K tables; L2[2] a 2M leaf."""
    host = Host()
    pt = DenseStore(host)
    root = pt.alloc(0, make_role(4), None)
    l3 = pt.alloc(0, make_role(3), (root, 0))
    pt.write(root, 0, S.make_nonleaf_spte(l3.pfn))
    l2 = pt.alloc(0, make_role(2), (l3, 0))
    pt.write(l3, 0, S.make_nonleaf_spte(l2.pfn))
    t = {"host": host, "pt": pt, "root": root, "l3": l3, "l2": l2}
    for i in (0, 1):
        l1 = pt.alloc(i * 512, make_role(1), (l2, i))
        pt.write(l2, i, S.make_nonleaf_spte(l1.pfn))
        t[f"l1_{i}"] = l1
    for i in (0, 1, 5):
        pt.write(t["l1_0"], i, S.make_spte(1000 + i, 1, True))
    for i in (0, 3):
        pt.write(t["l1_1"], i, S.make_spte(2000 + i, 1, False))
    pt.write(l2, 2, S.make_spte(4096, 2, True))
    return t


def walk(it, end, limit=100000):
    out = []
    while it.valid and it.gfn < end and len(out) < limit:
        out.append((it.level, it.gfn))
        it.next()
    return out


def test_tdp_iter_next_preorder():
    t = build_tree()
    it = TdpIter(t["pt"], t["root"], 1, 0)
    got = walk(it, 1536)
    exp = ([(4, 0), (3, 0), (2, 0)] + [(1, g) for g in range(512)] + [(2, 512)]
           + [(1, g) for g in range(512, 1024)] + [(2, 1024)])
    assert got == exp
    # old_spte is the snapshot of the entry visited
    it = TdpIter(t["pt"], t["root"], 1, 5)
    while it.level != 1:
        it.next()
    assert (it.gfn, it.old_spte) == (5, S.make_spte(1005, 1, True))


def test_tdp_iter_min_level_does_not_descend():
    t = build_tree()
    it = TdpIter(t["pt"], t["root"], 3, 0)
    assert walk(it, 3 * L1G) == [(4, 0), (3, 0), (3, L1G), (3, 2 * L1G)]
    it = TdpIter(t["pt"], t["root"], 2, 0)
    assert walk(it, 3 * L2M) == [(4, 0), (3, 0), (2, 0), (2, 512), (2, 1024)]


def test_tdp_iter_start_rounds_down_below_start():
    t = build_tree()
    it = TdpIter(t["pt"], t["root"], 1, 700)
    assert (it.level, it.gfn) == (4, 0)          # first SPTE visited starts below 700
    got = walk(it, 703)
    assert got == [(4, 0), (3, 0), (2, 512), (1, 700), (1, 701), (1, 702)]


def test_try_step_down_rereads_spte():
    t = build_tree()
    it = TdpIter(t["pt"], t["root"], 1, 0)
    while it.level != 2:
        it.next()
    assert it.gfn == 0 and S.is_shadow_present_pte(it.old_spte)
    t["pt"].write(t["l2"], 0, 0)                        # zapped after the visit
    it.next()
    assert (it.level, it.gfn) == (2, 512)     # did not descend into the stale table


def test_tdp_iter_restart_after_yield():
    t = build_tree()
    it = TdpIter(t["pt"], t["root"], 1, 0)
    while (it.level, it.gfn) != (1, 3):
        it.next()
    assert it.next_last_level_gfn == 3
    it.yielded = True
    it.next()
    assert (it.level, it.gfn) == (4, 0) and not it.yielded
    assert it.next_last_level_gfn == 3 and it.yielded_gfn == 3
    assert walk(it, 5) == [(4, 0), (3, 0), (2, 0), (1, 3), (1, 4)]


def test_tdp_iter_forward_progress_bookkeeping():
    t = build_tree()
    it = TdpIter(t["pt"], t["root"], 1, 600)
    assert it.yielded_gfn == it.next_last_level_gfn == 600
    while it.level != 1:
        it.next()
    # stepping down is not progress
    assert it.gfn == 600 and it.yielded_gfn == it.next_last_level_gfn == 600
    it.next()
    assert it.next_last_level_gfn == 601 != it.yielded_gfn
    it.yielded = True
    it.next()
    assert it.yielded_gfn == it.next_last_level_gfn == 601


def test_tdp_iter_step_down_into_freed_table_reports_use_after_free():
    t = build_tree()
    host, l2 = t["host"], t["l2"]
    t["pt"].free(l2)                           # still linked from l3[0]
    it = TdpIter(t["pt"], t["root"], 1, 0)
    got = walk(it, 2 * L1G)
    assert got == [(4, 0), (3, 0), (3, L1G)]
    reps = host.reports_of("use_after_free")
    assert reps and reps[0]["pfn"] == l2.pfn


def test_tdp_iter_inside_poisoned_table_reports_use_after_free():
    t = build_tree()
    it = TdpIter(t["pt"], t["root"], 1, 0)
    it.next()
    assert (it.level, it.gfn) == (3, 0)
    l3 = t["l3"]
    t["pt"].free(l3)                           # the table the iterator is in
    it.next()
    reps = t["host"].reports_of("use_after_free")
    assert reps[0]["pfn"] == l3.pfn and "freed L3 table" in reps[0]["what"]
    assert not it.valid                        # the walk stops there


def test_tdp_iter_walk_inside_freed_4k_table_reports_use_after_free():
    t = build_tree()
    it = TdpIter(t["pt"], t["root"], 1, 0)
    while it.level != 1:
        it.next()
    t["pt"].free(t["l1_0"])                    # freed under the walker (RCU violation)
    it.next()
    assert it.old_spte == POISON and S.is_shadow_present_pte(it.old_spte)
    assert t["host"].reports_of("use_after_free")


# ---- memslots ----------------------------------------------------------------------------

def test_gfn_to_memslot_find_bisect_edges():
    ms = Memslots()
    a, b, c = (Memslot(i, g, n, HVA_BASE) for i, g, n in ((1, 100, 50), (2, 200, 10), (0, 150, 10)))
    for s in (a, b, c):
        ms.add(s)
    exp = {0: None, 99: None, 100: a, 149: a, 150: c, 159: c, 160: None, 199: None,
           200: b, 209: b, 210: None, 10**9: None}
    for gfn, slot in exp.items():
        assert ms.find(gfn) is slot, gfn
    ms.remove(0)
    assert ms.find(150) is None and ms.find(149) is a


def test_by_hva_aliasing_slots_and_hva_range_to_gfns():
    ms = Memslots()
    a, b = Memslot(1, 100, 50, HVA_BASE), Memslot(2, 1000, 50, HVA_BASE)
    ms.add(b)
    ms.add(a)
    got = [(s.id, g0, g1) for s, g0, g1 in ms.by_hva(HVA_BASE + 10 * PAGE, HVA_BASE + 12 * PAGE)]
    assert got == [(1, 110, 112), (2, 1010, 1012)]
    # partial pages round outward, ranges clamp to the slot
    assert a.hva_range_to_gfns(HVA_BASE + 10 * PAGE + 1, HVA_BASE + 11 * PAGE + 1) == (110, 112)
    assert a.hva_range_to_gfns(HVA_BASE - 5 * PAGE, HVA_BASE + 1) == (100, 101)
    assert a.hva_range_to_gfns(HVA_BASE + 49 * PAGE, HVA_BASE + 99 * PAGE) == (149, 150)
    assert a.hva_range_to_gfns(HVA_BASE - PAGE, HVA_BASE) is None
    assert a.hva_range_to_gfns(HVA_BASE + 50 * PAGE, HVA_BASE + 51 * PAGE) is None
    assert list(ms.by_hva(HVA_BASE + 50 * PAGE, HVA_BASE + 60 * PAGE)) == []


G = 1 << 20   # 2M- (and 1G-) aligned gfn


@pytest.mark.parametrize("slot_args, gfn, level", [
    ((G, 1024, HVA_BASE, 0, 1), G + 700, 1),                     # 4K backing
    ((G, 1024, HVA_BASE, 0, 512), G + 700, 2),                   # hugetlb, aligned
    ((G, 1024, HVA_BASE, 0, 512), G, 2),
    ((G, L1G, HVA_BASE, 0, 512), G + 5, 2),                      # never 1G on 2M pages
    ((G + 256, 1024, HVA_BASE + 256 * PAGE, 0, 512), G + 600, 2),  # inside, co-aligned
    ((G + 256, 1024, HVA_BASE + 256 * PAGE, 0, 512), G + 300, 1),  # crosses slot start
    ((G + 256, 1024, HVA_BASE + 256 * PAGE, 0, 512), G + 1100, 1),  # crosses slot end
    ((G, 1024, HVA_BASE + PAGE, 0, 512), G + 700, 1),            # gfn/hva misaligned
    ((G, 1024, HVA_BASE, KVM_MEM_LOG_DIRTY_PAGES, 512), G + 700, 1),  # dirty logging
])
def test_kvm_mmu_max_mapping_level(slot_args, gfn, level):
    base, npages, hva, flags, hp = slot_args
    slot = Memslot(1, base, npages, hva, flags, 0, hp)
    assert slot.max_mapping_level(gfn) == level
    assert slot.max_mapping_level(gfn, max_level=1) == 1


@pytest.mark.parametrize("hugetlb, level", [(False, 1), (True, 2)])
def test_kvm_mmu_max_mapping_level_from_memslot_backing(hugetlb, level):
    h = VmHarness(hugetlb=hugetlb)
    slot = h.kvm.memslots[0].find(h.slot_gfn(1))
    assert slot.host_level_pages == (512 if hugetlb else 1)
    assert slot.max_mapping_level(h.slot_gfn(1) + 17) == level


def test_check_region_errors():
    host = Host()
    mm = host.mm("t")
    hva = mm.mmap(16)
    ok = dict(slot_id=0, flags=0, base_gfn=16, npages=16, mm=mm, userspace_addr=hva,
              max_gfn=1 << 28)
    check_region(**ok)
    check_region(**{**ok, "slot_id": KVM_USER_MEM_SLOTS - 1})
    check_region(**{**ok, "base_gfn": (1 << 28) - 16})
    check_region(**{**ok, "npages": 0, "userspace_addr": 0})      # delete: hva unchecked
    bad = [({"slot_id": -1}, "slot"), ({"slot_id": KVM_USER_MEM_SLOTS}, "slot"),
           ({"flags": 1 << 2}, "flags"), ({"npages": KVM_MEM_MAX_NR_PAGES + 1}, "memory_size"),
           ({"base_gfn": (1 << 28) - 15}, "MAXPHYADDR"),
           ({"userspace_addr": hva + 100 * PAGE}, "not mapped")]
    for change, msg in bad:
        with pytest.raises(ValueError, match=msg):
            check_region(**{**ok, **change})


def test_set_user_memory_region_refuses_overlap():
    h = VmHarness()
    g = h.slot_gfn(1)
    with pytest.raises(ValueError, match="overlaps"):
        run_now(h.kvm.set_user_memory_region(None, 5, 0, (g + h.pages - 1) * PAGE, 16 * PAGE,
                                             h.hva))
    assert len(h.kvm.memslots[0]) == 1
    h.add_slot()                                       # adjacent: fine
    assert h.kvm.memslots[0].find(h.slot_gfn(2)).id == 2


def test_set_user_memory_region_slot_limit(monkeypatch):
    monkeypatch.setattr(kvm_vm, "KVM_USER_MEM_SLOTS", 2)
    h = VmHarness()
    h.add_slot()
    with pytest.raises(ValueError, match="at most 2"):
        h.add_slot()
    assert len(h.kvm.memslots[0]) == 2


# ---- TLB, PSC and the hardware walker ----------------------------------------------------

def test_hw_walk_sets_accessed_and_dirty():
    t = build_tree()
    l1 = t["l1_0"]
    t["pt"].write(l1, 5, S.make_spte(1005, 1, True) & ~(A | D))
    tlb = Tlb(None, None)
    r = hw_walk(t["pt"], t["root"], tlb, 5, write=False)
    assert r.ok and r.pfn == 1005 and r.level == 1 and r.writable
    assert t["pt"].read(l1, 5) & A and not t["pt"].read(l1, 5) & D
    r = hw_walk(t["pt"], t["root"], tlb, 5, write=True)
    assert r.ok and t["pt"].read(l1, 5) & D
    # PSC filled on the way: the level-2 entry (PDE) -> the 4K table
    assert tlb.psc_lookup(2, 5) == l1.pfn and tlb.psc_lookup(2, 511) == l1.pfn
    assert tlb.psc_lookup(2, 512) is None
    # the cached L2 entry is used: the walk works with the upper levels zapped
    t["pt"].write(t["root"], 0, 0)
    assert hw_walk(t["pt"], t["root"], tlb, 1, write=False).pfn == 1001
    r = hw_walk(t["pt"], t["root"], Tlb(), 1, write=False)
    assert not r.ok and r.freed_table is None


def test_hw_walk_large_leaf_offset():
    t = build_tree()
    r = hw_walk(t["pt"], t["root"], Tlb(), 1024 + 7, write=True)
    assert r.ok and r.level == 2 and r.pfn == 4096 + 7


def test_hw_walk_violations():
    t = build_tree()
    l1 = t["l1_1"]                      # read-only leaves at 512, 515
    before = t["pt"].read(l1, 3)
    r = hw_walk(t["pt"], t["root"], Tlb(), 515, write=True)
    assert not r.ok and t["pt"].read(l1, 3) == before
    assert hw_walk(t["pt"], t["root"], Tlb(), 515, write=False).ok
    assert not hw_walk(t["pt"], t["root"], Tlb(), 514, write=False).ok
    t["pt"].write(l1, 0, S.REMOVED_SPTE)
    assert not hw_walk(t["pt"], t["root"], Tlb(), 512, write=False).ok
    assert not hw_walk(t["pt"], t["root"], Tlb(), 3 * L2M, write=False).ok


def test_hw_walk_psc_freed_table():
    t = build_tree()
    tlb = Tlb(None, None)
    assert hw_walk(t["pt"], t["root"], tlb, 1, write=False).ok
    l1 = t["l1_0"]
    t["pt"].write(t["l2"], 0, 0)                  # unlinked, then freed without a flush
    t["pt"].free(l1)
    r = hw_walk(t["pt"], t["root"], tlb, 1, write=False)
    assert not r.ok and r.freed_table is not None and r.freed_table[0] == l1.pfn
    tlb.flush()
    r = hw_walk(t["pt"], t["root"], tlb, 1, write=False)
    assert not r.ok and r.freed_table is None


def test_vcpu_access_fills_tlb_after_hw_walk():
    h = VmHarness()
    pt, v = h.tdp.pt, h.vcpus[0]
    gfn = h.slot_gfn(1) + 3
    pfn, gen = h.mm.lookup(h.hva + 3 * PAGE)
    root = pt.alloc(0, make_role(4), None)
    sp, parent = root, root
    for level in (3, 2, 1):
        sp = pt.alloc(S.round_gfn_for_level(gfn, level + 1), make_role(level), (parent, 0))
        pt.write(parent, S.spte_index(gfn, level + 1), S.make_nonleaf_spte(sp.pfn))
        parent = sp
    pt.write(sp, S.spte_index(gfn, 1), S.make_spte(pfn, 1, True) & ~D, gen)
    v.root = root
    assert v._access(gfn, False)
    e = v.tlb.lookup(gfn)
    assert e is not None and (e.pfn, e.gen, e.dirty) == (pfn, gen, False)
    assert v.tlb.misses == 1 and v._access(gfn, False) and v.tlb.hits == 1
    assert v._access(gfn, True) and v.tlb.lookup(gfn).dirty and v.tlb.misses == 2
    assert pt.read(sp, S.spte_index(gfn, 1)) & D and not h.findings


def _e(pfn):
    return TlbEntry(pfn, 1, True, False, 0, 1)


def test_tlb_lru_eviction():
    tlb = Tlb(capacity=2, psc_capacity=1)
    tlb.fill(1, _e(11))
    tlb.fill(2, _e(12))
    assert tlb.lookup(1).pfn == 11          # 1 becomes most recently used
    tlb.fill(3, _e(13))
    assert set(tlb.entries) == {1, 3} and tlb.lookup(2) is None
    tlb.psc_fill(2, 0, 100)
    tlb.psc_fill(3, 0, 200)                 # per-level capacity
    tlb.psc_fill(2, 512, 101)
    assert tlb.psc_lookup(2, 0) is None and tlb.psc_lookup(2, 513) == 101
    assert tlb.psc_lookup(3, 0) == 200
    unbounded = Tlb(capacity=None, psc_capacity=None)      # None: never evicts
    for g in range(3000):
        unbounded.fill(g, _e(g))
        unbounded.psc_fill(2, g * 512, g)
    assert len(unbounded.entries) == 3000 and unbounded.lookup(0).pfn == 0
    assert len(unbounded.psc[2]) == 3000 and unbounded.psc_lookup(2, 0) == 0


def test_tlb_flush_empties_tlb_and_psc():
    tlb = Tlb()
    tlb.fill(1, _e(1))
    tlb.psc_fill(2, 0, 5)
    tlb.flush(now=77)
    assert not tlb.entries and tlb.psc_lookup(2, 0) is None and not tlb.psc
    assert tlb.flushes == 1 and tlb.last_flush_t == 77


def test_tlb_fill_many_is_the_same_as_filling_one_by_one():
    """Filling at least ``capacity`` entries at once is kept as arrays until the TLB is read;
    what is read then must be what per-entry LRU fills would have left."""
    import numpy as np
    for n in (3, 8, 20):
        a, b = Tlb(8, 4), Tlb(8, 4)
        for t in (a, b):
            t.fill(1000, TlbEntry(1, 1, True, True, 0, 1))
            t.fill(5, TlbEntry(9, 1, True, True, 0, 1))
        g = np.arange(n, dtype=np.int64) * 3
        p, gen, tm = g + 100, np.ones(n, dtype=np.uint32), g * 10
        a.fill_many(g, p, gen, tm, True, False)
        for i in range(n):
            b.fill(int(g[i]), TlbEntry(int(p[i]), 1, True, False, int(tm[i]), 1))
        assert sorted(a.gfns_in(0, 10**6)) == sorted(b.entries)
        assert [(k, e.pfn, e.fill_t, e.dirty) for k, e in a.entries.items()] == \
            [(k, e.pfn, e.fill_t, e.dirty) for k, e in b.entries.items()]
        assert (a.lookup(int(g[-1])) is None) == (b.lookup(int(g[-1])) is None)


@settings(max_examples=300, deadline=None)
@given(cap=st.sampled_from([None, 1, 2, 3, 8]),
       before=st.lists(st.integers(0, 20), unique=True, max_size=10),
       walks=st.lists(st.integers(0, 20), unique=True, max_size=15))
def test_psc_fill_new_is_a_lookup_then_fill_per_walk(cap, before, walks):
    """The batch PDE-cache fill of a populate bulk equals exact mode's walk by walk:
    fill unless the region is cached at that walk's turn (hits refresh nothing)."""
    one, many = Tlb(None, cap), Tlb(None, cap)
    for k in before:
        one.psc_fill(2, k << 9, 1000 + k)
        many.psc_fill(2, k << 9, 1000 + k)
    for k in walks:
        if one.psc_lookup(2, k << 9) is None:
            one.psc_fill(2, k << 9, 2000 + k)
    many.psc_fill_new(2, np.array([k << 9 for k in walks], dtype=np.int64),
                      [2000 + k for k in walks])
    assert list(many.psc.get(2, {}).items()) == list(one.psc.get(2, {}).items())
