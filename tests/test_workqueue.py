"""Workqueues: queue_work on a pending item, re-queue while running, flush, destroy."""

from tdpsim.host.workqueue import WorkItem


def _item(log, h, name, cost):
    def fn(th, item):
        log.append((name, "start", h.engine.now))
        yield cost
        log.append((name, "end", h.engine.now))
    return WorkItem(fn, name)


def test_queue_work_on_pending_item_is_noop(mkhost):
    h = mkhost(ncpus=2)
    wq = h.workqueue("kvm")
    log = []
    it = _item(log, h, "zap", 100)
    results = []

    def vmm(th):
        results.append(wq.queue_work(it))
        results.append(wq.queue_work(it))       # still pending: no-op
        yield from wq.flush(th)
        yield from wq.destroy(th)

    h.spawn(vmm, "vmm")
    h.run()
    assert results == [True, False]
    assert [e for e in log if e[1] == "start"] == [("zap", "start", log[0][2])]
    assert wq.completed == 1


def test_requeue_while_running_runs_again(mkhost):
    h = mkhost(ncpus=2)
    wq = h.workqueue("kvm")
    log = []
    it = _item(log, h, "zap", 1_000)
    results = []

    def vmm(th):
        results.append(wq.queue_work(it))
        yield 20_000                              # the item is running by now
        results.append(wq.queue_work(it))
        yield from wq.flush(th)
        yield from wq.destroy(th)

    h.spawn(vmm, "vmm")
    h.run()
    assert results == [True, True]
    assert sum(1 for e in log if e[1] == "start") == 2


def test_flush_waits_for_items_queued_before_it(mkhost):
    h = mkhost(ncpus=4)
    wq = h.workqueue("kvm")
    log = []
    items = [_item(log, h, f"w{i}", 1_000 * (i + 1)) for i in range(3)]
    flushed = []

    def vmm(th):
        for it in items:
            wq.queue_work(it)
        yield from wq.flush(th)
        flushed.append(h.engine.now)
        yield from wq.destroy(th)

    h.spawn(vmm, "vmm")
    h.run()
    ends = [t for n, e, t in log if e == "end"]
    assert len(ends) == 3 and flushed[0] >= max(ends)
    starts = [t for n, e, t in log if e == "start"]
    assert max(starts) - min(starts) < 1_000     # unbound workers ran them in parallel


def test_flush_with_nothing_queued_returns_at_once(mkhost):
    h = mkhost(ncpus=1)
    wq = h.workqueue("kvm")
    out = []

    def vmm(th):
        yield from wq.flush(th)
        out.append(h.engine.now)

    h.spawn(vmm, "vmm")
    h.run()
    assert out == [1]    # only the context switch
