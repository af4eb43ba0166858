"""The simulated Linux host: configuration, threads, and the reports of its detectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

from ..costs import CostModel
from ..sim.engine import Engine
from ..sim.strategy import Strategy
from ..sim.trace import Trace
from .locks import RwLock, SpinLock
from .memory import PageAllocator
from .mm import Mm
from .rcu import Rcu
from .sched import Scheduler, Thread
from .workqueue import Workqueue

S = 1_000_000_000

#: thread kinds that do not keep a run alive
DAEMON_KINDS = frozenset({"kworker", "daemon"})

PREEMPT_MODELS = ("none", "voluntary", "dynamic", "full")
#: CONFIG_HZ values x86 offers (kernel/Kconfig.hz)
HZ_CHOICES = (100, 250, 300, 1000)


@dataclass
class HostConfig:
    """Host parameters.  Thresholds are the kernel defaults (workloads.md s3.1)."""

    ncpus: int = 4
    #: CONFIG_PREEMPT model; rwlock_needbreak() works only where CONFIG_PREEMPTION is set
    #: (full, and dynamic builds whatever the boot-time mode).
    preempt: str = "dynamic"
    #: soft lockup after 2 * watchdog_thresh (10 s) without the watchdog being touched
    watchdog_thresh_s: int = 10
    #: CONFIG_RCU_CPU_STALL_TIMEOUT (3..300 s)
    rcu_stall_timeout_s: int = 21
    #: CONFIG_HZ: the scheduling-clock tick (jiffies) RCU's stall checks run on
    hz: int = 1000
    #: wq_watchdog_thresh
    wq_stall_thresh_s: int = 30
    #: host RAM in 4 KiB pages (None: unbounded)
    memory_pages: int | None = None
    #: test hook: scale every watchdog threshold by this many ns per "second" (1e9 = real)
    second_ns: int = S

    def __post_init__(self) -> None:
        check_range("ncpus", self.ncpus, 1, 8192)
        if self.preempt not in PREEMPT_MODELS:
            raise ValueError(f"preempt: expected one of {', '.join(PREEMPT_MODELS)}, "
                             f"got {self.preempt!r}")
        check_range("watchdog_thresh_s", self.watchdog_thresh_s, 1, 60)
        check_range("rcu_stall_timeout_s", self.rcu_stall_timeout_s, 3, 300)
        if self.hz not in HZ_CHOICES:
            raise ValueError(f"hz: expected one of {', '.join(map(str, HZ_CHOICES))}, "
                             f"got {self.hz!r}")
        check_range("wq_stall_thresh_s", self.wq_stall_thresh_s, 1, 3600)
        check_range("second_ns", self.second_ns, 1000, S)

    @property
    def preemption_enabled(self) -> bool:
        return self.preempt in ("dynamic", "full")

    @property
    def watchdog_sample_period_ns(self) -> int:
        # kernel: sample_period = watchdog_thresh * 2 / 5 seconds (4 s by default)
        return self.watchdog_thresh_s * 2 * self.second_ns // 5

    @property
    def watchdog_ts_unit_ns(self) -> int:
        # kernel: get_timestamp() is running_clock() >> 30, "seconds" of 2^30 ns
        return (self.second_ns << 30) // S

    @property
    def jiffy_ns(self) -> int:
        """One tick (at HZ=300, 3,333,333 ns: jiffies are whole nanoseconds here)."""
        return self.second_ns // self.hz

    @property
    def wq_stall_thresh_ns(self) -> int:
        return self.wq_stall_thresh_s * self.second_ns


def check_range(name: str, value, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected an integer from {lo} to {hi}, got {value!r}")


class Host:
    """One simulated host.  Everything hangs off it: engine, scheduler, RCU, memory..."""

    def __init__(self, config: HostConfig | None = None, costs: CostModel | None = None,
                 strategy: Strategy | None = None, granularity: str = "exact",
                 trace: Trace | None = None):
        self.config = config or HostConfig()
        self.costs = costs or CostModel()
        self.engine = Engine(strategy, trace, granularity)
        self.sched = Scheduler(self, self.config.ncpus)
        self.rcu = Rcu(self)
        self.memory = PageAllocator(self, self.config.memory_pages)
        #: every detector report: dicts with t, kind, task and details
        self.reports: list[dict] = []
        #: threads that keep the run going (not daemons such as idle kworkers)
        self.live = 0
        self._listeners: list[Callable[[dict], None]] = []

    # ---- threads ------------------------------------------------------------------------

    def spawn(self, fn: Callable[..., Generator], name: str, *args, cpu: int | None = None,
              kind: str = "kthread", start_delay: int = 0) -> Thread:
        """Create a thread running ``fn(thread, *args)``; pinned to ``cpu`` if given."""
        if cpu is not None and not 0 <= cpu < self.config.ncpus:
            raise ValueError(f"cpu {cpu} out of range 0..{self.config.ncpus - 1}")
        eng = self.engine
        th = Thread(self, eng.new_id(), name, cpu, kind)
        th.gen = fn(th, *args)
        th.on_exit = self._exited
        eng.tasks.append(th)
        if kind not in DAEMON_KINDS:
            self.live += 1
        if eng.trace is not None:
            eng.trace.emit(eng.now, "spawn", name, kind=kind, cpu=cpu)
        if start_delay:
            eng.call_at(eng.now + start_delay, lambda _v: self.sched.wake(th), "start", th)
        else:
            self.sched.wake(th)
        return th

    def _exited(self, th: Thread) -> None:
        if self.engine.trace is not None:
            self.engine.trace.emit(self.engine.now, "exit", th.name)
        self.sched.exit(th)
        if th.kind not in DAEMON_KINDS:
            self.live -= 1
            if self.live == 0:
                self.engine.stop()

    def join(self, th: Thread, other: Thread) -> Generator:
        """``th`` waits for ``other`` to exit."""
        if other.done:
            return
        other.joiners.append(th)
        yield from self.sched.block(th)

    # ---- primitives ---------------------------------------------------------------------

    def rwlock(self, name: str) -> RwLock:
        return RwLock(self, name)

    def spinlock(self, name: str) -> SpinLock:
        return SpinLock(self, name)

    def workqueue(self, name: str, max_active: int = 256) -> Workqueue:
        return Workqueue(self, name, max_active)

    def mm(self, name: str = "mm") -> Mm:
        return Mm(self, name)

    # ---- reports ------------------------------------------------------------------------

    def listen(self, fn: Callable[[dict], None]) -> None:
        self._listeners.append(fn)

    def report(self, kind: str, th: Thread | None, **details) -> None:
        """A detector fired (watchdog, use after free...): record, trace, tell listeners."""
        eng = self.engine
        rec = {"t": eng.now, "kind": kind, "task": th.name if th is not None else None,
               **details}
        self.reports.append(rec)
        if eng.trace is not None:
            eng.trace.emit(eng.now, kind, rec["task"], **details)
        for fn in self._listeners:
            fn(rec)

    def reports_of(self, kind: str) -> list[dict]:
        return [r for r in self.reports if r["kind"] == kind]

    # ---- running ------------------------------------------------------------------------

    def run(self, until: int | None = None) -> int:
        """Run until every non-daemon thread has exited (or ``until``)."""
        return self.engine.run(until)

    def finish(self) -> None:
        self.sched.finish()
