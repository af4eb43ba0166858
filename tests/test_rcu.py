"""RCU: grace periods wait for pre-existing readers; call_rcu, synchronize_rcu, rcu_barrier.

The property test is the guarantee of the kernel memory model's RCU litmus tests: if a
reader's critical section began before a grace period (here: before call_rcu), the
callback runs after that section ended."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tdpsim.costs import CostModel
from tdpsim.host.host import Host, HostConfig


def test_gp_waits_for_reader_that_started_before(mkhost):
    h = mkhost(ncpus=2, costs={"context_switch": 1, "rcu_gp_min": 100})
    log = []

    def reader(th):
        h.rcu.read_lock(th)
        yield 5_000
        log.append(("unlock", h.engine.now))
        h.rcu.read_unlock(th)

    def updater(th):
        yield 1_000
        h.rcu.call_rcu(lambda: log.append(("cb", h.engine.now)))

    h.spawn(reader, "r")
    h.spawn(updater, "u")
    h.run()
    assert [e for e, _ in log] == ["unlock", "cb"]
    assert log[1][1] == log[0][1]           # right when the holdout leaves


def test_reader_starting_after_gp_start_does_not_hold_it(mkhost):
    h = mkhost(ncpus=2, costs={"context_switch": 1, "rcu_gp_min": 100})
    log = []

    def updater(th):
        h.rcu.call_rcu(lambda: log.append(("cb", h.engine.now)))
        yield 1

    def late_reader(th):
        yield 50
        h.rcu.read_lock(th)
        yield 10_000
        h.rcu.read_unlock(th)

    h.spawn(updater, "u")
    h.spawn(late_reader, "r")
    h.run()
    assert log == [("cb", 101)]      # gp_min after start (t=1); the late reader is ignored


def test_synchronize_rcu_and_barrier(mkhost):
    h = mkhost(ncpus=3, costs={"context_switch": 1, "rcu_gp_min": 100})
    log = []

    def reader(th):
        h.rcu.read_lock(th)
        yield 3_000
        h.rcu.read_unlock(th)

    def syncer(th):
        yield 10
        yield from h.rcu.synchronize_rcu(th)
        log.append(("sync", h.engine.now))

    def barrier(th):
        yield 20
        h.rcu.call_rcu(lambda: log.append(("cb", h.engine.now)))
        yield from h.rcu.rcu_barrier(th)
        log.append(("barrier", h.engine.now))

    h.spawn(reader, "r")
    h.spawn(syncer, "s")
    h.spawn(barrier, "b")
    h.run()
    d = dict(log)
    assert d["sync"] >= 3_000 and d["cb"] >= 3_000
    assert d["barrier"] >= d["cb"]


readers_st = st.lists(st.tuples(st.integers(0, 2_000), st.integers(1, 3_000)),
                      min_size=1, max_size=8)
calls_st = st.lists(st.integers(0, 4_000), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(readers=readers_st, calls=calls_st, gp_min=st.integers(1, 500))
def test_callback_never_runs_before_preexisting_readers_end(readers, calls, gp_min):
    h = Host(HostConfig(ncpus=len(readers) + 1),
             CostModel({"context_switch": 1, "rcu_gp_min": gp_min}))
    sections = {}     # name -> (start, end)
    cbs = []          # (queued_at, ran_at)

    def reader(th, start, length):
        yield start
        h.rcu.read_lock(th)
        s = h.engine.now
        yield length
        sections[th.name] = (s, h.engine.now)
        h.rcu.read_unlock(th)

    def caller(th, times):
        last = 0
        for t in sorted(times):
            yield t - last + 1
            last = t + 1
            q = h.engine.now
            h.rcu.call_rcu(lambda q=q: cbs.append((q, h.engine.now)))
        yield from h.rcu.rcu_barrier(th)    # like VM teardown: wait for every callback

    for i, (s, n) in enumerate(readers):
        h.spawn(reader, f"r{i}", s, n)
    h.spawn(caller, "c", calls)
    h.run()
    assert len(cbs) == len(calls)
    for queued, ran in cbs:
        assert ran >= queued + gp_min
        for s, e in sections.values():
            if s <= queued < e:       # reader inside when call_rcu was made
                assert ran >= e
