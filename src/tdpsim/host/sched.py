"""pCPUs, runqueues and the scheduler: need_resched, cond_resched, sleeping, wakeups.

Model (a simplification of CFS, recorded in docs/design-notes.md):

* Kernel code is not preemptible: a task keeps its pCPU until it blocks, sleeps, exits or
  passes ``cond_resched`` while ``need_resched`` is set.  A task spinning on a lock keeps
  its pCPU too.
* ``need_resched`` becomes true on a busy pCPU (a) ``sched_timeslice`` after the current
  task's slice started, if another task waits on that runqueue, or (b) when the soft-lockup
  watchdog's per-CPU stopper is kicked: its hrtimer fires every ``watchdog_sample_period``
  (4 s, 2/5 of watchdog_thresh) on a fixed grid, and the stopper runs at the next
  scheduling point, which is when the CPU's watchdog timestamp is touched.
* Both are pure functions of time and state, so ``need_resched_at(cpu)`` tells a bulk loop
  exactly how long need_resched stays false; anything that enqueues a task on a runqueue
  settles that CPU's bulks first.
* Wakeup placement: a pinned task goes to its CPU; an unbound one to an idle CPU (its
  previous CPU first, then by id; a decision when several are idle), else to the shortest
  runqueue.  An idle CPU steals the oldest waiting unbound task from other runqueues.
* Soft lockup, as kernel/watchdog.c reports it: the per-CPU hrtimer fires on the same 4 s
  grid; it kicks the stopper and compares timestamps in units of 2^30 ns (the kernel's
  ``get_timestamp``, "seconds").  It reports when now is strictly more than
  2 x watchdog_thresh units after the last report (or the last touch), saying "stuck for
  N s" with N counted from the last touch, and re-reports every ~2 x watchdog_thresh
  while the CPU stays stuck.  An episode ends when the stopper runs.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Generator

from ..sim.engine import PARK, Resource, Task

if TYPE_CHECKING:
    from .host import Host

INF = 1 << 62

RUNNING, RUNNABLE, BLOCKED, DEAD = "running", "runnable", "blocked", "dead"


class Thread(Task):
    """A host task (kernel thread, vCPU thread, kworker...)."""

    __slots__ = ("host", "cpu", "affinity", "state", "doing", "rcu_nesting", "rcu_since",
                 "joiners", "kind")

    def __init__(self, host: "Host", tid: int, name: str, affinity: int | None, kind: str):
        super().__init__(tid, name)
        self.host = host
        self.cpu: Cpu | None = None
        self.affinity = affinity
        self.state = BLOCKED  # until its first wake
        #: what the task is doing, for watchdog reports ("tdp_mmu_zap_root", "spinning on...")
        self.doing = ""
        self.rcu_nesting = 0
        self.rcu_since = 0
        self.joiners: list[Thread] = []
        self.kind = kind


class Cpu(Resource):
    """One pCPU.  As a Resource it stands for the need_resched flag of that CPU."""

    __slots__ = ("id", "curr", "rq", "slice_start", "resched_at", "touch", "idle_since",
                 "lockup_touch", "report_ts", "lockup_gen", "watchdog", "busy_ns")

    def __init__(self, cid: int):
        super().__init__()
        self.id = cid
        self.curr: Thread | None = None
        self.rq: deque[Thread] = deque()
        self.slice_start = 0
        self.resched_at = INF
        self.touch = 0              # last time the watchdog stopper ran here
        self.idle_since = 0         # valid while curr is None
        self.lockup_touch = -1      # touch value of the episode already reported
        self.report_ts = 0          # watchdog_report_ts: the last touch or report, in units
        self.lockup_gen = 0         # generation of the one live lockup timer
        self.watchdog: Task | None = None  # owner of the timer (fixed rank)
        self.busy_ns = 0


class Scheduler:
    def __init__(self, host: "Host", ncpus: int):
        self.host = host
        self.engine = host.engine
        self.cpus = [Cpu(i) for i in range(ncpus)]
        cfg = host.config
        self.period = cfg.watchdog_sample_period_ns
        #: the watchdog's timestamp unit (2^30 ns) and threshold in those units
        self.ts_unit = cfg.watchdog_ts_unit_ns
        self.thresh_units = 2 * cfg.watchdog_thresh_s
        self.timeslice = host.costs.sched_timeslice
        self.switch_cost = host.costs.context_switch
        self.lockup_episodes: list[dict] = []
        for cpu in self.cpus:
            cpu.watchdog = Task(self.engine.new_id(), f"watchdog/{cpu.id}")
            self._arm_lockup(cpu)

    # ---- need_resched -----------------------------------------------------------------

    def kick_at(self, cpu: Cpu) -> int:
        """When the watchdog stopper is next kicked on ``cpu`` (first grid point after touch)."""
        return (cpu.touch // self.period + 1) * self.period

    def need_resched_at(self, cpu: Cpu) -> int:
        """Earliest time need_resched is (or becomes) true on a busy ``cpu`` given its state."""
        k = self.kick_at(cpu)
        return min(k, cpu.resched_at) if cpu.rq else k

    def need_resched(self, th: Thread) -> bool:
        return self.engine.now >= self.need_resched_at(th.cpu)

    # ---- wakeups and placement ---------------------------------------------------------

    def wake(self, th: Thread) -> None:
        """Make a blocked (or new) thread runnable."""
        if th.state in (RUNNING, RUNNABLE):
            return
        th.state = RUNNABLE
        cpu = self._place(th)
        if cpu.curr is None:
            self._switch_in(cpu, th)
        else:
            self._enqueue(cpu, th)

    def _enqueue(self, cpu: Cpu, th: Thread) -> None:
        if cpu.bulks:
            self.engine.settle(cpu)
        if self.engine.check_settle:
            self.engine.assert_settled(cpu, None, None, False)
        if not cpu.rq:
            cpu.resched_at = max(self.engine.now, cpu.slice_start + self.timeslice)
        th.cpu = cpu
        cpu.rq.append(th)

    def _place(self, th: Thread) -> Cpu:
        if th.affinity is not None:
            return self.cpus[th.affinity]
        idle = [c for c in self.cpus if c.curr is None]
        if idle:
            if th.cpu is not None and th.cpu.curr is None:
                idle.remove(th.cpu)
                idle.insert(0, th.cpu)
            if len(idle) == 1:
                return idle[0]
            i = self.engine.decide(f"{th.name}:place", tuple(c.id for c in idle))
            return idle[i]
        return min(self.cpus, key=lambda c: (len(c.rq), c.id))

    def _switch_in(self, cpu: Cpu, th: Thread) -> None:
        now = self.engine.now
        if cpu.curr is None:
            if now >= self.kick_at(cpu):
                # the stopper ran at the last kick while the CPU was idle
                self._touch(cpu, max(cpu.touch, (now // self.period) * self.period))
            self._arm_lockup(cpu)
        cpu.curr = th
        th.cpu = cpu
        th.state = RUNNING
        cpu.slice_start = now
        cpu.resched_at = now + self.timeslice
        self.engine.schedule(th, now + self.switch_cost)

    def _leave(self, th: Thread, state: str) -> None:
        """``th`` gives up its CPU (a scheduling point); the CPU runs the next task."""
        cpu = th.cpu
        now = self.engine.now
        self._sched_point(cpu)
        if self.engine.trace is not None:
            self.engine.trace.emit(now, "switch_out", th.name, cpu=cpu.id, state=state)
        th.state = state
        cpu.curr = None
        cpu.busy_ns += now - cpu.slice_start
        nxt = cpu.rq.popleft() if cpu.rq else self._steal(cpu)
        if nxt is not None:
            self._switch_in(cpu, nxt)
        else:
            cpu.idle_since = now
            cpu.resched_at = INF

    def _steal(self, cpu: Cpu) -> Thread | None:
        for other in self.cpus:
            if other is cpu:
                continue
            for th in other.rq:
                if th.affinity is None:
                    other.rq.remove(th)
                    return th
        return None

    def _sched_point(self, cpu: Cpu) -> None:
        """A point where the watchdog stopper may run: touch if it has been kicked."""
        now = self.engine.now
        if now >= self.kick_at(cpu):
            if cpu.lockup_touch == cpu.touch:
                self._end_lockup(cpu, now)
            self._touch(cpu, now)

    # ---- what threads call (generators: ``yield from sched.xxx(th)``) -------------------

    def cond_resched(self, th: Thread) -> Generator:
        """Models cond_resched(): reschedule if need_resched.  Returns True if it did."""
        cpu = th.cpu
        if self.engine.now < self.need_resched_at(cpu):
            return False
        if not cpu.rq:
            # only the watchdog stopper wanted the CPU: it runs and we continue
            self._sched_point(cpu)
            yield self.switch_cost
            return True
        self._leave(th, RUNNABLE)
        th.cpu = cpu
        self._enqueue_self(cpu, th)
        yield PARK
        return True

    def _enqueue_self(self, cpu: Cpu, th: Thread) -> None:
        if cpu.curr is None:  # nobody else was really waiting (stolen meanwhile)
            self._switch_in(cpu, th)
        else:
            self._enqueue(cpu, th)

    def block(self, th: Thread) -> Generator:
        """Give up the CPU until ``wake(th)``; the value passed to wake is returned."""
        self._leave(th, BLOCKED)
        value = yield PARK
        return value

    def sleep(self, th: Thread, ns: int) -> Generator:
        """Sleep for ns (a timer wakes the thread; it then waits for a CPU)."""
        self.engine.call_at(self.engine.now + ns, lambda _v: self.wake(th), "sleep", owner=th)
        yield from self.block(th)

    def exit(self, th: Thread) -> None:
        if th.state == RUNNING:
            self._leave(th, DEAD)
        th.state = DEAD
        for j in th.joiners:
            self.wake(j)
        th.joiners.clear()

    # ---- soft-lockup detector -----------------------------------------------------------

    def _touch(self, cpu: Cpu, t: int) -> None:
        """update_touch_ts: the stopper ran at ``t`` (both timestamps restart there)."""
        cpu.touch = t
        cpu.report_ts = t // self.ts_unit

    def _arm_lockup(self, cpu: Cpu) -> None:
        """Wake the detector at the first sample that could report: the first grid point
        whose timestamp is more than the threshold past ``report_ts`` (the samples before
        it cannot report, whatever happens)."""
        t = (cpu.report_ts + self.thresh_units + 1) * self.ts_unit
        t = -(-t // self.period) * self.period
        cpu.lockup_gen += 1
        self.engine.call_at(t, lambda gen, c=cpu: self._check_lockup(c, gen), "softlockup",
                            owner=cpu.watchdog, value=cpu.lockup_gen)

    def _check_lockup(self, cpu: Cpu, gen: int) -> None:
        """watchdog_timer_fn's check at a sample (is_softlockup)."""
        if gen != cpu.lockup_gen:
            return  # superseded by a later arm
        now = self.engine.now
        if cpu.curr is None:
            # idle: the stopper ran at the kick before this sample
            self._touch(cpu, max(cpu.touch, now - self.period))
        elif now // self.ts_unit > cpu.report_ts + self.thresh_units:
            cpu.lockup_touch = cpu.touch
            cpu.report_ts = now // self.ts_unit
            th = cpu.curr
            self.host.report("soft_lockup", th, cpu=cpu.id,
                             stuck_s=cpu.report_ts - cpu.touch // self.ts_unit,
                             stuck_ns=now - cpu.touch, doing=th.doing)
        self._arm_lockup(cpu)

    def _end_lockup(self, cpu: Cpu, now: int) -> None:
        cpu.lockup_touch = -1
        th = cpu.curr
        ep = {"cpu": cpu.id, "task": th.name if th else None, "start": cpu.touch,
              "stuck_ns": now - cpu.touch, "doing": th.doing if th else ""}
        self.lockup_episodes.append(ep)
        self.host.report("soft_lockup_end", th, cpu=cpu.id, stuck_ns=now - cpu.touch)

    def finish(self) -> None:
        """Close open lockup episodes at the end of a run (for the monitors)."""
        for cpu in self.cpus:
            if cpu.lockup_touch == cpu.touch and cpu.lockup_touch >= 0:
                self._end_lockup(cpu, self.engine.now)
