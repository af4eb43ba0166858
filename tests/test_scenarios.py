"""Scenario tests (5.18): whole flows on a small VM, with every oracle watching."""

import pytest

from tdpsim.host.mm import PAGE
from tdpsim.kvm.vcpu import Guest, TouchGuest
from tdpsim.mmu.tdp_iter import count_present
from tdpsim.workloads.vm import VmHarness


@pytest.mark.parametrize("kernel", ["5.17", "5.18"])
@pytest.mark.parametrize("granularity", ["exact", "fast"])
def test_fault_zap_flush_access_is_clean(granularity, kernel):
    """vCPUs fault pages in, the host unmaps some (notifier zap + flush), the guest touches
    them again (refault to the same pages), and everything checks out."""
    h = VmHarness(nvcpus=2, pages=512, nslots=2, granularity=granularity, policy=kernel)
    base = h.slot_gfn(1)

    def script(th, v, start):
        yield from v.run(th, TouchGuest(start, 512))       # ~0.7 ms
        yield from h.host.sched.sleep(th, 400_000)
        yield from v.run(th, TouchGuest(start, 512))

    for i, v in enumerate(h.vcpus):
        h.spawn_vcpu(v, script, base + i * 512)

    def host(th):
        yield from h.host.sched.sleep(th, 850_000)           # between the two runs
        yield from h.mm.madvise_dontneed(th, h.hva, 64)     # hits both aliasing slots
        h.mm.prefault(h.hva, 64)

    h.spawn(host, "host")
    h.run()
    assert h.findings == []
    assert h.kvm.stat["remote_tlb_flush_requests"] >= 1
    assert h.kvm.stat["pages_4k"] == 1024
    assert sum(v.stat["pf_fixed"] for v in h.vcpus) > 1024      # the unmapped ones refaulted


@pytest.mark.parametrize("kernel", ["5.17", "5.18"])
def test_memslot_delete_while_vcpus_fault_waits_for_every_invalid_root(kernel):
    """kvm_mmu_zap_all_fast returns only after every invalid root is empty, even while
    vCPUs keep faulting into the new root."""
    h = VmHarness(nvcpus=2, pages=512, nslots=3, costs={"wq_wakeup": 200_000},
                  policy=kernel)
    base = h.slot_gfn(1)
    seen = {}

    def on(kind, **f):
        if kind == "zap_all_fast_done":
            seen["t"] = f["t"]
            seen["left"] = sum(count_present(h.tdp.pt, r) for r in h.tdp.roots if r.invalid)
            seen["invalid"] = sum(r.invalid for r in h.tdp.roots)

    h.kvm.observers.append(on)

    def script(th, v, start):
        for _ in range(3):
            yield from v.run(th, TouchGuest(start, 512))
            yield from v.set_sregs_toggle_cr0_wp(th)

    for i, v in enumerate(h.vcpus):
        h.spawn_vcpu(v, script, base + i * 512)

    def vmm(th):
        yield from h.host.sched.sleep(th, 800_000)
        yield from h.kvm.set_user_memory_region(th, 3, 0, h.slot_gfn(3) * PAGE, 0, h.hva)

    h.spawn(vmm, "vmm")
    h.run()
    assert "t" in seen and seen["left"] == 0
    assert h.findings == []
    if kernel == "5.18":
        assert h.tdp.zap_wq.queued >= 3        # defunct roots and the invalidated ones


@pytest.mark.parametrize("kernel", ["5.17", "5.18"])
def test_notifier_invalidation_racing_a_fault_makes_it_retry(kernel):
    """A fault that resolved its pfn before an invalidation and takes mmu_lock after it
    started must not install the stale pfn: it retries and maps the new page."""
    h = VmHarness(nvcpus=1, pages=512, nslots=1, costs={"fault_4k": 40_000}, policy=kernel)
    gfn = h.slot_gfn(1) + 3
    out = {}

    def script(th, v):
        yield from v.run(th, Guest([(gfn, True)]))
        out["pfn"] = v.tlb.entries[gfn].pfn

    h.spawn_vcpu(h.vcpus[0], script)

    def host(th):
        yield from h.host.sched.sleep(th, 5_000)     # inside the fault's phase 1
        yield from h.mm.madvise_dontneed(th, h.hva + 3 * PAGE, 1)
        h.mm.prefault(h.hva + 3 * PAGE, 1)

    h.spawn(host, "host")
    h.run()
    v = h.vcpus[0]
    assert v.stat["pf_retry"] >= 1
    assert out["pfn"] == h.mm.lookup(h.hva + 3 * PAGE)[0]
    assert h.findings == []


@pytest.mark.parametrize("kernel", ["5.17", "5.18"])
def test_vcpu_dropping_the_last_root_reference(kernel):
    """5.18: the vCPU whose CR0.WP toggle drops the last reference to a populated root
    returns at once and a kworker zaps the root.  5.17: the vCPU tears it down itself,
    blocked for the whole teardown.  Both clean."""
    h = VmHarness(nvcpus=1, pages=4096, nslots=2, policy=kernel)
    v = h.vcpus[0]
    t = {}

    def script(th, vv):
        yield from vv.run(th, TouchGuest(h.slot_gfn(1), 8192))
        t0 = h.host.engine.now
        yield from vv.set_sregs_toggle_cr0_wp(th)
        t["reset"] = h.host.engine.now - t0
        yield from h.tdp.zap_wq.flush(th)           # let the run last until the zap is done

    h.spawn_vcpu(v, script)
    h.run()
    zap = h.tdp.root_zaps[0]
    blocked = h.monitors.summary()["vcpu_blocked"]
    if kernel == "5.18":
        assert zap["task"].startswith("kworker")
        assert zap["ns"] > 100 * t["reset"]         # the teardown is long, the reset short
        assert blocked["max_ns"] < zap["ns"]
    else:
        assert zap["task"] == "vcpu0"
        assert t["reset"] >= zap["ns"]              # blocked for the whole teardown
        assert blocked["max_ns"] >= zap["ns"] and blocked["why"] == "root put"
    assert h.findings == []


@pytest.mark.parametrize("kernel", ["5.17", "5.18"])
def test_nx_recovery_zaps_split_pages_and_huge_pages_come_back(kernel):
    """Exec faults on 2 MiB-backed memory are mapped 4K (NX huge pages) and their tables go
    on the NX list; the recovery worker zaps ceil(splits / ratio) per period; data accesses
    then map 2 MiB again."""
    h = VmHarness(nvcpus=1, pages=1024, nslots=1, hugetlb=True, nx_huge_pages=True,
                  nx_recovery_period_ms=5, policy=kernel)
    base = h.slot_gfn(1)
    snap = []

    def script(th, v):
        yield from v.run(th, TouchGuest(base, 1024))
        snap.append(dict(h.kvm.stat))
        yield from v.run(th, Guest([(base + 5, False, True), (base + 600, False, True)]))
        snap.append(dict(h.kvm.stat))
        yield from h.host.sched.sleep(th, 12_000_000)
        snap.append(dict(h.kvm.stat))
        yield from v.run(th, Guest([(base + 7, True), (base + 601, True)]))
        snap.append(dict(h.kvm.stat))

    h.spawn_vcpu(h.vcpus[0], script)
    h.run()
    data, exe, recovered, refault = snap
    assert data["pages_2m"] == 2 and data["nx_lpage_splits"] == 0
    assert exe["pages_2m"] == 0 and exe["pages_4k"] == 2 and exe["nx_lpage_splits"] == 2
    assert recovered["nx_lpage_splits"] == 0 and recovered["pages_4k"] == 0
    assert refault["pages_2m"] == 2
    assert not h.tdp.lpage_disallowed
    assert h.findings == []
