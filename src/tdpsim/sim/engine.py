"""Discrete-event engine: integer-nanosecond clock, generator tasks, decisions, bulk steps.

Tasks are generators.  What a task yields tells the engine what to do next:

* an ``int`` d >= 0: run again d ns from now (the task keeps whatever it holds);
* ``PARK``: suspend until some other code calls ``engine.wake(task)`` / ``schedule``;
* a ``Bulk``: a run of loop iterations executed at once (the ``fast`` granularity).

Events due at the same instant are ordered by the strategy's rank of their task, and the
choice is recorded as a ``tie`` decision when more than one event is due.

Bulk steps (see docs/design-notes.md, "fast granularity"): a task that would run n loop
iterations one event each instead yields one Bulk naming the resources its loop depends on.
The engine schedules the task at the end of the whole run of iterations and applies nothing
yet.  Any code about to read or change one of those resources calls ``settle(resource)``
first; the engine then applies exactly the iterations that ``exact`` mode would have run
before the current event (same rank rule for an iteration due at this very instant) and
reschedules the task at the start of the first iteration not run.  Iterations are applied
lazily, so no event can see a state that ``exact`` mode would not have shown it.
"""

from __future__ import annotations

import gc
import os
from bisect import insort
from contextlib import contextmanager
from heapq import heappop, heappush
from itertools import count
from typing import Callable, Generator, Iterable

from .steps import Costs, Run, Steps
from .strategy import FifoStrategy, Strategy
from .trace import Trace


class _Park:
    __slots__ = ()

    def __repr__(self) -> str:
        return "PARK"


PARK = _Park()


class StopRun(Exception):
    """Raised by the stop timer (never inside a task) to end ``Engine.run``."""


class Resource:
    """Anything a bulk loop depends on (a lock, a CPU, a root...).

    Invariant: code that reads or changes what a bulk depends on calls
    ``engine.settle(resource)`` first whenever ``resource.bulks`` is non-empty."""

    __slots__ = ("bulks",)

    def __init__(self) -> None:
        self.bulks: list[Bulk] = []


class Task:
    """A generator task.  ``fn`` is set instead of ``gen`` for one-shot timer callbacks."""

    __slots__ = ("id", "name", "gen", "fn", "done", "result", "bulk", "on_exit", "_entry")

    def __init__(self, tid: int, name: str, gen: Generator | None = None,
                 fn: Callable | None = None):
        self.id = tid
        self.name = name
        self.gen = gen
        self.fn = fn
        self.done = False
        self.result = None
        self.bulk: Bulk | None = None
        self.on_exit: Callable | None = None
        self._entry = None  # (time, entry) of the pending event, kept only while in a bulk

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.name}>"


@contextmanager
def _few_collections():
    """Python's cyclic garbage collector, run less often while events run.

    A simulation keeps millions of long-lived objects (tables, runs, tasks) and makes few
    cycles; with the default thresholds the collector's full passes walk all of them
    again and again (a tenth of the wall time of the 64 TiB selftest).  What the
    simulation computes does not depend on when the collector runs."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], 50_000), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


class Bulk:
    """A run of ``n`` loop iterations yielded as one step.

    ``steps`` (``sim.steps``) gives the iterations' durations in ns (each >= 1); iteration i
    starts at ``t0 + steps.start_of(i)``.  ``costs`` is a ``Steps``, an ``(n, cost)`` pair
    or an array of costs.  ``apply(k)``
    performs the first k iterations' effects.  The task is resumed with the number of
    iterations done, at the start of the first not done.

    ``resources`` are Resources, or ``(resource, lo, hi)`` when the loop depends only on the
    keys [lo, hi) of it (table entries, pages): ``settle(resource, lo, hi)`` then leaves the
    bulk alone unless the ranges overlap.  ``(resource, lo, hi, wlo, whi)`` adds that the
    loop changes only the keys [wlo, whi) of it (empty if wlo == whi): a reader,
    ``settle(resource, lo, hi, read=True)``, leaves it alone unless it reads keys the loop
    changes.  Without a write range the loop may change any key it depends on."""

    __slots__ = ("steps", "apply", "resources", "ranges", "wranges", "task", "t0", "n")

    def __init__(self, costs, apply: Callable[[int], None], resources: Iterable[Resource]):
        if isinstance(costs, Steps):
            self.steps = costs
        elif isinstance(costs, tuple):
            self.steps = Run(*costs)
        else:
            self.steps = Costs(costs)
        self.n = self.steps.n
        if self.n == 0:
            raise ValueError("empty bulk")
        self.apply = apply
        res, ranges, wranges = [], {}, {}
        for r in resources:
            if isinstance(r, tuple):
                if len(r) == 5:
                    r, lo, hi, wlo, whi = r
                    wranges[id(r)] = (wlo, whi)
                else:
                    r, lo, hi = r
                ranges[id(r)] = (lo, hi)
            res.append(r)
        self.resources = tuple(res)
        self.ranges = ranges
        self.wranges = wranges
        self.task: Task | None = None
        self.t0 = 0

    def start_of(self, k: int) -> int:
        """Absolute start time of iteration k (k may be n: the end of the run)."""
        return self.t0 + self.steps.start_of(k)


_BULK_END = object()   # value of a bulk's end event


class SettleError(AssertionError):
    """The settle checker found an access to a resource with a pending bulk."""


def _depends(bulk: Bulk, resource: Resource, lo: int | None, hi: int | None,
             read: bool) -> bool:
    """Does ``bulk`` depend on keys [lo, hi) of ``resource`` (all keys if lo is None) in a
    way that an access (a read if ``read``, else a write) must settle first?"""
    if lo is None:
        return True
    rng = bulk.ranges.get(id(resource))
    if rng is not None and (hi <= rng[0] or rng[1] <= lo):
        return False
    if read:
        w = bulk.wranges.get(id(resource))
        if w is not None and (w[0] == w[1] or hi <= w[0] or w[1] <= lo):
            return False
    return True


def _rank_of(entry: tuple) -> int:
    return entry[0]


def _raise_stop(_value) -> None:
    raise StopRun


class Engine:
    """The event loop.  ``granularity`` is 'exact' or 'fast' and is read by the layers above."""

    __slots__ = ("strategy", "trace", "granularity", "fast", "now", "current",
                 "record_decisions", "decisions", "events", "bulks_started", "_times", "_buckets", "_ids",
                 "tasks", "timer_owner", "stopped", "check_settle")

    def __init__(self, strategy: Strategy | None = None, trace: Trace | None = None,
                 granularity: str = "exact", record_decisions: bool = True):
        if granularity not in ("exact", "fast"):
            raise ValueError("granularity must be 'exact' or 'fast'")
        self.strategy = strategy or FifoStrategy()
        self.trace = trace
        self.granularity = granularity
        self.fast = granularity == "fast"
        self.now = 0
        self.current: Task | None = None
        self.record_decisions = record_decisions
        #: every decision with > 1 choice, in order; read it through ``decision_log()``
        self.decisions: list[tuple] = []
        self.events = 0
        #: fast-mode bulks started (a work figure: cost should grow with them, not pages)
        self.bulks_started = 0
        #: the last ``run`` ended through ``stop()`` (not by running out of events or time)
        self.stopped = False
        self._times: list[int] = []
        self._buckets: dict[int, list] = {}
        self._ids = count()
        self.tasks: list[Task] = []
        #: rank id of timers that have no owner (fixed, so ranks never depend on how many
        #: timers a run created: exact and fast mode create different numbers of events)
        self.timer_owner = Task(self.new_id(), "timer")
        #: the settle checker (``TDPSIM_CHECK_SETTLE=1``): owners that settle their
        #: resources themselves also assert, after settling, that nothing is left pending
        self.check_settle = os.environ.get("TDPSIM_CHECK_SETTLE", "") not in ("", "0")

    # ---- tasks and events -------------------------------------------------------------

    def new_id(self) -> int:
        return next(self._ids)

    def spawn(self, gen: Generator, name: str, at: int | None = None,
              task: Task | None = None) -> Task:
        """Start a generator task now (or at ``at``).  ``task`` lets a layer pass its own
        Task subclass, created with ``engine.new_id()``."""
        if task is None:
            task = Task(self.new_id(), name, gen)
        else:
            task.gen = gen
        self.tasks.append(task)
        self.schedule(task, self.now if at is None else at)
        return task

    def call_at(self, t: int, fn: Callable[[object], None], name: str = "timer",
                owner: Task | None = None, value=None) -> Task:
        """Run ``fn(value)`` at time t as its own event (ranked as ``owner`` if given)."""
        timer = Task((owner or self.timer_owner).id, name, fn=fn)
        self.schedule(timer, t, value)
        return timer

    def schedule(self, task: Task, t: int, value=None) -> None:
        """Make ``task`` run at absolute time t (>= now) with ``value`` sent in."""
        if t < self.now:
            raise ValueError(f"cannot schedule {task.name} in the past ({t} < {self.now})")
        s = self.strategy
        rank = task.id if s.rank_is_id else s.rank(task.id, t)
        entry = (rank, task, value)
        b = self._buckets.get(t)
        if b is None:
            self._buckets[t] = [entry]
            heappush(self._times, t)
        else:
            insort(b, entry, key=_rank_of)
        if task.bulk is not None:
            task._entry = (t, entry)

    def wake(self, task: Task, value=None) -> None:
        self.schedule(task, self.now, value)

    @property
    def idle(self) -> bool:
        """No event is pending."""
        return not self._times

    def stop(self) -> None:
        """End ``run`` at the current instant (events already due now may not run)."""
        self.call_at(self.now, _raise_stop, "stop")

    def decide(self, name: str, choices: tuple) -> int:
        """A named decision among ``choices``; returns the chosen index and records it."""
        n = len(choices)
        if n <= 1:
            return 0
        i = self.strategy.choose(name, n)
        if self.record_decisions:
            self.decisions.append((self.now, name, tuple(choices), i))
        if self.trace is not None:
            self.trace.emit(self.now, "decision", None, name=name, choices=list(choices), chosen=i)
        return i

    def decision_log(self) -> list[tuple]:
        """``(time, name, choices, chosen index)`` for every decision, in the order made.

        Simultaneous-event decisions are named ``tie`` and list the tasks' ids."""
        out = []
        for t, name, choices, i in self.decisions:
            if name is None:
                out.append((t, "tie", tuple(e[1].id for e in choices), i))
            else:
                out.append((t, name, choices, i))
        return out

    # ---- the loop -----------------------------------------------------------------------

    def run(self, until: int | None = None) -> int:
        """Run events until none is left or the next is after ``until``.  Returns ``now``."""
        with _few_collections():
            return self._run(until)

    def _run(self, until: int | None) -> int:
        times = self._times
        buckets = self._buckets
        strategy = self.strategy
        rank_is_id = strategy.rank_is_id
        tie_by_rank = strategy.tie_by_rank
        decisions = self.decisions
        record = self.record_decisions
        limit = (1 << 63) if until is None else until
        self.stopped = False
        bulk_end = _BULK_END
        nevents = 0
        try:
            while times:
                t = heappop(times)
                if t > limit:
                    heappush(times, t)
                    break
                b = buckets.pop(t)
                if len(b) == 1:
                    rank, task, value = b[0]
                elif not b:  # emptied by a bulk settle
                    continue
                else:
                    i = 0 if tie_by_rank else strategy.choose_tie(t, tuple(e[1].id for e in b))
                    if record:  # raw snapshot; decision_log() gives it its canonical form
                        decisions.append((t, None, b[:], i))
                    rank, task, value = b.pop(i)
                    buckets[t] = b
                    heappush(times, t)
                self.now = t
                self.current = task
                nevents += 1
                if value is bulk_end:
                    value = self._finish_bulk(task)
                gen = task.gen
                if gen is None:  # timer callback
                    task.fn(value)
                    continue
                try:
                    cmd = gen.send(value)
                except StopIteration as stop:
                    self._exit(task, stop.value)
                    continue
                if cmd.__class__ is int:
                    t2 = t + cmd
                    entry = (task.id if rank_is_id else strategy.rank(task.id, t2), task, None)
                    b2 = buckets.get(t2)
                    if b2 is None:
                        buckets[t2] = [entry]
                        heappush(times, t2)
                    else:
                        insort(b2, entry, key=_rank_of)
                elif cmd is PARK:
                    pass
                elif cmd.__class__ is Bulk:
                    self._start_bulk(task, cmd)
                else:
                    raise TypeError(f"task {task.name} yielded {cmd!r}")
        except StopRun:
            self.stopped = True
            # the run ends here: what exact mode would have done by now is done (the
            # iterations of pending bulks that started before this instant)
            for task in self.tasks:
                if task.bulk is not None:
                    self._settle(task.bulk)
        finally:
            self.events += nevents
            self.current = None
        if until is not None and not self.stopped and (not times or times[0] > until) \
                and until > self.now:
            self.now = until
        return self.now

    def _exit(self, task: Task, result) -> None:
        task.done = True
        task.result = result
        task.gen = None
        if task.on_exit is not None:
            task.on_exit(task)

    # ---- bulk steps ---------------------------------------------------------------------

    def _start_bulk(self, task: Task, bulk: Bulk) -> None:
        bulk.task = task
        bulk.t0 = self.now
        task.bulk = bulk
        self.bulks_started += 1
        for r in bulk.resources:
            r.bulks.append(bulk)
        self.schedule(task, self.now + bulk.steps.total, _BULK_END)
        if self.trace is not None:
            self.trace.emit(self.now, "bulk", task.name, n=bulk.n)

    def _finish_bulk(self, task: Task) -> int:
        """The bulk's end event: apply every iteration.  Returns the count for the task."""
        bulk = task.bulk
        self._detach(bulk)
        bulk.apply(bulk.n)
        return bulk.n

    def _detach(self, bulk: Bulk) -> None:
        for r in bulk.resources:
            r.bulks.remove(bulk)
        bulk.task.bulk = None
        bulk.task._entry = None

    def settle(self, resource: Resource, lo: int | None = None, hi: int | None = None,
               read: bool = False) -> None:
        """Apply pending bulk iterations that depend on ``resource`` (on its keys [lo, hi)
        if given) up to the current event.

        Must be called before the current event reads or changes what those bulks depend on.
        ``read``: the caller only reads keys [lo, hi), so bulks that do not change them (see
        ``Bulk``) are left running: what it reads is the same whether they are settled or
        not."""
        for bulk in list(resource.bulks):
            # (a bulk settled meanwhile, by a settle nested in another's effects, is gone)
            if bulk.task.bulk is bulk and _depends(bulk, resource, lo, hi, read):
                self._settle(bulk)

    def assert_settled(self, resource: Resource, lo: int | None, hi: int | None,
                       read: bool) -> None:
        """The settle checker: raise if a bulk of another task still depends on what the
        current event is about to read (``read``) or change in ``resource``."""
        for bulk in resource.bulks:
            if bulk.task is not self.current and _depends(bulk, resource, lo, hi, read):
                raise SettleError(
                    f"{'read' if read else 'write'} of {resource!r}"
                    f"{'' if lo is None else f' [{lo}, {hi})'} by "
                    f"{getattr(self.current, 'name', None)} at t={self.now} while a bulk "
                    f"of {bulk.task.name} is pending on it (a missing settle)")

    def _settle(self, bulk: Bulk) -> None:
        task = bulk.task
        if task is self.current:
            return
        now = self.now
        d = now - bulk.t0
        steps = bulk.steps
        # Iteration 0 ran when the bulk was issued; the others ran if they started before now.
        k = steps.started_before(d) or 1
        start = steps.start_of(k)
        if k < bulk.n and start == d:
            # iteration k is due at this very instant: exact mode orders it by rank
            s = self.strategy
            cur = self.current
            if s.rank_is_id:
                first = task.id < cur.id
            else:
                first = s.rank(task.id, now) < s.rank(cur.id, now)
            if first:
                k += 1
                start = steps.start_of(k)
        t_end, entry = task._entry
        b = self._buckets[t_end]
        b.remove(entry)
        self._detach(bulk)
        bulk.apply(k)
        if self.trace is not None:
            self.trace.emit(now, "bulk_settle", task.name, done=k, of=bulk.n)
        self.schedule(task, bulk.t0 + start, k)
