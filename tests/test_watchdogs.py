"""Watchdogs fire at exactly their thresholds on constructed scenarios, and not before."""

import pytest

S = 1_000_000_000


def _spinner(h, ns, rcu=False, cpu=0):
    def fn(th):
        if rcu:
            h.rcu.read_lock(th)
        th.doing = "zap_gfn_range"
        yield ns
        if rcu:
            h.rcu.read_unlock(th)
    return h.spawn(fn, "spinner", cpu=cpu)


# the spinner starts at t=1 (1-ns context switch) on a CPU touched at 0: with 20 s - 2 it
# leaves at 20 s - 1, one ns before the threshold
@pytest.mark.parametrize("spin, fires", [(20 * S - 2, False), (20 * S + 1, True)])
def test_soft_lockup_at_exactly_twice_watchdog_thresh(mkhost, spin, fires):
    h = mkhost(ncpus=2, costs={"context_switch": 1})
    _spinner(h, spin)
    h.run()
    h.finish()
    reps = h.reports_of("soft_lockup")
    if not fires:
        assert reps == []
        return
    assert len(reps) == 1
    r = reps[0]
    assert r["t"] == 20 * S and r["cpu"] == 0 and r["task"] == "spinner"
    assert r["doing"] == "zap_gfn_range" and r["stuck_ns"] == 20 * S
    end = h.reports_of("soft_lockup_end")
    assert end and end[0]["stuck_ns"] == spin + 1  # spin started after the 1-ns switch


def test_no_soft_lockup_when_loop_honours_need_resched(mkhost):
    h = mkhost(ncpus=1)

    def looper(th):
        for _ in range(600):                      # 60 s in 100 ms steps
            yield 100_000_000
            yield from h.sched.cond_resched(th)

    h.spawn(looper, "l")
    h.run()
    assert h.reports_of("soft_lockup") == []


def test_soft_lockup_threshold_follows_watchdog_thresh(mkhost):
    h = mkhost(ncpus=1, watchdog_thresh_s=5)
    _spinner(h, 30 * S)
    h.run()
    assert h.reports_of("soft_lockup")[0]["t"] == 10 * S


@pytest.mark.parametrize("inside, fires", [(21 * S - 1, False), (25 * S, True)])
def test_rcu_stall_at_exactly_timeout_after_gp_start(mkhost, inside, fires):
    h = mkhost(ncpus=2, costs={"context_switch": 1})
    _spinner(h, inside, rcu=True)

    def updater(th):
        yield 1_000_000_000                      # the GP starts at 1 s
        h.rcu.call_rcu(lambda: None)

    h.spawn(updater, "u", cpu=1)
    h.run()
    reps = h.reports_of("rcu_stall")
    if not fires:
        assert reps == []
        return
    assert len(reps) == 1
    r = reps[0]
    assert r["t"] == 1_000_000_001 + 21 * S      # GP start + CONFIG_RCU_CPU_STALL_TIMEOUT
    assert r["task"] == "spinner" and r["cpu"] == 0 and r["doing"] == "zap_gfn_range"
    assert r["gp_age_ns"] == 21 * S


def test_wq_stall_when_no_item_starts_for_30s(mkhost):
    from tdpsim.host.workqueue import WorkItem
    h = mkhost(ncpus=1, costs={"context_switch": 1, "wq_wakeup": 1})
    wq = h.workqueue("kvm")

    def fn(th, item):
        yield 1

    def hog(th):
        wq.queue_work(WorkItem(fn, "zap_root"))   # the worker needs this CPU: hogged 40 s
        yield 40 * S
        yield from wq.flush(th)                   # now it can run

    h.spawn(hog, "hog", cpu=0)
    h.run()
    reps = h.reports_of("wq_stall")
    assert len(reps) == 1 and reps[0]["t"] == 1 + 30 * S and reps[0]["first"] == "zap_root"
    assert wq.completed == 1


def test_wq_no_stall_for_a_long_running_item(mkhost):
    from tdpsim.host.workqueue import WorkItem
    h = mkhost(ncpus=2)
    wq = h.workqueue("kvm")

    def fn(th, item):
        yield 100 * S          # one long item: it started, so the pool made progress

    def vmm(th):
        wq.queue_work(WorkItem(fn, "long"))
        yield from wq.flush(th)

    h.spawn(vmm, "vmm")
    h.run()
    assert h.reports_of("wq_stall") == []
