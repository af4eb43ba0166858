"""RCU: read-side critical sections, grace periods, call_rcu, synchronize_rcu, rcu_barrier.

Model (tree RCU reduced to what the TDP MMU relies on):

* ``read_lock``/``read_unlock`` nest per task; only the outermost pair matters.
* A grace period (GP) starts when callbacks or synchronize_rcu callers are waiting and no
  GP is running.  It waits for every reader that was inside its critical section when the GP
  started (the guarantee the memory model's RCU litmus tests check) and lasts at least
  ``rcu_gp_min``.  Readers that start after the GP started do not hold it up.
* Callbacks queued before a GP starts are invoked when it ends; callbacks queued during a GP
  wait for the next one.  Invocation happens at the GP's end, in order of queueing (the
  kernel runs them from softirq soon after; that delay is not modelled).
* RCU CPU stall, as kernel/rcu/tree_stall.h reports it: checked on the scheduling-clock
  tick, so the first report is at the tick where jiffies reach the GP's start jiffy plus
  ``rcu_stall_timeout`` (``jiffies_stall``), if the GP is still waiting on a reader; each
  reader still holding it up is reported (CPU, task, what it was doing, how long it has
  been inside).  The next report of the same GP is 3 x timeout + 3 jiffies later
  (``check_cpu_stall``).

Read-side sections are not Resources: bulk loops never enter or leave one mid-bulk.  The
callback queues are: a bulk that queues callbacks (a run of page tables torn down)
declares ``Rcu``, and whatever queues a callback, waits for one, or starts or ends a grace
period settles it first, so callbacks keep exact mode's order and grace periods.  A queue
entry may stand for ``n`` callbacks of one batch (``call_rcu(fn, n)``), counted as n.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Generator

from ..sim.engine import Resource, Task

if TYPE_CHECKING:
    from .host import Host
    from .sched import Thread


class Rcu(Resource):
    def __init__(self, host: "Host"):
        super().__init__()
        self.host = host
        self.engine = host.engine
        self.gp_min = host.costs.rcu_gp_min
        cfg = host.config
        self.jiffy = cfg.jiffy_ns
        self.stall_jiffies = cfg.rcu_stall_timeout_s * cfg.hz   # rcu_jiffies_till_stall_check
        self.readers: dict[int, "Thread"] = {}
        self.gp_seq = 0               # number of GPs completed
        self.gp_running = False
        self.gp_start = 0
        self._holdouts: dict[int, "Thread"] = {}
        self._min_elapsed = False
        #: (callback, how many callbacks it stands for): those the running GP will invoke,
        #: and those for the GP after
        self._cur: list[tuple[Callable[[], None], int]] = []
        self._next: list[tuple[Callable[[], None], int]] = []
        self._waiters: list[tuple[int, "Thread"]] = []  # (gp number to wait for, thread)
        self.owner = Task(self.engine.new_id(), "rcu")
        self.stalls: list[dict] = []
        #: GPs that were reported stalled: {"gp", "start", "ns"} (ns: how long the GP took)
        self.stall_episodes: list[dict] = []
        self._stalled = False           # the running GP has been reported
        self.callbacks_invoked = 0
        self.longest_section = 0
        self.longest_section_who: tuple[str, int] | None = None

    # ---- readers ------------------------------------------------------------------------

    def read_lock(self, th: "Thread") -> None:
        th.rcu_nesting += 1
        if th.rcu_nesting == 1:
            th.rcu_since = self.engine.now
            self.readers[th.id] = th

    def read_unlock(self, th: "Thread") -> None:
        assert th.rcu_nesting > 0, f"{th.name}: rcu_read_unlock without rcu_read_lock"
        th.rcu_nesting -= 1
        if th.rcu_nesting:
            return
        del self.readers[th.id]
        length = self.engine.now - th.rcu_since
        if length > self.longest_section:
            self.longest_section = length
            self.longest_section_who = (th.name, th.cpu.id if th.cpu else -1)
        if self._holdouts.pop(th.id, None) is not None and not self._holdouts \
                and self._min_elapsed:
            self._end_gp()

    # ---- grace periods ------------------------------------------------------------------

    def _settle(self) -> None:
        """Settle bulks that queue callbacks (before the queues are read or changed)."""
        eng = self.engine
        if self.bulks:
            eng.settle(self)
        if eng.check_settle:
            eng.assert_settled(self, None, None, False)

    def call_rcu(self, fn: Callable[[], None], n: int = 1) -> None:
        """Invoke ``fn()`` after a full grace period (``n``: it stands for that many
        callbacks queued back to back, e.g. the frees of a run of page tables)."""
        self._settle()
        self._next.append((fn, n))
        if not self.gp_running:
            self._start_gp()

    def synchronize_rcu(self, th: "Thread") -> Generator:
        """Block until a full grace period has elapsed after the call."""
        # a GP already running may have started before us: wait for the next one
        self._settle()
        target = self.gp_seq + (2 if self.gp_running else 1)
        self._waiters.append((target, th))
        if not self.gp_running:
            self._start_gp()
        yield from self.host.sched.block(th)

    def rcu_barrier(self, th: "Thread") -> Generator:
        """Block until every callback queued before the call has been invoked."""
        self._settle()
        if self._next:
            target = self.gp_seq + (2 if self.gp_running else 1)
        elif self._cur:
            target = self.gp_seq + 1
        else:
            return
        self._waiters.append((target, th))
        yield from self.host.sched.block(th)

    def _start_gp(self) -> None:
        eng = self.engine
        self.gp_running = True
        self.gp_start = eng.now
        self._cur, self._next = self._next, []
        self._holdouts = dict(self.readers)
        self._min_elapsed = False
        self._stalled = False
        gp = self.gp_seq + 1
        eng.call_at(eng.now + self.gp_min, lambda _v: self._min_done(gp), "rcu_gp", self.owner)
        js = eng.now // self.jiffy + self.stall_jiffies        # jiffies_stall
        eng.call_at(js * self.jiffy, lambda _v: self._stall_check(gp), "rcu_stall",
                    self.owner)
        if eng.trace is not None:
            eng.trace.emit(eng.now, "rcu_gp_start", None, gp=gp, holdouts=len(self._holdouts))

    def _min_done(self, gp: int) -> None:
        if not self.gp_running or gp != self.gp_seq + 1:
            return
        self._min_elapsed = True
        if not self._holdouts:
            self._end_gp()

    def _end_gp(self) -> None:
        eng = self.engine
        self._settle()
        self.gp_seq += 1
        self.gp_running = False
        if self._stalled:
            self.stall_episodes.append({"gp": self.gp_seq, "start": self.gp_start,
                                        "ns": eng.now - self.gp_start})
        if eng.trace is not None:
            eng.trace.emit(eng.now, "rcu_gp_end", None, gp=self.gp_seq,
                           callbacks=sum(n for _, n in self._cur))
        cbs, self._cur = self._cur, []
        for fn, n in cbs:
            fn()
            self.callbacks_invoked += n
        still = []
        for target, th in self._waiters:
            if target <= self.gp_seq:
                self.host.sched.wake(th)
            else:
                still.append((target, th))
        self._waiters = still
        if self._next or self._waiters:
            self._start_gp()

    def open_stall(self) -> dict | None:
        """The running GP as a stall episode so far, if it has been reported."""
        if not (self.gp_running and self._stalled):
            return None
        return {"gp": self.gp_seq + 1, "start": self.gp_start,
                "ns": self.engine.now - self.gp_start}

    def _stall_check(self, gp: int) -> None:
        """check_cpu_stall at the tick where jiffies reach ``jiffies_stall``: report the
        readers holding the GP up, then look again 3 x timeout + 3 jiffies later."""
        if not self.gp_running or gp != self.gp_seq + 1 or not self._holdouts:
            return
        eng = self.engine
        now = eng.now
        self._stalled = True
        for th in self._holdouts.values():
            rec = {"gp": gp, "t": now, "cpu": th.cpu.id if th.cpu else -1, "task": th.name,
                   "inside_ns": now - th.rcu_since, "gp_age_ns": now - self.gp_start,
                   "doing": th.doing}
            self.stalls.append(rec)
            self.host.report("rcu_stall", th, cpu=rec["cpu"], inside_ns=rec["inside_ns"],
                             gp_age_ns=rec["gp_age_ns"], doing=th.doing)
        jn = now // self.jiffy + 3 * self.stall_jiffies + 3
        eng.call_at(jn * self.jiffy, lambda _v: self._stall_check(gp), "rcu_stall",
                    self.owner)
