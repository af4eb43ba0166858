"""Spinlock and queued rwlock against the kernel contract."""

import pytest

from tdpsim.host.locks import READ, WRITE


def _events(host):
    return host._log


@pytest.fixture
def setup(mkhost):
    def make(ncpus=4, **kw):
        h = mkhost(ncpus=ncpus, **kw)
        h._log = []
        return h, h.rwlock("mmu_lock")
    return make


def holder(h, lock, mode, start, hold, name):
    def fn(th):
        if start:
            yield start
        yield from lock.lock(th, mode)
        h._log.append((h.engine.now, name, "in", mode))
        yield hold
        h._log.append((h.engine.now, name, "out", mode))
        lock.unlock(th, mode)
    h.spawn(fn, name)


def test_readers_share_writer_excludes(setup):
    h, lock = setup()
    holder(h, lock, READ, 0, 100, "r1")
    holder(h, lock, READ, 10, 100, "r2")
    holder(h, lock, WRITE, 20, 50, "w")
    holder(h, lock, READ, 30, 10, "r3")
    h.run()
    log = h._log
    t = {(n, e): when for when, n, e, _ in log}
    assert t[("r2", "in")] < t[("r1", "out")]                    # readers overlap
    assert t[("w", "in")] >= max(t[("r1", "out")], t[("r2", "out")])  # writer waits for readers
    # r3 arrived while the writer waited: it queues behind it (no reader starvation of writers)
    assert t[("r3", "in")] >= t[("w", "out")]
    # nobody is inside while the writer is
    for when, n, e, _ in log:
        if e == "in" and n != "w":
            assert not (t[("w", "in")] <= when < t[("w", "out")])


def test_needbreak_true_while_writer_waits(setup):
    h, lock = setup()
    seen = []

    def reader(th):
        yield from lock.read_lock(th)
        for _ in range(10):
            seen.append((h.engine.now, lock.needbreak(), lock.is_contended()))
            yield 10
        lock.read_unlock(th)

    h.spawn(reader, "r")
    holder(h, lock, WRITE, 45, 5, "w")
    h.run()
    before = [nb for t, nb, _ in seen if t < 46]
    after = [nb for t, nb, _ in seen if t >= 46]
    assert before and not any(before)
    assert after and all(after)


def test_needbreak_false_without_config_preemption(setup):
    h, lock = setup(preempt="voluntary")
    seen = []

    def reader(th):
        yield from lock.read_lock(th)
        yield 100
        seen.append((lock.needbreak(), lock.is_contended()))
        lock.read_unlock(th)

    h.spawn(reader, "r")
    holder(h, lock, WRITE, 10, 5, "w")
    h.run()
    assert seen == [(False, True)]


def test_fifo_grant_and_consecutive_readers_enter_together(setup):
    h, lock = setup(ncpus=6)
    holder(h, lock, WRITE, 0, 100, "w1")
    holder(h, lock, READ, 10, 50, "r1")
    holder(h, lock, READ, 20, 50, "r2")
    holder(h, lock, WRITE, 30, 10, "w2")
    holder(h, lock, READ, 40, 10, "r3")
    h.run()
    ins = [(when, n) for when, n, e, _ in h._log if e == "in"]
    names = [n for _, n in sorted(ins)]
    assert names == ["w1", "r1", "r2", "w2", "r3"]
    t = dict((n, when) for when, n in ins)
    assert t["r1"] == t["r2"]            # queued readers enter together
    assert t["w2"] >= t["r1"] + 50        # then the writer, after they drain


def test_waiter_spins_on_its_cpu(setup):
    h, lock = setup(ncpus=2)
    holder(h, lock, WRITE, 0, 1000, "w")
    holder(h, lock, READ, 10, 10, "r")
    h.run(until=500)
    r = next(t for t in h.engine.tasks if t.name == "r")
    assert r.cpu.curr is r and r.state == "running"   # keeps the CPU, not blocked
    assert "spinning on mmu_lock" in r.doing


def test_spinlock_fifo_and_stats(mkhost):
    h = mkhost(ncpus=4)
    sl = h.spinlock("tdp_mmu_pages_lock")
    order = []

    def fn(th, start):
        yield start
        yield from sl.acquire(th)
        order.append(th.name)
        yield 100
        sl.release(th)

    for i, s in enumerate([0, 30, 10, 20]):
        h.spawn(fn, f"t{i}", s)
    h.run()
    assert order == ["t0", "t2", "t3", "t1"]
    assert sl.stats.contended == 3 and sl.stats.max_hold == 100
    assert sl.stats.max_wait == 300 - 30   # t1 arrived at 30, got it at 300


def test_lock_hold_and_wait_stats(setup):
    h, lock = setup()
    holder(h, lock, WRITE, 0, 700, "w")
    holder(h, lock, READ, 100, 50, "r")
    h.run()
    assert lock.stats_write.max_hold == 700
    assert lock.stats_read.max_wait == 600
    assert lock.stats_read.contended == 1
