"""Every oracle and every monitor fires on a provoked violation.

Each oracle test builds a small VM, does the correct setup, then misuses the model's
primitives the way a buggy kernel would (a free that skips RCU, a missing flush, a lost
reference, a sabotaged handler...) and asserts the finding's kind, task and key details.
The same scenario run the correct way (``buggy=False``) must produce no finding.  Each
monitor test drives a scenario that the monitor must measure.
"""

import numpy as np
import pytest

from tdpsim.host.mm import PAGE
from tdpsim.kvm.vcpu import Accesses, Guest, TouchGuest
from tdpsim.kvm.vm import EXITING_GUEST_MODE, IN_GUEST_MODE
from tdpsim.mmu import spte as S
from tdpsim.mmu.tdp_iter import TdpIter
from tdpsim.workloads.vm import GPA_4G_GFN, VmHarness
from vmhelpers import driver, linked_tables, one_shot, quiesce

MS = 1_000_000


# ---- helpers ---------------------------------------------------------------------------------

Gate = one_shot


class Spin(Guest):
    """Guest code cycling over ``gfns`` (writes) until ``stop()`` or a time limit."""

    def __init__(self, h, gfns, stop, limit_ns=20 * MS):
        self.h, self.gfns, self.stop, self.pos = h, list(gfns), stop, 0
        self.deadline = h.host.engine.now + limit_ns

    @property
    def done(self) -> bool:
        return self.stop() or self.h.host.engine.now > self.deadline

    def current(self):
        return self.gfns[self.pos % len(self.gfns)], True

    def advance(self):
        self.pos += 1


def touched(h, n=256, v=0):
    """vCPU ``v`` touches the first ``n`` pages of memslot 1; returns a Gate set after."""
    done = Gate(h)

    def script(th, vcpu):
        yield from vcpu.run(th, TouchGuest(h.slot_gfn(1), n))
        done.complete_all()
    h.spawn_vcpu(h.vcpus[v], script)
    return done


def spinning(h, gfns, stop, n=64, limit_ns=2 * MS):
    """vCPU 0 touches ``n`` pages of memslot 1 then spins in guest mode over ``gfns``;
    returns a Gate set when the spinning starts."""
    spin = Gate(h)

    def script(th, v):
        yield from v.run(th, TouchGuest(h.slot_gfn(1), n))
        spin.complete_all()
        yield from v.run(th, Spin(h, gfns, stop, limit_ns))
    h.spawn_vcpu(h.vcpus[0], script)
    return spin


def in_guest(th, v, spin=None):
    """Wait for ``spin`` (a Gate), then (polling) until vCPU ``v`` is in guest mode."""
    if spin is not None:
        yield from spin.wait(th)
    while v.mode != IN_GUEST_MODE:
        yield 50


def leaf_it(h, root, gfn):
    """A TDP iterator positioned on the 4 KiB entry of ``gfn`` (its table must exist)."""
    it = TdpIter(h.tdp.pt, root, S.PG_LEVEL_4K, gfn)
    while it.valid and not (it.level == S.PG_LEVEL_4K and it.gfn == gfn):
        it.next()
    assert it.valid
    return it


def l1_table(h):
    (sp,) = [sp for sp in linked_tables(h) if sp.level == 1]
    return sp


def kinds(h):
    return [f.kind for f in h.findings]


def only(h, kind):
    fs = [f for f in h.findings if f.kind == kind]
    assert fs, f"no {kind} finding; got {[str(f) for f in h.findings]}"
    return fs


# ---- warn ------------------------------------------------------------------------------------

@pytest.mark.parametrize("buggy", [False, True])
def test_warn_zap_root_without_a_reference(buggy):
    """A thread keeps a pointer to a root without a reference; the vCPU puts the last one
    (the root goes to call_rcu) and the thread then zaps it: WARN refcount zero."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    g0, st = h.slot_gfn(1), {}
    populated, zapped, rerun = Gate(h), Gate(h), Gate(h)

    def vcpu(th, v):
        yield from v.run(th, TouchGuest(g0, 64))
        populated.complete_all()
        yield from zapped.wait(th)
        yield from v.run(th, TouchGuest(g0, 1))      # drops the obsolete root
        rerun.complete_all()

    def fn(th):
        st["root"] = root = h.vcpus[0].root
        yield from h.arch.kvm_mmu_zap_all_fast(th)
        if not buggy:
            assert h.tdp.kvm_tdp_mmu_get_root(root)
        zapped.complete_all()
        yield from rerun.wait(th)
        yield from h.kvm.mmu_lock.write_lock(th)
        yield from h.tdp.tdp_mmu_zap_root(th, root, shared=False)
        if not buggy:
            yield from h.tdp.kvm_tdp_mmu_put_root(th, root, shared=False)
        h.kvm.mmu_lock.write_unlock(th)
        yield from quiesce(th, h)

    h.spawn_vcpu(h.vcpus[0], vcpu)
    driver(h, fn, populated)
    h.run()
    assert st["root"].freed
    if not buggy:
        assert h.findings == []
        return
    (f,) = h.findings
    assert (f.kind, f.task, f.details["warn"]) == ("warn", "driver", "zap_root_refcount_zero")
    assert f.details["root"] == st["root"].id and f.excerpt


def freeze_race(h, racer):
    """``zapper`` freezes gfn+5 with tdp_mmu_zap_spte_atomic (mmu_lock read, RCU); ``racer``
    gets an iterator read before the freeze and runs ``racer(th, it)`` while it is frozen."""
    g = h.slot_gfn(1) + 5
    st = {}

    def zapper(th):
        yield 1000                           # the racer reads the entry first
        yield from h.kvm.mmu_lock.read_lock(th)
        h.host.rcu.read_lock(th)
        it = leaf_it(h, h.tdp.roots[0], g)
        st["sp"], st["index"] = it.sp, it.index
        st["ok"] = yield from h.tdp.tdp_mmu_zap_spte_atomic(th, it)
        h.host.rcu.read_unlock(th)
        h.kvm.mmu_lock.read_unlock(th)

    def race(th):
        stale = leaf_it(h, h.tdp.roots[0], g)
        st["stale"] = stale.old_spte
        for _ in range(1000):
            if h.tdp.frozen:
                break
            yield 10
        st["saw_frozen"] = bool(h.tdp.frozen)
        yield from racer(th, stale)

    populated = touched(h, 16)
    driver(h, zapper, populated, name="zapper")
    driver(h, race, populated, name="racer")
    return st


@pytest.mark.parametrize("buggy", [False, True])
def test_warn_set_spte_atomic_on_removed_spte(buggy):
    """A reader re-reads a frozen (REMOVED) entry and cmpxchgs it instead of retrying."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    g = h.slot_gfn(1) + 5

    def racer(th, _stale):
        yield from h.kvm.mmu_lock.read_lock(th)
        h.host.rcu.read_lock(th)
        it = leaf_it(h, h.tdp.roots[0], g)
        assert S.is_removed_spte(it.old_spte)
        if buggy:
            st["ret"] = yield from h.tdp.tdp_mmu_set_spte_atomic(th, it, 0)
        h.host.rcu.read_unlock(th)
        h.kvm.mmu_lock.read_unlock(th)

    st = freeze_race(h, racer)
    h.run()
    assert st["saw_frozen"] and st["ok"]
    assert h.tdp.pt.read(st["sp"], st["index"]) == 0           # the freezer wrote the final 0
    if not buggy:
        assert h.findings == []
        return
    (f,) = h.findings
    assert st["ret"] is False
    assert (f.kind, f.task) == ("warn", "racer")
    assert f.details == {"warn": "set_spte_atomic_on_removed_or_yielded", "gfn": g, "level": 1}


# ---- SPTE ownership ----------------------------------------------------------------------------

@pytest.mark.parametrize("buggy", [False, True])
def test_removed_written_by_non_owner(buggy):
    """While one thread has the entry frozen (flushing), another overwrites it through a
    stale iterator with the non-atomic setter."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)

    def racer(th, stale):
        if buggy:
            yield from h.tdp.tdp_mmu_set_spte(th, stale, 0)

    st = freeze_race(h, racer)
    h.run()
    assert st["saw_frozen"] and st["ok"] and S.is_shadow_present_pte(st["stale"])
    if not buggy:
        assert h.findings == []
        return
    f = h.findings[0]
    assert (f.kind, f.task) == ("removed_written_by_non_owner", "racer")
    assert f.details == {"sp": st["sp"].id, "index": st["index"], "freezer": "zapper"}
    # the overwrite also writes A/D back with the generation the freeze left in the entry
    # (0), which the allocator sees as an access to a reused page: a consequence of the bug
    assert len(only(h, "removed_written_by_non_owner")) == 1
    assert set(kinds(h)) <= {"removed_written_by_non_owner", "use_after_free"}


# ---- page-table and host-page use after free ---------------------------------------------------

@pytest.mark.parametrize("buggy", [False, True])
def test_use_after_free_hw_walk_through_pde_cache(buggy):
    """A 4 KiB table freed directly (no unlink, no RCU, no flush) while the vCPU's PDE cache
    still points at it: the vCPU's next walk below it reads the freed page."""
    h = VmHarness(nvcpus=1, pages=512, nslots=1)
    g0, st = h.slot_gfn(1), {}
    populated, freed = Gate(h), Gate(h)

    def vcpu(th, v):
        yield from v.run(th, TouchGuest(g0, 256))
        populated.complete_all()
        yield from freed.wait(th)
        st["psc"] = v.tlb.psc_lookup(2, g0 + 300)
        yield from v.run(th, Spin(h, [g0 + 300], lambda: bool(h.findings) or
                                  v.stat["pf_fixed"] > 256))

    def fn(th):
        st["sp"] = sp = l1_table(h)
        if buggy:
            h.tdp.pt.free(sp, th)
        freed.complete_all()
        yield 1

    h.spawn_vcpu(h.vcpus[0], vcpu)
    driver(h, fn, populated)
    h.run()
    assert st["psc"] == st["sp"].pfn                    # the PDE cache held the table
    if not buggy:
        assert h.findings == [] and h.vcpus[0].stat["pf_fixed"] == 257
        return
    f = h.findings[0]
    assert (f.kind, f.task) == ("use_after_free", "vcpu0")
    assert f.details["pfn"] == st["sp"].pfn
    assert f.details["what"] == "hardware walk through PDE cache"


def test_kvm_zap_gfn_range_merges_its_retry_range_with_an_invalidation_in_progress():
    """kvm_zap_gfn_range bumps the notifier count through kvm_inc_notifier_count: merged
    with an invalidation in progress (min/max), and left so until that one ends.  (The
    model's range is the whole hva space, where 5.17/5.18 pass the gfns.)"""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    kvm = h.kvm
    g = h.slot_gfn(1) + 7
    hva0, hva1 = h.hva, h.hva + 8 * PAGE
    st = {}

    def fn(th):
        kvm.kvm_inc_notifier_count(hva0, hva1)      # invalidate_range_start in progress
        yield from h.arch.kvm_zap_gfn_range(th, g, g + 1)
        st["range"] = (kvm.mmu_notifier_count, kvm.mmu_notifier_range_start,
                       kvm.mmu_notifier_range_end)
        kvm.kvm_dec_notifier_count(hva0, hva1)
        st["after"] = kvm.mmu_notifier_count

    driver(h, fn, touched(h, 16))
    h.run()
    assert st["range"] == (1, 0, 1 << 62) and st["after"] == 0
    assert h.findings == []


@pytest.mark.parametrize("buggy", [False, True])
def test_use_after_free_dirty_write_back_to_freed_host_page(buggy):
    """The host frees a page KVM still maps (no mmu_notifier); zapping the dirty leaf later
    writes A/D back to the freed page."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    g = h.slot_gfn(1) + 7
    pfn = h.memfd.pfn_of(7)

    def fn(th):
        if buggy:
            h.host.memory.free(pfn, th)
        yield from h.arch.kvm_zap_gfn_range(th, g, g + 1)

    driver(h, fn, touched(h, 16))
    h.run()
    if not buggy:
        assert h.findings == []
        return
    assert set(kinds(h)) == {"use_after_free"}
    whats = [f.details["what"] for f in h.findings]
    assert "dirty write-back" in whats and "accessed write-back" in whats
    for f in h.findings:
        assert f.task == "driver" and f.details["pfn"] == pfn and f.details["reused"] is False


@pytest.mark.parametrize("buggy", [False, True])
def test_double_free_of_a_page_table(buggy):
    """A zapped table is freed at once by a buggy path and again by its RCU callback."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    st = {}

    def fn(th):
        st["sp"] = sp = l1_table(h)
        yield from h.kvm.mmu_lock.write_lock(th)
        h.host.rcu.read_lock(th)
        flush = yield from h.tdp.kvm_tdp_mmu_zap_sp(th, sp)   # call_rcu(free) queued
        h.host.rcu.read_unlock(th)
        if flush:
            yield from h.kvm.flush_remote_tlbs(th)
        if buggy:
            h.tdp.pt.free(sp, th)
        h.kvm.mmu_lock.write_unlock(th)
        yield from quiesce(th, h)

    driver(h, fn, touched(h, 16))
    h.run()
    sp = st["sp"]
    assert sp.freed
    if not buggy:
        assert h.findings == [] and h.tdp.pt.freed == 1
        return
    (f,) = h.findings
    assert (f.kind, f.task) == ("double_free", None)       # from the RCU callback
    assert f.details == {"pfn": sp.pfn, "owner": f"vm:pt sp#{sp.id}"}


@pytest.mark.parametrize("via_tlb", [True, False])
@pytest.mark.parametrize("buggy", [False, True])
def test_guest_access_freed_page(buggy, via_tlb):
    """The host frees a page the guest still maps: the next access (a TLB hit, or with a
    one-entry TLB a hardware walk through the stale SPTE) touches the freed page."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1, tlb_capacity=None if via_tlb else 1)
    g0, st = h.slot_gfn(1), {}
    gfns = [g0 + 2] if via_tlb else [g0 + 1, g0 + 2]
    pfn = h.memfd.pfn_of(2)
    spin = spinning(h, gfns, lambda: bool(h.findings) or st.get("stop"), n=8)

    def fn(th):
        yield from in_guest(th, h.vcpus[0], spin)
        yield 200
        if buggy:
            h.host.memory.free(pfn, th)
        yield 2000
        st["stop"] = True

    driver(h, fn)
    h.run()
    if not buggy:
        assert h.findings == []
        return
    f = h.findings[0]
    assert (f.kind, f.task) == ("guest_access_freed_page", "vcpu0")
    assert f.details == {"gfn": g0 + 2, "pfn": pfn, "via_tlb": via_tlb}


@pytest.mark.parametrize("granularity", ["exact", "fast"])
@pytest.mark.parametrize("buggy", [False, True])
def test_guest_access_freed_page_while_populating(buggy, granularity):
    """A host page the memfd still maps is freed before the guest first touches it: its
    access is the one finding, whether it is a step of its own (exact) or part of a
    closed-form populate bulk whose accesses are checked as runs (fast: the page lies in
    the second 1 GiB region of the slot, which nothing maps yet)."""
    h = VmHarness(nvcpus=1, pages=1024, nslots=1, granularity=granularity,
                  first_gfn=GPA_4G_GFN + (1 << 18) - 512)
    g0 = h.slot_gfn(1)
    if buggy:
        h.host.memory.free(h.memfd.pfn_of(700))

    def script(th, v):
        yield from v.run(th, TouchGuest(g0, 1024))
    h.spawn_vcpu(h.vcpus[0], script)
    h.run()
    if not buggy:
        assert h.findings == []
        return
    (f,) = h.findings
    assert (f.kind, f.task) == ("guest_access_freed_page", "vcpu0")
    assert f.details == {"gfn": g0 + 700, "pfn": h.memfd.pfn_of(700), "via_tlb": False}


def test_accesses_by_runs_read_as_arrays():
    acc = Accesses.by_runs([(100, 7, 3, 1), (200, 50, 2, 4)], lambda: [0] * 5, True)
    assert acc.gfns.tolist() == [100, 101, 102, 200, 201]
    assert acc.pfns.tolist() == [7, 8, 9, 50, 51]
    assert acc.gens.tolist() == [1, 1, 1, 4, 4]
    assert not acc.via_tlb and acc.fill_t == [0] * 5


# ---- page-table lifetime -------------------------------------------------------------------------

@pytest.mark.parametrize("buggy", [False, True])
def test_pt_freed_before_flush(buggy):
    """A table is unlinked (kvm_tdp_mmu_zap_sp) but the caller skips the deferred flush:
    after the grace period it is freed while the vCPU, in guest mode on that root, still
    runs on translations it cached before the unlink."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1,
                  costs={"rcu_gp_min": 50_000, "guest_access": 500})
    g0, st = h.slot_gfn(1), {}
    spin = spinning(h, range(g0, g0 + 8), lambda: st.get("stop", False))

    def fn(th):
        yield from in_guest(th, h.vcpus[0], spin)
        st["sp"] = sp = l1_table(h)
        yield from h.kvm.mmu_lock.write_lock(th)
        h.host.rcu.read_lock(th)
        yield from h.tdp.kvm_tdp_mmu_zap_sp(th, sp)
        h.host.rcu.read_unlock(th)
        if not buggy:
            yield from h.kvm.flush_remote_tlbs(th)
        h.kvm.mmu_lock.write_unlock(th)
        yield from h.host.rcu.rcu_barrier(th)
        st["stop"] = True

    driver(h, fn)
    h.run()
    sp = st["sp"]
    assert sp.freed
    if not buggy:
        assert h.findings == []
        return
    (f,) = h.findings
    assert (f.kind, f.task) == ("pt_freed_before_flush", "vcpu0")
    assert f.details == {"sp": sp.id, "level": 1, "unlinked": sp.unlink_t}


@pytest.mark.parametrize("buggy", [False, True])
def test_pt_freed_while_linked(buggy):
    """call_rcu(free) on a table that was never unlinked from its parent."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    st = {}

    def fn(th):
        st["sp"] = sp = l1_table(h)
        if buggy:
            h.host.rcu.call_rcu(lambda: h.tdp._free_sp_rcu(sp))
        else:
            yield from h.kvm.mmu_lock.write_lock(th)
            h.host.rcu.read_lock(th)
            yield from h.tdp.kvm_tdp_mmu_zap_sp(th, sp)
            h.host.rcu.read_unlock(th)
            yield from h.kvm.flush_remote_tlbs(th)
            h.kvm.mmu_lock.write_unlock(th)
        yield from h.host.rcu.rcu_barrier(th)

    driver(h, fn, touched(h, 16))
    h.run()
    sp = st["sp"]
    assert sp.freed and sp.unlinked is not buggy
    if not buggy:
        assert h.findings == []
        return
    (f,) = h.findings
    assert (f.kind, f.task) == ("pt_freed_while_linked", None)
    assert f.details == {"sp": sp.id, "level": 1}


# ---- roots -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("buggy", [False, True])
def test_refcount_underflow(buggy):
    """A thread puts the vCPU's root reference (one put too many); the worker then frees the
    root and the vCPU's own put underflows."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    g0, st = h.slot_gfn(1), {}
    populated, put = Gate(h), Gate(h)

    def vcpu(th, v):
        yield from v.run(th, TouchGuest(g0, 16))
        st["root"] = v.root
        populated.complete_all()
        yield from put.wait(th)
        yield from v.set_sregs_toggle_cr0_wp(th)      # kvm_mmu_unload: puts its reference

    def fn(th):
        root = st["root"]
        yield from h.kvm.mmu_lock.write_lock(th)
        if not buggy:
            assert h.tdp.kvm_tdp_mmu_get_root(root)
        yield from h.tdp.kvm_tdp_mmu_put_root(th, root, shared=False)
        h.kvm.mmu_lock.write_unlock(th)
        yield from quiesce(th, h)
        put.complete_all()

    h.spawn_vcpu(h.vcpus[0], vcpu)
    driver(h, fn, populated)
    h.run()
    root = st["root"]
    if not buggy:
        assert h.findings == [] and root.tdp_mmu_root_count == 1 and not root.freed
        return
    (f,) = h.findings
    assert root.freed
    assert (f.kind, f.task) == ("refcount_underflow", "vcpu0")
    assert f.details == {"root": root.id, "count": 0}


@pytest.mark.parametrize("buggy", [False, True])
def test_invalid_root_gains_spte(buggy):
    """A leaf installed with tdp_mmu_set_spte into a root already invalidated (the buggy
    order); the correct order installs before the invalidation."""
    h = VmHarness(nvcpus=1, pages=512, nslots=1)
    g = h.slot_gfn(1) + 300
    pfn, gen = h.memfd.page(300)
    st = {}

    def install(th, root):
        it = leaf_it(h, root, g)
        assert not S.is_shadow_present_pte(it.old_spte)
        yield from h.tdp.tdp_mmu_set_spte(th, it, S.make_spte(pfn, 1, writable=True), gen)

    def fn(th):
        st["root"] = root = h.tdp.roots[0]
        yield from h.kvm.mmu_lock.write_lock(th)
        h.host.rcu.read_lock(th)
        if not buggy:
            yield from install(th, root)
        h.tdp.kvm_tdp_mmu_invalidate_all_roots(th)
        if buggy:
            yield from install(th, root)
        h.host.rcu.read_unlock(th)
        h.kvm.mmu_lock.write_unlock(th)
        yield from quiesce(th, h)

    driver(h, fn, touched(h, 256))
    h.run()
    if not buggy:
        assert h.findings == []
        return
    (f,) = h.findings
    assert (f.kind, f.task) == ("invalid_root_gains_spte", "driver")
    assert f.details == {"root": st["root"].id, "gfn": g}


@pytest.mark.parametrize("buggy", [False, True])
def test_reader_ref_invalid_root(buggy):
    """A mmu_lock reader walks the roots with only_valid=False and takes a reference to an
    invalid root (5.18 forbids it; the kernel also WARNs)."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    st = {"visited": []}

    def body(root):
        st["visited"].append(root)
        yield 10

    def fn(th):
        st["root"] = h.tdp.roots[0]
        yield from h.kvm.mmu_lock.write_lock(th)
        h.tdp.kvm_tdp_mmu_invalidate_all_roots(th)
        h.kvm.mmu_lock.write_unlock(th)
        yield from h.kvm.mmu_lock.read_lock(th)
        yield from h.tdp.walk_roots(th, 0, shared=True, only_valid=not buggy, body=body)
        h.kvm.mmu_lock.read_unlock(th)
        yield from quiesce(th, h)

    driver(h, fn, touched(h, 16))
    h.run()
    if not buggy:
        assert h.findings == [] and st["visited"] == []
        return
    assert st["visited"] == [st["root"]]
    (ref,) = only(h, "reader_ref_invalid_root")
    assert (ref.kind, ref.task) == ("reader_ref_invalid_root", "driver")
    # tdp_mmu_next_root WARNs at each step of the walk (first root, then the end)
    assert [(f.kind, f.task, f.details) for f in h.findings if f is not ref] == \
        [("warn", "driver", {"warn": "reader_walks_invalid_roots"})] * 2
    assert ref.details == {"root": st["root"].id}


@pytest.mark.parametrize("buggy", [False, True])
def test_zap_all_fast_returned_early(buggy, monkeypatch):
    """kvm_tdp_mmu_zap_invalidated_roots sabotaged to return without flushing the zap
    workqueue: kvm_mmu_zap_all_fast returns while the invalid root still maps memory."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    st = {}
    if buggy:
        def no_flush(th):
            return
            yield
        monkeypatch.setattr(h.tdp, "kvm_tdp_mmu_zap_invalidated_roots", no_flush)

    def fn(th):
        st["root"] = h.tdp.roots[0]
        yield from h.arch.kvm_mmu_zap_all_fast(th)
        yield from quiesce(th, h)

    driver(h, fn, touched(h, 16))
    h.run()
    assert h.tdp.zap_wq.completed == 1                    # the worker zapped it eventually
    if not buggy:
        assert h.findings == []
        return
    (f,) = h.findings
    assert (f.kind, f.task) == ("zap_all_fast_returned_early", "driver")
    # the root, its L3, L2 and L1 links plus 16 leaves
    assert f.details == {"root": st["root"].id, "present_entries": 3 + 16}


@pytest.mark.parametrize("buggy", [False, True])
def test_yield_without_progress(buggy):
    """A walk whose forward-progress guard is broken (yielded_gfn reset after the restart)
    yields mmu_lock twice at the same gfn."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    st = {}
    locked = Gate(h)

    def contender(th):
        yield from locked.wait(th)
        for _ in range(2):
            yield from h.kvm.mmu_lock.write_lock(th)   # queued: rwlock_needbreak
            yield 100                                  # the walker queues up meanwhile
            h.kvm.mmu_lock.write_unlock(th)

    def fn(th):
        yield from h.kvm.mmu_lock.read_lock(th)
        h.host.rcu.read_lock(th)
        locked.complete_all()
        yield 10_000
        it = TdpIter(h.tdp.pt, h.tdp.roots[0], S.PG_LEVEL_4K, h.slot_gfn(1))
        while it.next_last_level_gfn == it.yielded_gfn:
            it.next()
        st["gfn"] = it.next_last_level_gfn
        st["first"] = yield from h.tdp.tdp_mmu_iter_cond_resched(th, it, False, True)
        it.next()                                   # restart at the root, same gfn
        if buggy:
            it.yielded_gfn = -1
        st["second"] = yield from h.tdp.tdp_mmu_iter_cond_resched(th, it, False, True)
        h.host.rcu.read_unlock(th)
        h.kvm.mmu_lock.read_unlock(th)

    driver(h, fn, touched(h, 16))
    h.spawn(contender, "contender")
    h.run()
    assert st["first"] is True and st["second"] is buggy
    if not buggy:
        assert h.findings == []
        return
    (f,) = h.findings
    assert (f.kind, f.task) == ("yield_without_progress", "driver")
    assert f.details == {"gfn": st["gfn"]}


# ---- stale translations -------------------------------------------------------------------------

@pytest.mark.parametrize("buggy", [False, True])
def test_stale_translation_notifier_handler_skips_zap(buggy, monkeypatch):
    """KVM's unmap handler sabotaged to zap nothing (and so ask for no flush): when
    invalidate_range_start returns, the root still maps the range and the TLB holds it."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    g0, st = h.slot_gfn(1), {}
    if buggy:
        def no_zap(th, rng):
            return False
            yield
        monkeypatch.setattr(h.arch, "unmap_gfn_range", no_zap)

    def fn(th):
        st["root"] = h.tdp.roots[0]
        yield from h.mm.madvise_dontneed(th, h.hva, 16)

    driver(h, fn, touched(h, 16))
    h.run()
    if not buggy:
        assert h.findings == []
        return
    pt, tlb = h.findings
    assert (pt.kind, pt.task) == ("stale_translation", None)
    assert pt.details == {"what": "mmu_notifier invalidate_range_start",
                          "root": st["root"].id, "gfns": (g0, g0 + 16), "present_leaves": 16}
    assert (tlb.kind, tlb.task) == ("stale_translation", "vcpu0")
    assert tlb.details == {"what": "mmu_notifier invalidate_range_start: TLB not flushed",
                           "gfns": (g0, g0 + 16), "tlb_entries": 16}


@pytest.mark.parametrize("buggy", [False, True])
def test_stale_translation_guest_access_through_surviving_tlb_entry(buggy, monkeypatch):
    """The vCPU's TLB flush is sabotaged (the request is consumed, nothing is flushed): after
    an invalidation completed, the guest keeps accessing the gfn through the old entry."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    g, st = h.slot_gfn(1) + 3, {}
    v = h.vcpus[0]
    if buggy:
        monkeypatch.setattr(v.tlb, "flush", lambda now=0: None)

    def guest_hit():
        return any("guest access" in f.details["what"] for f in h.findings)

    spin = spinning(h, [g], lambda: guest_hit() or st.get("stop"), n=8)
    h.kvm.observers.append(lambda kind, **f: st.setdefault("start_done", f["t"])
                           if kind == "invalidate_start" else None)

    def fn(th):
        yield from in_guest(th, v, spin)
        yield from h.mm.madvise_dontneed(th, h.hva + 3 * PAGE, 1)
        yield 5000
        st["stop"] = True

    driver(h, fn)
    h.run()
    if not buggy:
        assert h.findings == [] and v.stat["pf_fixed"] == 9   # faulted in again
        return
    assert set(kinds(h)) == {"stale_translation"}
    # when the invalidation returned, the vCPU was back in guest mode with the entry
    assert {f.details["what"] for f in h.findings} == {
        "mmu_notifier invalidate_range_start: TLB not flushed",
        "guest access through a TLB entry"}
    f = h.findings[-1]
    assert f.task == "vcpu0" and f.details["what"] == "guest access through a TLB entry"
    assert f.details["gfn"] == g and f.details["invalidated"] == st["start_done"]
    assert f.details["filled"] < st["start_done"] < h.host.engine.now


# ---- monitors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hold_ns, lockups", [(5 * MS, 0), (25 * MS, 1)])
def test_monitor_soft_lockup(hold_ns, lockups):
    """mmu_lock held for write across a long loop that never reschedules (a "second" is
    1 ms, so the soft-lockup threshold is 20 ms)."""
    h = VmHarness(nvcpus=1, pages=16, nslots=1, second_ns=MS)

    def fn(th):
        yield from h.kvm.mmu_lock.write_lock(th)
        th.doing = "kvm_zap_gfn_range"
        yield hold_ns
        h.kvm.mmu_lock.write_unlock(th)

    driver(h, fn)
    h.run()
    sl = h.monitors.summary()["soft_lockups"]
    assert sl["count"] == lockups
    if lockups:
        assert sl["task"] == "driver" and sl["doing"] == "kvm_zap_gfn_range"
        assert 20 * MS <= sl["longest_ns"] <= hold_ns + MS


@pytest.mark.parametrize("inside_ns, stalls", [(10 * MS, 0), (30 * MS, 1)])
def test_monitor_rcu_stall(inside_ns, stalls):
    """A long RCU read-side section (cooperatively rescheduling, so no soft lockup) holds up
    the grace period of a zapped table (stall timeout: 21 "s" = 21 ms)."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1, second_ns=MS)

    def reader(th):
        h.host.rcu.read_lock(th)
        th.doing = "tdp_mmu_zap_root"
        for _ in range(inside_ns // (100 * 1000)):
            yield 100 * 1000
            yield from h.host.sched.cond_resched(th)
        h.host.rcu.read_unlock(th)

    def zapper(th):
        yield 1000
        yield from h.kvm.mmu_lock.write_lock(th)
        h.host.rcu.read_lock(th)
        yield from h.tdp.kvm_tdp_mmu_zap_sp(th, l1_table(h))
        h.host.rcu.read_unlock(th)
        yield from h.kvm.flush_remote_tlbs(th)
        h.kvm.mmu_lock.write_unlock(th)
        yield from h.host.rcu.rcu_barrier(th)

    populated = touched(h, 16)
    driver(h, reader, populated, name="reader")
    driver(h, zapper, populated, name="zapper")
    h.run()
    rs = h.monitors.summary()["rcu_stalls"]
    assert rs["count"] == stalls
    assert rs["longest_read_side_task"] == "reader"
    assert rs["longest_read_side_ns"] >= inside_ns
    if stalls:
        assert rs["task"] == "reader" and rs["doing"] == "tdp_mmu_zap_root"
        assert 21 * MS <= rs["longest_inside_ns"] < inside_ns
    assert h.findings == []


def lock_hold_scenario(hold_ns):
    """The driver holds mmu_lock for write ``hold_ns``; meanwhile the vCPU faults (it needs
    mmu_lock for read)."""
    h = VmHarness(nvcpus=1, pages=256, nslots=1)
    g0, st = h.slot_gfn(1), {}
    populated, locked = Gate(h), Gate(h)

    def vcpu(th, v):
        yield from v.run(th, TouchGuest(g0, 8))
        populated.complete_all()
        yield from locked.wait(th)
        yield from v.run(th, TouchGuest(g0 + 100, 4))

    def fn(th):
        yield from h.kvm.mmu_lock.write_lock(th)
        st["t0"] = h.host.engine.now
        locked.complete_all()
        yield hold_ns
        h.kvm.mmu_lock.write_unlock(th)

    h.spawn_vcpu(h.vcpus[0], vcpu)
    driver(h, fn, populated)
    h.run()
    assert h.findings == []
    return h, h.monitors.summary()


@pytest.mark.parametrize("hold_ns", [0, 1 * MS])
def test_monitor_vcpu_blocked_on_mmu_lock(hold_ns):
    h, s = lock_hold_scenario(hold_ns)
    vb = s["vcpu_blocked"]
    if not hold_ns:
        assert vb["episodes"] == 0 and vb["max_ns"] == 0
        return
    assert vb["episodes"] == 1 and vb["who"] == "vcpu0" and vb["why"] == "mmu_lock wait (read)"
    # the vCPU needed a context switch and fault phase 1 before it queued
    assert hold_ns - 20_000 <= vb["max_ns"] < hold_ns
    assert vb["total_ns"] == vb["max_ns"] == vb["p99_ns"]


def test_monitor_stats_are_the_ones_kvm_has():
    """Only statistics 5.17/5.18 KVM has, under their names (no ``lpages``: gone in 5.15);
    the model's own counters apart."""
    from tdpsim.kvm.vcpu import MODEL_COUNTERS, VCPU_STATS
    _, s = lock_hold_scenario(0)
    assert "lpages" not in s["stats"] and "ipis" not in s["stats"]
    assert {"pages_4k", "remote_tlb_flush", "nx_lpage_splits"} <= set(s["stats"])
    assert set(s["vcpu_stats"]["total"]) == set(VCPU_STATS)
    assert set(s["model_counters"]["vcpu"]["total"]) == set(MODEL_COUNTERS)
    pv = s["vcpu_stats"]["per_vcpu"]["vcpu0"]
    assert pv["pf_fixed"] == 12 == s["stats"]["pages_4k"]        # 12 pages faulted in
    assert pv["exits"] >= 12 and s["model_counters"]["vcpu"]["total"]["root_loads"] == 1


def test_monitor_percentiles_are_observed_values():
    """p50 / p99 of vCPU blocked episodes are episodes' durations (nearest rank), not a
    value between two of them."""
    from tdpsim.check.monitors import _percentile
    d = np.array([1, 2, 3, 10], dtype=np.int64)
    assert _percentile(d, 50) == 2 and _percentile(d, 99) == 10    # (interpolated: 2.5, 9.8)
    assert _percentile(np.array([7]), 50) == 7 and _percentile(np.array([], int), 99) == 0


def test_monitor_mmu_lock_hold_and_wait_maxima():
    _, s = lock_hold_scenario(1 * MS)
    lk = s["mmu_lock"]
    assert lk["write_max_hold_ns"] == 1 * MS
    assert lk["read_max_wait_ns"] == s["vcpu_blocked"]["max_ns"] > 0
    assert lk["write_max_wait_ns"] == 0
    assert lk["read_acquires"] == 12 and lk["write_acquires"] == 2   # 12 faults, root + driver
    assert lk["read_max_hold_ns"] < 10_000


@pytest.mark.parametrize("in_guest_mode", [False, True])
def test_monitor_remote_flush_and_ipis(in_guest_mode):
    """A remote flush sends an IPI (and counts as a remote_tlb_flush) only if a vCPU is in
    guest mode; the request is counted either way."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    st = {}
    if in_guest_mode:
        spin = spinning(h, [h.slot_gfn(1)], lambda: st.get("stop", False), n=8)
    else:
        spin = touched(h, 8)              # set once the vCPU has left KVM_RUN

    def fn(th):
        yield from spin.wait(th)
        if in_guest_mode:
            yield from in_guest(th, h.vcpus[0])
        st["before"] = h.monitors.summary()
        yield from h.kvm.flush_remote_tlbs(th)
        st["stop"] = True

    driver(h, fn)
    h.run()
    s = h.monitors.summary()
    assert st["before"]["remote_tlb_flush_requests"] == 0 and st["before"]["ipis"] == 0
    assert s["remote_tlb_flush_requests"] == 1
    assert s["remote_tlb_flush"] == s["ipis"] == int(in_guest_mode)
    assert s["model_counters"]["ipis"] == s["ipis"]
    # only a running vCPU acted (tlb_flush: KVM's per-vCPU statistic)
    assert s["vcpu_stats"]["per_vcpu"]["vcpu0"]["tlb_flush"] == int(in_guest_mode)
    assert h.findings == []


def test_a_waiting_request_kicks_a_vcpu_already_exiting():
    """kvm_request_needs_ipi: a request with KVM_REQUEST_WAIT (a TLB flush) IPIs every vCPU
    whose mode is not OUTSIDE_GUEST_MODE, so a second flush that finds the vCPU EXITING
    (kicked by the first, not out yet) sends its own IPI, waits, and counts."""
    h = VmHarness(nvcpus=1, pages=64, nslots=1)
    v = h.vcpus[0]
    st = {"stop": 0, "modes": []}
    spin = spinning(h, [h.slot_gfn(1)], lambda: st["stop"] == 2, n=8)

    def first(th):
        yield from in_guest(th, v, spin)
        st["modes"].append(v.mode)
        yield from h.kvm.flush_remote_tlbs(th)
        st["stop"] += 1

    def second(th):
        yield from spin.wait(th)
        while v.mode != EXITING_GUEST_MODE:      # the first flush has kicked it
            yield 1
        st["modes"].append(v.mode)
        yield from h.kvm.flush_remote_tlbs(th)
        st["stop"] += 1

    driver(h, first, name="first")
    driver(h, second, name="second")
    h.run()
    s = h.monitors.summary()
    assert st["modes"] == [IN_GUEST_MODE, EXITING_GUEST_MODE]
    assert s["remote_tlb_flush_requests"] == 2
    assert s["remote_tlb_flush"] == 2 and s["ipis"] == 2    # the second kicked it too
    assert h.findings == []


def fast_zap_scenario():
    """Populate 512 pages (root + L3 + L2 + L1 tables), then kvm_mmu_zap_all_fast."""
    h = VmHarness(nvcpus=1, pages=512, nslots=1)
    st = {}

    def fn(th):
        st["before"] = h.monitors.summary()
        yield from h.arch.kvm_mmu_zap_all_fast(th)
        yield from h.host.rcu.rcu_barrier(th)

    driver(h, fn, touched(h, 512))
    h.run()
    assert h.findings == []
    return h, st["before"], h.monitors.summary()


def test_monitor_page_tables():
    h, before, after = fast_zap_scenario()
    assert before["page_tables"] == {"allocated": 4, "freed": 0, "peak_pages": 4,
                                     "peak_bytes": 4 * 4096}
    # the worker zapped the invalid root: its 3 tables are freed, the root itself stays
    # (the vCPU still holds it until it next enters the guest)
    assert after["page_tables"] == {"allocated": 4, "freed": 3, "peak_pages": 4,
                                    "peak_bytes": 4 * 4096}


def test_monitor_zap_work():
    h, before, after = fast_zap_scenario()
    assert before["zap_work"] == {"queued": 0, "completed": 0}
    assert after["zap_work"] == {"queued": 1, "completed": 1}
    (z,) = after["root_zaps"]
    assert z["task"].startswith("kworker") and z["shared"] and z["ns"] > 0
