"""Conformance suite: one test per policy knob, asserting the observable difference between
the knob on (5.18) and off (5.17), everything else at 5.18."""

import pytest

from tdpsim.host.mm import PAGE
from tdpsim.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
from tdpsim.kvm.vcpu import Guest, TouchGuest
from tdpsim.kvm.vm import GfnRange
from tdpsim.mmu import spte as S
from tdpsim.mmu.policy import Policy, preset
from tdpsim.mmu.tdp_iter import TdpIter
from tdpsim.workloads.vm import VmHarness
from vmhelpers import linked_tables


def pol(knob: str, on: bool) -> Policy:
    return preset("5.18").with_knobs(**{knob: on})


def populated(knob, on, nvcpus=1, pages=512, nslots=1, **kw):
    """A VM whose vCPUs populated their share of the slots and are parked."""
    h = VmHarness(nvcpus=nvcpus, pages=pages, nslots=nslots, policy=pol(knob, on), **kw)
    per = pages * nslots // nvcpus

    def script(th, v, start):
        yield from v.run(th, TouchGuest(start, per))

    for i, v in enumerate(h.vcpus):
        h.spawn_vcpu(v, script, h.slot_gfn(1) + i * per)
    h.run()
    return h


def in_thread(h, fn):
    out = {}

    def body(th):
        out["ret"] = yield from fn(th)

    h.spawn(body, "kthread")
    h.run()
    return out.get("ret")


def test_knob_deferred_flush():
    """handle_removed_pt flushes per removed table only in 5.17."""
    res = {}
    for on in (True, False):
        h = populated("deferred_flush", on)
        sp = next(sp for sp in linked_tables(h) if sp.level == 1)
        before = h.kvm.stat["remote_tlb_flush_requests"]

        def zap(th):
            yield from h.kvm.mmu_lock.write_lock(th)
            h.host.rcu.read_lock(th)
            yield from h.tdp.kvm_tdp_mmu_zap_sp(th, sp)
            h.host.rcu.read_unlock(th)
            h.kvm.mmu_lock.write_unlock(th)
        in_thread(h, zap)
        res[on] = h.kvm.stat["remote_tlb_flush_requests"] - before
    assert res == {True: 0, False: 1}


def test_knob_flush_before_rcu_unlock():
    """A yield with a flush pending flushes inside RCU (5.18) or after leaving it (5.17)."""
    res = {}
    for on in (True, False):
        h = populated("flush_before_rcu_unlock", on, pages=1024)
        nest = []
        h.kvm.observers.append(lambda k, **f: nest.append(zapper.rcu_nesting)
                               if k == "remote_flush" and f.get("task") == "zapper" else None)

        def zap(th):
            yield from h.kvm.mmu_lock.write_lock(th)
            yield from h.tdp.kvm_tdp_mmu_zap_leafs(th, 0, h.slot_gfn(1), h.gfn_end, True, False)
            h.kvm.mmu_lock.write_unlock(th)

        def contender(th):
            yield 3_000                         # queue on mmu_lock while the zap runs
            yield from h.kvm.mmu_lock.write_lock(th)
            h.kvm.mmu_lock.write_unlock(th)

        zapper = h.spawn(zap, "zapper")
        h.spawn(contender, "contender")
        h.run()
        res[on] = nest[0]
    assert res == {True: 1, False: 0}


def _defunct_zapper(knob, on, **kw):
    h = populated(knob, on, **kw)
    v = h.vcpus[0]

    def reset(th, vv):
        yield from vv.set_sregs_toggle_cr0_wp(th)
        yield from h.tdp.zap_wq.flush(th)

    h.spawn_vcpu(v, reset)
    h.run()
    return h


def test_knob_async_defunct_zap():
    """Who tears down a root whose last reference a vCPU drops: a kworker or the vCPU."""
    on = _defunct_zapper("async_defunct_zap", True)
    off = _defunct_zapper("async_defunct_zap", False)
    assert on.tdp.root_zaps[0]["task"].startswith("kworker")
    assert off.tdp.root_zaps[0]["task"] == "vcpu0" and not off.tdp.root_zaps[0]["shared"]
    assert on.findings == off.findings == []


def test_knob_two_pass_root_zap():
    """Under contention the worker can yield between 1 GiB entries only with two passes, so
    its longest RCU read-side section is one 1 GiB subtree instead of the whole root."""
    res = {}
    for on in (True, False):
        h = populated("two_pass_root_zap", on, nvcpus=2, pages=262144, nslots=2,
                      granularity="fast")
        v = h.vcpus[0]

        def reset(th, vv):
            yield from vv.set_sregs_toggle_cr0_wp(th)
            h.vcpus[1].cr0_wp = vv.cr0_wp

        def contender(th):
            for _ in range(200):
                yield from h.host.sched.sleep(th, 100_000)
                yield from h.kvm.mmu_lock.write_lock(th)
                h.kvm.mmu_lock.write_unlock(th)

        def drop_second(th, vv):
            yield from vv.set_sregs_toggle_cr0_wp(th)

        h.spawn_vcpu(v, reset)
        h.spawn_vcpu(h.vcpus[1], drop_second)
        h.spawn(contender, "contender")
        h.run()
        res[on] = h.host.rcu.longest_section
    assert res[True] * 1.5 < res[False]


def test_knob_async_invalidated_zap():
    """After a memslot deletion, invalidated roots are zapped by kworkers under the read
    lock (5.18) or by the deleting thread itself, read-locked, with gifted references."""
    res = {}
    for on in (True, False):
        h = populated("async_invalidated_zap", on, pages=512, nslots=2)

        def delete(th):
            yield from h.kvm.set_user_memory_region(th, 2, 0, h.slot_gfn(2) * PAGE, 0, h.hva)
        in_thread(h, delete)
        res[on] = [z["task"] for z in h.tdp.root_zaps]
        assert h.findings == []
    assert res[True] and all(t.startswith("kworker") for t in res[True])
    assert res[False] == ["kthread"]


def test_knob_readers_skip_invalid_roots():
    """5.18 WARNs when an mmu_lock reader walks roots without skipping invalid ones."""
    res = {}
    for on in (True, False):
        h = populated("readers_skip_invalid_roots", on)

        def walk(th):
            yield from h.kvm.mmu_lock.read_lock(th)

            def body(root):
                return
                yield
            yield from h.tdp.walk_roots(th, 0, True, False, body)
            h.kvm.mmu_lock.read_unlock(th)
        in_thread(h, walk)
        res[on] = [f.details.get("warn") for f in h.findings]
    assert "reader_walks_invalid_roots" in res[True] and res[False] == []


def _split_invalid(on):
    h = VmHarness(nvcpus=1, pages=1024, nslots=1, hugetlb=True,
                  policy=pol("eager_split_valid_only", on), costs={"wq_wakeup": 50_000_000})

    def script(th, v):
        yield from v.run(th, TouchGuest(h.slot_gfn(1), 1024))
        yield from h.kvm.mmu_lock.write_lock(th)
        h.tdp.kvm_tdp_mmu_invalidate_all_roots(th)   # the worker starts 50 ms later
        h.kvm.mmu_lock.write_unlock(th)
        yield from h.kvm.set_user_memory_region(th, 1, KVM_MEM_LOG_DIRTY_PAGES,
                                                h.slot_gfn(1) * PAGE, 1024 * PAGE, h.hva)

    h.spawn_vcpu(h.vcpus[0], script)
    h.run()
    return h


def test_knob_eager_split_valid_only():
    """Enabling dirty logging splits huge pages in valid roots only (5.18), or also in an
    invalid root still waiting for its zap (5.17)."""
    on, off = _split_invalid(True), _split_invalid(False)
    assert on.kvm.stat["pages_4k"] == 0
    assert off.kvm.stat["pages_4k"] == 1024


def test_knob_leaf_only_range_zap():
    """kvm_zap_gfn_range over a whole 2 MiB region leaves the 4K table linked (5.18) or
    zaps the table too (5.17)."""
    res = {}
    for on in (True, False):
        h = populated("leaf_only_range_zap", on, pages=512)
        tables = h.tdp.nr_pages
        in_thread(h, lambda th: h.arch.kvm_zap_gfn_range(th, h.slot_gfn(1), h.slot_gfn(1) + 512))
        res[on] = (tables - h.tdp.nr_pages, h.kvm.stat["pages_4k"])
    assert res[True] == (0, 0) and res[False][0] >= 1 and res[False][1] == 0


def _nx_two_roots(on):
    h = VmHarness(nvcpus=2, pages=1024, nslots=1, hugetlb=True, nx_huge_pages=True,
                  nx_recovery_period_ms=5, policy=pol("precise_nx_zap", on))
    base = h.slot_gfn(1)
    h.vcpus[1].cr0_wp = False                     # a second root (a different role)
    left = {}

    def script(th, v):
        yield from v.run(th, Guest([(base + 5, False, True)]))
        yield from h.host.sched.sleep(th, 7_000_000)   # one recovery pass (to_zap = 1)
        left[v.name] = len(h.tdp.lpage_disallowed)

    for v in h.vcpus:
        h.spawn_vcpu(v, script)
    h.run()
    return h, left


def test_knob_precise_nx_zap():
    """NX recovery zaps exactly one SP (5.18) or the SP's range in every root (5.17)."""
    on, left_on = _nx_two_roots(True)
    off, left_off = _nx_two_roots(False)
    assert min(left_on.values()) == 1 and min(left_off.values()) == 0
    assert on.findings == off.findings == []


def test_knob_zap_all_no_flush():
    """Zapping everything at process exit flushes only in 5.17."""
    res = {}
    for on in (True, False):
        h = populated("zap_all_no_flush", on)
        before = h.kvm.stat["remote_tlb_flush_requests"]
        in_thread(h, lambda th: h.mm.exit(th))
        res[on] = h.kvm.stat["remote_tlb_flush_requests"] - before
        assert h.kvm.stat["pages_4k"] == 0
    assert res == {True: 0, False: 1}


def test_knob_batched_change_pte_flush():
    """change_pte: 5.18 returns "flush needed" to the caller; 5.17 flushes itself and
    returns False."""
    res = {}
    for on in (True, False):
        h = populated("batched_change_pte_flush", on)
        slot = h.kvm.memslots[0].by_id[1]
        before = h.kvm.stat["remote_tlb_flush_requests"]

        def change(th):
            yield from h.kvm.mmu_lock.write_lock(th)
            ret = yield from h.arch.set_spte_gfn(th, GfnRange(slot, h.slot_gfn(1) + 3,
                                                              h.slot_gfn(1) + 4, False,
                                                              (h.memfd.pfn_of(3), 1, False)))
            h.kvm.mmu_lock.write_unlock(th)
            return ret
        ret = in_thread(h, change)
        res[on] = (ret, h.kvm.stat["remote_tlb_flush_requests"] - before)
    assert res == {True: (True, 0), False: (False, 1)}


def test_knob_rcu_per_root_notifier():
    """Aging takes RCU per root (5.18) or across all roots (5.17)."""
    res = {}
    for on in (True, False):
        h = VmHarness(nvcpus=2, pages=512, nslots=1, policy=pol("rcu_per_root_notifier", on))
        h.vcpus[1].cr0_wp = False                 # two roots mapping the same pages

        def script(th, v):
            yield from v.run(th, TouchGuest(h.slot_gfn(1), 512))

        for v in h.vcpus:
            h.spawn_vcpu(v, script)
        h.run()
        h.host.rcu.longest_section = 0
        in_thread(h, lambda th: h.mm.age(th, h.hva, 64, flush=False))
        res[on] = h.host.rcu.longest_section
    assert res[False] >= 2 * res[True] > 0


def test_knob_removed_spte_checks():
    """An atomic update of a REMOVED SPTE WARNs in 5.18 and fails silently in 5.17."""
    res = {}
    for on in (True, False):
        h = populated("removed_spte_checks", on)
        sp = next(sp for sp in linked_tables(h) if sp.level == 1)
        h.tdp.pt.write(sp, 7, S.REMOVED_SPTE)

        def racer(th):
            yield from h.kvm.mmu_lock.read_lock(th)
            it = TdpIter(h.tdp.pt, sp.root, 1, sp.gfn + 7)
            while it.level != 1:
                it.next()
            ok = yield from h.tdp.tdp_mmu_set_spte_atomic(th, it, 0)
            h.kvm.mmu_lock.read_unlock(th)
            return ok
        ok = in_thread(h, racer)
        res[on] = (ok, [f.details.get("warn") for f in h.findings])
    assert res[True] == (False, ["set_spte_atomic_on_removed_or_yielded"])
    assert res[False] == (False, [])


def test_knob_skip_invalid_on_invalidate():
    """A second fast zap while the first's work items are still pending: 5.18 skips the
    already-invalid roots; without the fix-up it re-queues a pending item (a no-op that
    leaks the reference) and the model WARNs."""
    res = {}
    for on in (True, False):
        h = populated("skip_invalid_on_invalidate", on, costs={"wq_wakeup": 10_000_000})

        def twice(th):
            for _ in range(2):
                yield from h.kvm.mmu_lock.write_lock(th)
                h.tdp.kvm_tdp_mmu_invalidate_all_roots(th)
                h.kvm.mmu_lock.write_unlock(th)
        in_thread(h, twice)
        res[on] = (h.tdp.zap_wq.queued, [f.details.get("warn") for f in h.findings])
    assert res[True] == (1, [])
    assert res[False] == (1, ["queue_work_pending"])


def test_every_knob_has_a_conformance_test():
    names = {n[len("test_knob_"):] for n in globals() if n.startswith("test_knob_")}
    assert names == set(Policy.knobs())


@pytest.mark.parametrize("kernel", ["5.17", "5.18"])
def test_presets_run_clean(kernel):
    h = VmHarness(nvcpus=2, pages=512, nslots=3, policy=kernel)

    def s(th, v, start):
        yield from v.run(th, TouchGuest(start, 768))
        yield from v.set_sregs_toggle_cr0_wp(th)
        yield from v.run(th, TouchGuest(start, 768))

    for i, v in enumerate(h.vcpus):
        h.spawn_vcpu(v, s, h.slot_gfn(1) + i * 768)

    def vmm(th):
        yield from h.host.sched.sleep(th, 5_000_000)
        yield from h.kvm.set_user_memory_region(th, 3, 0, h.slot_gfn(3) * PAGE, 0, h.hva)
        yield from h.mm.munmap(th, h.hva, 256)
        yield from h.mm.exit(th)
        yield from h.arch.destroy(th)

    h.spawn(vmm, "vmm")
    h.run()
    assert h.findings == [] and h.tdp.pt.live == 0
