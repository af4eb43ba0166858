"""A small end-to-end run of the host layer (``tdpsim demo``) and its building blocks.

The scenario, on a few pCPUs:

* ``loopers`` threads each run a kernel-style loop under an rwlock held for read and an RCU
  read-side section: every iteration updates a shared table (NumPy); before each iteration
  they check ``need_resched() || rwlock_needbreak()`` and, if so, leave RCU, drop the lock,
  ``cond_resched()`` and take both again (the shape of ``tdp_mmu_iter_cond_resched``);
* ``writers`` sleep, take the lock for write, read the table (they see the loopers'
  progress) and change it, then free a page through ``call_rcu`` or ``synchronize_rcu``;
* a ``hog`` wakes up now and then and burns CPU, setting need_resched where it lands;
* a workqueue runs a few items (one queued twice while pending: a no-op);
* a host process with a memfd mapping and an mmu_notifier subscriber (a toy secondary
  MMU) sees munmap, madvise(MADV_DONTNEED), page aging and exit;
* optionally a ``stuck`` thread spins without a scheduling point, for the soft-lockup and
  RCU-stall detectors.

Every loop goes through ``run_loop``, so the same scenario runs in ``exact`` or ``fast``
granularity and must give the same ``summary()``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Generator

import numpy as np

from ..costs import CostModel
from ..host.host import Host, HostConfig
from ..host.mm import PAGE, MmuNotifierOps, NotifierRange
from ..host.workqueue import WorkItem
from ..sim.engine import Resource
from ..sim.loop import run_loop
from ..sim.strategy import Strategy, make_strategy
from ..sim.trace import Trace


@dataclass
class DemoConfig:
    cpus: int = 2
    loopers: int = 3
    iterations: int = 400
    writers: int = 2
    hog: bool = True
    stuck_ns: int = 0          # > 0: a thread spins this long inside an RCU read-side section
    seed: int = 0
    strategy: str = "random"
    granularity: str = "exact"
    second_ns: int = 1_000_000_000  # tests scale it down so thresholds fit small runs
    notifier: bool = True


class Table(Resource):
    """The loopers' shared state: a NumPy array (a Resource: readers settle bulks first)."""

    def __init__(self, n: int):
        super().__init__()
        self.data = np.zeros(n, dtype=np.int64)


class ToyShadow(MmuNotifierOps):
    """A toy secondary MMU: caches hva -> (pfn, gen) and obeys the notifier protocol."""

    def __init__(self, host: Host, mm):
        self.host = host
        self.mm = mm
        self.map: dict[int, tuple[int, int]] = {}
        self.invalidations = 0
        self.in_progress = 0
        self.released = False

    def fault(self, hva: int) -> None:
        if self.in_progress:  # like mmu_notifier_retry: never install during an invalidation
            return
        self.map[hva] = self.mm.fault(hva)

    def access(self, th, hva: int) -> None:
        """Use a cached translation; checks that the page is still the live allocation."""
        ent = self.map.get(hva)
        if ent is not None:
            self.host.memory.check(ent[0], ent[1], th, what="shadow access")

    def invalidate_range_start(self, th, rng: NotifierRange) -> Generator:
        self.in_progress += 1
        self.invalidations += 1
        for hva in [a for a in self.map if rng.start <= a < rng.end]:
            del self.map[hva]
        yield 50

    def invalidate_range_end(self, th, rng: NotifierRange) -> Generator:
        self.in_progress -= 1
        return
        yield

    def change_pte(self, th, address, pfn, gen, writable) -> Generator:
        if address in self.map:
            self.map[address] = (pfn, gen)
        return
        yield

    def clear_flush_young(self, th, start, end) -> Generator:
        return any(start <= a < end for a in self.map)
        yield

    def release(self, th) -> Generator:
        self.released = True
        self.map.clear()
        return
        yield


def build(cfg: DemoConfig, strategy: Strategy | None = None, trace: Trace | None = None,
          costs: CostModel | None = None) -> tuple[Host, dict]:
    """Create the host and threads of the scenario; ``host.run()`` runs it."""
    costs = costs or CostModel({"sched_timeslice": 20_000, "context_switch": 500,
                                "rcu_gp_min": 30_000, "wq_wakeup": 1_000})
    host = Host(HostConfig(ncpus=cfg.cpus, second_ns=cfg.second_ns), costs,
                strategy or make_strategy(cfg.strategy, cfg.seed), cfg.granularity, trace)
    rng = random.Random(cfg.seed)
    lock = host.rwlock("demo_lock")
    table = Table(64)
    sched, rcu, mem = host.sched, host.rcu, host.memory
    out: dict = {"observed": [], "loops": {}, "work": [], "yields": {}, "young": None}

    def looper(th, idx: int, costs_: np.ndarray):
        done = 0
        n = len(costs_)
        yields = 0
        yield from lock.read_lock(th)
        rcu.read_lock(th)
        th.doing = "demo_loop"

        def apply(i, j):
            # iteration k adds k+1 to slot (idx*8 + k % 8)
            ks = np.arange(i, j)
            np.add.at(table.data, idx * 8 + ks % 8, ks + 1)

        def stop():
            return sched.need_resched(th) or lock.needbreak()

        while done < n:
            done += yield from run_loop(
                host.engine, n - done, costs_[done:], lambda i, j, o=done: apply(o + i, o + j),
                stop, lambda: sched.need_resched_at(th.cpu), (th.cpu, lock))
            if done < n:  # stop() was true: the yield of tdp_mmu_iter_cond_resched
                yields += 1
                rcu.read_unlock(th)
                lock.read_unlock(th)
                yield from sched.cond_resched(th)
                yield from lock.read_lock(th)
                rcu.read_lock(th)
        rcu.read_unlock(th)
        lock.read_unlock(th)
        out["loops"][th.name] = host.engine.now
        out["yields"][th.name] = yields

    def writer(th, idx: int, naps: list[int]):
        for nap in naps:
            yield from sched.sleep(th, nap)
            yield from lock.write_lock(th)
            if table.bulks:
                host.engine.settle(table)
            if host.engine.check_settle:
                host.engine.assert_settled(table, None, None, True)
            total = int(table.data.sum())
            out["observed"].append((th.name, host.engine.now, total))
            table.data[idx] += 1000
            yield 300
            lock.write_unlock(th)
            pfn = mem.alloc("demo")
            if idx % 2:
                rcu.call_rcu(lambda p=pfn: mem.free(p))
            else:
                yield from rcu.synchronize_rcu(th)
                mem.free(pfn)

    def hog(th, bursts: list[tuple[int, int]]):
        for nap, burn in bursts:
            yield from sched.sleep(th, nap)
            yield burn

    def stuck(th, ns: int):
        rcu.read_lock(th)
        th.doing = "spinning with RCU held"
        yield ns
        rcu.read_unlock(th)
        rcu.call_rcu(lambda: None)

    wq = host.workqueue("demo_wq")
    items = [WorkItem(_work(out, 2_000 + 500 * i), f"item{i}") for i in range(3)]

    def vmm(th):
        # queue work (one item twice while pending: the second is a no-op)
        out["queue_results"] = [wq.queue_work(items[0]), wq.queue_work(items[0]),
                                wq.queue_work(items[1]), wq.queue_work(items[2])]
        yield from wq.flush(th)
        out["flushed_at"] = host.engine.now
        if cfg.notifier:
            mm = host.mm("demo_mm")
            fd = mm.memfd_create(64)
            hva = mm.mmap(64, fd)
            mm.prefault(hva, 64)
            shadow = ToyShadow(host, mm)
            mm.register_notifier(shadow)
            for i in range(64):
                shadow.fault(hva + i * PAGE)
            anon = mm.mmap(8)
            mm.prefault(anon, 8)
            for i in range(8):
                shadow.fault(anon + i * PAGE)
            out["young"] = yield from mm.age(th, hva, 8, flush=True)
            yield from mm.madvise_dontneed(th, hva, 16)
            yield from mm.ksm_merge(th, anon)
            yield from mm.munmap(th, hva + 32 * PAGE, 16)
            for a in list(shadow.map):
                shadow.access(th, a)
            out["shadow_entries"] = len(shadow.map)
            yield from mm.exit(th)
            out["shadow_released"] = shadow.released
            out["invalidations"] = shadow.invalidations
        yield from wq.destroy(th)

    for i in range(cfg.loopers):
        c = np.array([rng.randint(1, 40) * 25 for _ in range(cfg.iterations)], dtype=np.int64)
        host.spawn(looper, f"looper{i}", i, c)
    for i in range(cfg.writers):
        naps = [rng.randint(1_000, 60_000) for _ in range(3)]
        host.spawn(writer, f"writer{i}", i, naps)
    if cfg.hog:
        bursts = [(rng.randint(1_000, 40_000), rng.randint(5_000, 50_000)) for _ in range(3)]
        host.spawn(hog, "hog", bursts)
    if cfg.stuck_ns:
        host.spawn(stuck, "stuck", cfg.stuck_ns, cpu=cfg.cpus - 1)
    host.spawn(vmm, "vmm")
    out["table"] = table
    return host, out


def _work(out: dict, cost: int):
    def fn(th, item: WorkItem) -> Generator:
        yield cost
        out["work"].append(item.name)
    return fn


def summary(host: Host, out: dict) -> dict:
    """Everything a run produced that must not depend on granularity."""
    mem = host.memory
    lock_stats = {}
    return {
        "end_ns": host.engine.now,
        "table": out["table"].data.tolist(),
        "observed": out["observed"],
        "loops_done_at": out["loops"],
        "yields": out["yields"],
        "work": out["work"],
        "queue_results": out.get("queue_results"),
        "flushed_at": out.get("flushed_at"),
        "young": out.get("young"),
        "shadow_entries": out.get("shadow_entries"),
        "invalidations": out.get("invalidations"),
        "rcu_gps": host.rcu.gp_seq,
        "rcu_callbacks": host.rcu.callbacks_invoked,
        "pages": {"allocated": mem.allocated, "allocs": mem.allocs, "frees": mem.frees},
        "cpu_busy_ns": [c.busy_ns for c in host.sched.cpus],
        "reports": [{k: v for k, v in r.items()} for r in host.reports],
        **lock_stats,
    }


def run(cfg: DemoConfig, trace: Trace | None = None) -> tuple[Host, dict]:
    host, out = build(cfg, trace=trace)
    host.run()
    host.finish()
    return host, summary(host, out)
