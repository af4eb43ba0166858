"""Spinning locks: a spinlock and an rwlock with the kernel's queued-rwlock behaviour.

Waiters spin: they keep their pCPU (no scheduling point, so spinning counts towards a soft
lockup) and are granted in FIFO order.  qrwlock rules modelled (kernel/locking/qrwlock.c):

* a reader gets in at once only if no writer holds the lock and nobody is queued (a queued
  writer sets _QW_WAITING, which sends new readers to the slow path);
* otherwise readers and writers queue on the FIFO wait_lock; the head writer waits for the
  readers to drain, the head reader waits for the writer to leave, and readers queued one
  behind another enter together;
* ``is_contended()`` (``rwlock_is_contended``) is true while anybody is queued;
  ``needbreak()`` (``rwlock_needbreak``) is that only on CONFIG_PREEMPTION kernels.

On kernels without CONFIG_PREEMPT_RCU (``--preempt none|voluntary``), RCU is RCU-sched:
spinning on or holding a lock disables preemption, which holds up grace periods like an
RCU read-side section.  Both locks then enter an implicit read-side section when a task
starts taking them and leave it when it releases them (``Rcu.read_lock`` nests), so RCU
stall holdouts include CPUs spinning on mmu_lock.

As a Resource, a lock stands for its contention and its writer: bulk loops that test
``needbreak``, or take the lock for read in each iteration, declare it; enqueueing a waiter
and taking it for write settle them first.  Hold and wait times are recorded for the
monitors.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Generator

from ..sim.engine import PARK, Resource

if TYPE_CHECKING:
    from .host import Host
    from .sched import Thread

READ, WRITE = "read", "write"


class LockStats:
    __slots__ = ("acquires", "contended", "max_hold", "max_wait", "hold_total", "waits")

    def __init__(self) -> None:
        self.acquires = 0
        self.contended = 0
        self.max_hold = 0
        self.max_wait = 0
        self.hold_total = 0
        self.waits: list[int] = []

    def as_dict(self) -> dict:
        return {"acquires": self.acquires, "contended": self.contended,
                "max_hold_ns": self.max_hold, "max_wait_ns": self.max_wait,
                "hold_total_ns": self.hold_total}


class SpinLock(Resource):
    """``spin_lock``/``spin_unlock`` with a FIFO (ticket/queued) waiter order."""

    __slots__ = ("host", "name", "holder", "queue", "since", "stats", "_wait_start",
                 "implicit_rcu")

    def __init__(self, host: "Host", name: str):
        super().__init__()
        self.host = host
        self.name = name
        self.holder: Thread | None = None
        self.queue: deque[Thread] = deque()
        self.since = 0
        self.stats = LockStats()
        self._wait_start: dict[int, int] = {}
        #: spinning and holding are RCU-sched read-side sections (no CONFIG_PREEMPT_RCU)
        self.implicit_rcu = not host.config.preemption_enabled

    def acquire(self, th: "Thread") -> Generator:
        eng = self.host.engine
        if self.implicit_rcu:
            self.host.rcu.read_lock(th)
        if self.holder is None:
            self.holder = th
            self.since = eng.now
            self.stats.acquires += 1
            return
        if self.bulks:
            eng.settle(self)
        if eng.check_settle:
            eng.assert_settled(self, None, None, False)
        self.stats.contended += 1
        self._wait_start[th.id] = eng.now
        self.queue.append(th)
        doing, th.doing = th.doing, f"spinning on {self.name}"
        yield PARK
        th.doing = doing

    def release(self, th: "Thread") -> None:
        assert self.holder is th, f"{th.name} releases {self.name} held by {self.holder}"
        eng = self.host.engine
        held = eng.now - self.since
        st = self.stats
        st.hold_total += held
        st.max_hold = max(st.max_hold, held)
        self.holder = None
        if self.implicit_rcu:
            self.host.rcu.read_unlock(th)
        if self.queue:
            nxt = self.queue.popleft()
            wait = eng.now - self._wait_start.pop(nxt.id)
            st.max_wait = max(st.max_wait, wait)
            st.waits.append(wait)
            self.holder = nxt
            self.since = eng.now
            st.acquires += 1
            eng.wake(nxt)

    def is_contended(self) -> bool:
        return bool(self.queue)


class RwLock(Resource):
    """The x86 ``rwlock_t`` (queued rwlock) used for ``kvm->mmu_lock``."""

    __slots__ = ("host", "name", "readers", "writer", "queue", "preemption", "stats_read",
                 "stats_write", "_since", "_wait_start", "on_wait")

    def __init__(self, host: "Host", name: str):
        super().__init__()
        self.host = host
        self.name = name
        self.readers: dict[int, "Thread"] = {}
        self.writer: Thread | None = None
        self.queue: deque[tuple["Thread", str]] = deque()
        self.preemption = host.config.preemption_enabled
        self.stats_read = LockStats()
        self.stats_write = LockStats()
        self._since: dict[int, int] = {}
        self._wait_start: dict[int, int] = {}
        #: optional hook(th, mode, wait_ns) called when a waiter is granted (for monitors)
        self.on_wait = None

    # ---- acquire / release --------------------------------------------------------------

    def read_lock(self, th: "Thread") -> Generator:
        if not self.preemption:             # preemption off: an RCU-sched section
            self.host.rcu.read_lock(th)
        if self.writer is None and not self.queue:
            self._grant(th, READ)
            return
        yield from self._wait(th, READ)

    def write_lock(self, th: "Thread") -> Generator:
        eng = self.host.engine
        if self.bulks:   # a writer changes what bulks taking the lock for read would see
            eng.settle(self)
        if eng.check_settle:
            eng.assert_settled(self, None, None, False)
        if not self.preemption:             # preemption off: an RCU-sched section
            self.host.rcu.read_lock(th)
        if self.writer is None and not self.readers and not self.queue:
            self._grant(th, WRITE)
            return
        yield from self._wait(th, WRITE)

    def read_unlock(self, th: "Thread") -> None:
        self._account(th, self.stats_read)
        del self.readers[th.id]
        if not self.preemption:
            self.host.rcu.read_unlock(th)
        if not self.readers:
            self._advance()

    def write_unlock(self, th: "Thread") -> None:
        assert self.writer is th, f"{th.name} write-unlocks {self.name} held by {self.writer}"
        self._account(th, self.stats_write)
        self.writer = None
        if not self.preemption:
            self.host.rcu.read_unlock(th)
        self._advance()

    def unlock(self, th: "Thread", mode: str) -> None:
        if mode == READ:
            self.read_unlock(th)
        else:
            self.write_unlock(th)

    def lock(self, th: "Thread", mode: str) -> Generator:
        if mode == READ:
            return self.read_lock(th)
        return self.write_lock(th)

    # ---- state queries ------------------------------------------------------------------

    def is_contended(self) -> bool:
        """``rwlock_is_contended``: somebody is queued on the wait_lock."""
        return bool(self.queue)

    def needbreak(self) -> bool:
        """``rwlock_needbreak``: contention, but only on CONFIG_PREEMPTION kernels."""
        return self.preemption and bool(self.queue)

    def account_uncontended_reads(self, n: int) -> None:
        """Statistics of ``n`` read_lock / read_unlock pairs that found the lock free and
        held it for no simulated time (a fault's phase 2 run in bulk): what ``_grant`` and
        ``_account`` record for each."""
        self.stats_read.acquires += n

    def held_by(self, th: "Thread") -> str | None:
        if self.writer is th:
            return WRITE
        if th.id in self.readers:
            return READ
        return None

    # ---- internals ----------------------------------------------------------------------

    def _wait(self, th: "Thread", mode: str) -> Generator:
        eng = self.host.engine
        if self.bulks:
            eng.settle(self)
        if eng.check_settle:
            eng.assert_settled(self, None, None, False)
        (self.stats_read if mode == READ else self.stats_write).contended += 1
        self._wait_start[th.id] = eng.now
        self.queue.append((th, mode))
        if eng.trace is not None:
            eng.trace.emit(eng.now, "lock_wait", th.name, lock=self.name, mode=mode,
                           queued=len(self.queue))
        doing, th.doing = th.doing, f"spinning on {self.name} ({mode})"
        yield PARK
        th.doing = doing

    def _grant(self, th: "Thread", mode: str) -> None:
        now = self.host.engine.now
        if mode == READ:
            self.readers[th.id] = th
            self.stats_read.acquires += 1
        else:
            self.writer = th
            self.stats_write.acquires += 1
        self._since[th.id] = now

    def _account(self, th: "Thread", st: LockStats) -> None:
        held = self.host.engine.now - self._since.pop(th.id)
        st.hold_total += held
        if held > st.max_hold:
            st.max_hold = held

    def _advance(self) -> None:
        """Let the head of the queue in: one writer, or a run of consecutive readers."""
        eng = self.host.engine
        q = self.queue
        while q:
            th, mode = q[0]
            if mode == WRITE:
                if self.writer is None and not self.readers:
                    q.popleft()
                    self._granted_waiter(th, WRITE, eng)
                return
            if self.writer is not None:
                return
            q.popleft()
            self._granted_waiter(th, READ, eng)

    def _granted_waiter(self, th: "Thread", mode: str, eng) -> None:
        wait = eng.now - self._wait_start.pop(th.id)
        st = self.stats_read if mode == READ else self.stats_write
        st.waits.append(wait)
        if wait > st.max_wait:
            st.max_wait = wait
        if self.on_wait is not None:
            self.on_wait(th, mode, wait)
        if eng.trace is not None:
            eng.trace.emit(eng.now, "lock_granted", th.name, lock=self.name, mode=mode,
                           wait_ns=wait)
        self._grant(th, mode)
        eng.wake(th)
