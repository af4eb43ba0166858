"""Watchdogs report when and as the kernel prints them, on constructed scenarios."""

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


# kernel/watchdog.c: the timestamps are running_clock() >> 30 ("seconds" of 2^30 ns), the
# check runs on the 4 s sample grid and reports when now > report_ts + 2 * watchdog_thresh.
# Touched at 0, the first sample past 20 units (21 * 2^30 ns = 22.55 s) is at 24 s.
U = 1 << 30


# the spinner starts at t=1 (1-ns context switch) on a CPU touched at 0
@pytest.mark.parametrize("spin, fires", [(24 * S - 2, False), (24 * S, True)])
def test_soft_lockup_on_the_first_sample_past_twice_watchdog_thresh(mkhost, spin, fires):
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
    assert r["t"] == 24 * S and r["cpu"] == 0 and r["task"] == "spinner"
    assert r["doing"] == "zap_gfn_range" and r["stuck_ns"] == 24 * S
    assert r["stuck_s"] == 24 * S // U == 22        # what "stuck for 22s!" prints
    end = h.reports_of("soft_lockup_end")
    assert end and end[0]["stuck_ns"] == spin + 1  # spin started after the 1-ns switch


def test_soft_lockup_rereported_with_the_cumulative_time(mkhost):
    h = mkhost(ncpus=2, costs={"context_switch": 1})
    _spinner(h, 80 * S)
    h.run()
    h.finish()
    reps = h.reports_of("soft_lockup")
    # each report restarts the period: the next is on the first sample with a timestamp
    # more than 20 units past the last report's (22 -> 48 s, 44 -> 72 s)
    assert [r["t"] for r in reps] == [24 * S, 48 * S, 72 * S]
    assert [r["stuck_s"] for r in reps] == [22, 44, 67]
    assert len(h.sched.lockup_episodes) == 1
    assert h.sched.lockup_episodes[0]["stuck_ns"] == 80 * S + 1


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
    # 10 units: the first 2 s sample past 11 * 2^30 ns (11.8 s)
    assert h.reports_of("soft_lockup")[0]["t"] == 12 * S


def _stalled_gp(mkhost, inside, **cfg):
    h = mkhost(ncpus=2, costs={"context_switch": 1}, **cfg)
    _spinner(h, inside, rcu=True)

    def updater(th):
        yield 1_000_000_000                      # the GP starts at 1 s (+ the 1-ns switch)
        h.rcu.call_rcu(lambda: None)

    h.spawn(updater, "u", cpu=1)
    h.run()
    return h, h.reports_of("rcu_stall")


@pytest.mark.parametrize("inside, fires", [(21 * S - 1, False), (25 * S, True)])
def test_rcu_stall_on_the_tick_timeout_after_gp_start(mkhost, inside, fires):
    h, reps = _stalled_gp(mkhost, inside)
    if not fires:
        assert reps == []
        return
    assert len(reps) == 1
    r = reps[0]
    # jiffies_stall = the GP's start jiffy (1000 at HZ=1000) + 21 s of jiffies
    assert r["t"] == 22 * S
    assert r["task"] == "spinner" and r["cpu"] == 0 and r["doing"] == "zap_gfn_range"
    assert r["gp_age_ns"] == 21 * S - 1 and r["inside_ns"] == 22 * S - 1


@pytest.mark.parametrize("hz, again", [(1000, 85_003_000_000), (250, 85_012_000_000)])
def test_rcu_stall_rereported_3_timeouts_and_3_jiffies_later(mkhost, hz, again):
    h, reps = _stalled_gp(mkhost, 150 * S, hz=hz)
    assert [r["t"] for r in reps] == [22 * S, again, again + again - 22 * S]
    assert [r["inside_ns"] for r in reps] == [r["t"] - 1 for r in reps]
    assert len(h.rcu.stall_episodes) == 1         # one GP, reported three times
    assert h.rcu.stall_episodes[0]["ns"] == 150 * S - S


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


@pytest.mark.parametrize("preempt", ["none", "voluntary", "dynamic", "full"])
def test_rcu_stall_holdouts_include_cpus_spinning_on_a_lock_without_preempt_rcu(mkhost,
                                                                               preempt):
    """Without CONFIG_PREEMPT_RCU (none, voluntary) RCU is RCU-sched: holding or spinning
    on a lock (preemption off) holds up grace periods.  A writer holds mmu_lock 30 s, a
    reader spins for it: both are stall holdouts; with preemptible RCU neither is."""
    h = mkhost(ncpus=3, preempt=preempt)
    lock = h.rwlock("vm:mmu_lock")

    def holder(th):
        yield from lock.write_lock(th)
        yield 30 * S
        lock.write_unlock(th)

    def spinner(th):
        yield 500_000_000
        yield from lock.read_lock(th)
        lock.read_unlock(th)

    def updater(th):
        yield 1_000_000_000
        h.rcu.call_rcu(lambda: None)

    h.spawn(holder, "holder", cpu=0)
    h.spawn(spinner, "spinner", cpu=1)
    h.spawn(updater, "u", cpu=2)
    h.run()
    reps = h.reports_of("rcu_stall")
    if preempt in ("dynamic", "full"):
        assert reps == [] and h.rcu.longest_section == 0
        return
    assert sorted(r["task"] for r in reps) == ["holder", "spinner"]
    spin = next(r for r in reps if r["task"] == "spinner")
    assert spin["doing"] == "spinning on vm:mmu_lock (read)"
    assert h.rcu.longest_section >= 30 * S
