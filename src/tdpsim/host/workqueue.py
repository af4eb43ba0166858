"""Workqueues with unbound workers, flush, destroy, and the workqueue watchdog.

Kernel behaviour modelled (kernel/workqueue.c):

* ``queue_work`` on an item whose PENDING bit is set is a no-op returning False.
* PENDING is cleared when a worker takes the item, before its function runs, so the item can
  be queued again while it runs.
* Unbound workers: a worker task is started for each item up to ``max_active`` running at
  once; idle workers are reused (most recently idle first).  Workers are unbound threads.
* ``flush_workqueue`` waits until every item queued before the call has finished.
* ``destroy_workqueue`` drains (flushes until nothing is queued) and retires the workers.
* Watchdog: if items are pending and none has started for ``wq_watchdog_thresh`` (30 s), a
  workqueue stall is reported (once per stall).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable, Generator

from ..sim.engine import Task

if TYPE_CHECKING:
    from .host import Host
    from .sched import Thread


class WorkItem:
    """A ``work_struct``: ``fn(worker_thread, item)`` is a generator run by a worker."""

    __slots__ = ("fn", "name", "pending", "seq", "data")

    def __init__(self, fn: Callable[["Thread", "WorkItem"], Generator], name: str, data=None):
        self.fn = fn
        self.name = name
        self.pending = False
        self.seq = 0
        self.data = data


class Workqueue:
    def __init__(self, host: "Host", name: str, max_active: int = 512):
        self.host = host
        self.engine = host.engine
        self.name = name
        self.max_active = max_active
        self.queue: deque[WorkItem] = deque()
        self.idle: list["Thread"] = []
        self.workers: list["Thread"] = []
        self.running = 0
        self.starting = 0
        self.seq = 0
        self.inflight: set[int] = set()      # seqs queued or running
        self._flushers: list[tuple[int, "Thread"]] = []
        self.destroyed = False
        self.queued = 0
        self.completed = 0
        self.last_progress = 0
        self.stalls: list[dict] = []
        self._stall_reported_at = -1
        self._wd_gen = 0
        self.owner = Task(self.engine.new_id(), f"wq_watchdog/{name}")

    # ---- API ----------------------------------------------------------------------------

    def queue_work(self, item: WorkItem) -> bool:
        if self.destroyed:
            raise RuntimeError(f"queue_work on destroyed workqueue {self.name}")
        if item.pending:
            return False
        eng = self.engine
        item.pending = True
        self.seq += 1
        item.seq = self.seq
        self.inflight.add(item.seq)
        if not self.queue:
            self.last_progress = eng.now
            self._arm_watchdog(eng.now + self.host.config.wq_stall_thresh_ns)
        self.queue.append(item)
        self.queued += 1
        if eng.trace is not None:
            eng.trace.emit(eng.now, "queue_work", None, wq=self.name, item=item.name,
                           seq=item.seq)
        self._kick()
        return True

    def flush(self, th: "Thread") -> Generator:
        """``flush_workqueue``: wait for everything queued before now."""
        target = self.seq
        # re-checked after every wakeup, as the kernel's wait for the flush completion is;
        # a wakeup from elsewhere leaves our entry registered: drop it before waiting again
        while any(s <= target for s in self.inflight):
            entry = (target, th)
            self._flushers.append(entry)
            yield from self.host.sched.block(th)
            if entry in self._flushers:
                self._flushers.remove(entry)

    def destroy(self, th: "Thread") -> Generator:
        """``destroy_workqueue``: drain, then retire the workers."""
        while self.inflight:
            yield from self.flush(th)
        self.destroyed = True
        while self.idle:
            self.starting += 1
            self.host.sched.wake(self.idle.pop())

    # ---- workers ------------------------------------------------------------------------

    def _kick(self) -> None:
        """Get a worker heading for every queued item, up to ``max_active`` at once."""
        while len(self.queue) > self.starting and self.running + self.starting < self.max_active:
            self.starting += 1
            if self.idle:
                self.host.sched.wake(self.idle.pop())
            else:
                n = len(self.workers)
                w = self.host.spawn(self._worker, f"kworker/u:{self.name}/{n}", kind="kworker",
                                    start_delay=self.host.costs.wq_wakeup)
                self.workers.append(w)

    def _worker(self, th: "Thread") -> Generator:
        eng = self.engine
        while True:
            self.starting -= 1  # counted as starting when spawned or woken
            while self.queue:
                item = self.queue.popleft()
                item.pending = False
                self.running += 1
                self.last_progress = eng.now
                if eng.trace is not None:
                    eng.trace.emit(eng.now, "work_start", th.name, wq=self.name,
                                   item=item.name, seq=item.seq)
                th.doing = item.name
                yield from item.fn(th, item)
                th.doing = ""
                self.running -= 1
                self.completed += 1
                self.inflight.discard(item.seq)
                if eng.trace is not None:
                    eng.trace.emit(eng.now, "work_done", th.name, wq=self.name,
                                   item=item.name, seq=item.seq)
                self._wake_flushers()
            if self.destroyed:
                return
            self.idle.append(th)
            yield from self.host.sched.block(th)

    def _wake_flushers(self) -> None:
        if not self._flushers:
            return
        low = min(self.inflight) if self.inflight else None
        still = []
        for target, th in self._flushers:
            if low is None or low > target:
                self.host.sched.wake(th)
            else:
                still.append((target, th))
        self._flushers = still

    # ---- watchdog -----------------------------------------------------------------------

    def _arm_watchdog(self, t: int) -> None:
        self._wd_gen += 1
        gen = self._wd_gen
        self.engine.call_at(t, lambda _v: self._watchdog(gen), "wq_watchdog", self.owner)

    def _watchdog(self, gen: int) -> None:
        if gen != self._wd_gen or not self.queue:
            return
        now = self.engine.now
        thresh = self.host.config.wq_stall_thresh_ns
        due = self.last_progress + thresh
        if now < due:
            self._arm_watchdog(due)
            return
        if self._stall_reported_at != self.last_progress:  # once per stall
            self._stall_reported_at = self.last_progress
            rec = {"wq": self.name, "stuck_ns": now - self.last_progress,
                   "pending": len(self.queue), "first": self.queue[0].name}
            self.stalls.append(rec)
            self.host.report("wq_stall", None, **rec)
        self._arm_watchdog(now + thresh)
