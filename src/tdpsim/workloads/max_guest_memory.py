"""``max_guest_memory_test`` (tools/testing/selftests/kvm), ported to the simulated host.

The selftest the series added (workloads.md s2.1), phase by phase:

1. one memfd of ``-s`` GiB (hugetlb with ``-H``), mapped shared, MADV_NOHUGEPAGE and
   pre-faulted on the host;
2. memslots 1, 2, ... of ``-s`` GiB each, back to back from GPA 4 GiB, every one aliasing
   the memfd, until ``-m``, the guest's MAXPHYADDR or KVM's memslot limit;
3. the GPA range is split evenly across the vCPUs (rounded down to 4 KiB); each vCPU thread
   writes the first bytes of every 4 KiB page of its chunk (run 1), toggles CR0.WP through
   KVM_SET_SREGS (an MMU context reset: every vCPU puts its root), writes again (run 2);
   vCPUs and the main thread rendezvous between phases through one atomic counter, which
   the main thread polls every 100 us, taking a timestamp when all vCPUs have arrived;
4. the even memslots are deleted, highest first; the first half of the backing is
   unmapped; the vCPU threads are joined and the process exits without closing anything,
   so the last zap comes from the mmu_notifier ``release`` hook, then VM destruction.

Deliberate differences (docs/design-notes.md, "max-guest-memory"):

* the vCPU threads spin in user space at a rendezvous; here they sleep until released.
  A spinning user thread gives its CPU to any kernel thread that becomes runnable on it
  at the next tick, so the difference is at most a tick per wakeup, and leaving the CPUs
  free keeps the scheduler's work proportional to what happens rather than to time;
* the main thread's ``usleep(100)`` polling is not simulated poll by poll: it sleeps
  until all vCPUs have arrived, then until the next point of its 100 us grid, which is
  when the polling loop would have seen the counter;
* guest page tables (1 GiB identity mappings) and slot 0 are not modelled: the guest's
  accesses are the writes to its chunk.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

from ..costs import CostModel
from ..kvm.memslot import KVM_MEM_MAX_NR_PAGES, KVM_USER_MEM_SLOTS
from ..kvm.vcpu import TouchGuest
from ..mmu.policy import Policy, label, preset
from .. import measure
from .vm import GPA_4G_GFN, VmHarness

GIB_PAGES = 1 << 18                 # 4 KiB pages per GiB
FIRST_SLOT = 1
POLL_NS = 100_000                   # the main thread's usleep(100)
KVM_MAX_VCPUS = 1024                # x86, 5.17/5.18
#: the largest memslot KVM takes (KVM_MEM_MAX_NR_PAGES, 2^31 - 1 pages): the backing
#: region's host state is kept by runs (sim/runs.py), so the host holds any size up to it
MAX_SLOT_GIB = KVM_MEM_MAX_NR_PAGES // GIB_PAGES
MAX_MEM_GIB = 1 << 22               # 4 PiB, the architectural GPA limit (MAXPHYADDR 52)

SCHEMA = "tdpsim.max-guest-memory/1"
PHASES = ("spawning", "run 1", "reset", "run 2", "delete slots", "munmap", "exit")


@dataclass(frozen=True)
class MgmConfig:
    """The selftest's options (``-c``, ``-m``, ``-s``, ``-H``) and the simulated host's."""

    vcpus: int | None = None        # -c; None: 3/4 of the host CPUs
    max_mem_gib: int = 128          # -m
    slot_gib: int = 2               # -s
    hugetlb: bool = False           # -H
    maxphyaddr: int = 46
    host_cpus: int = 16
    seed: int = 0
    strategy: str = "fifo"
    granularity: str = "fast"
    #: page-table layout (mmu/store.py): "compressed" or "dense" (the reference layout)
    storage: str = "compressed"
    costs: tuple = ()               # ((name, ns), ...) overrides
    #: the host kernel's settings (HostConfig's fields of the same names)
    preempt: str = "dynamic"
    watchdog_thresh_s: int = 10
    rcu_stall_timeout_s: int = 21
    hz: int = 1000
    #: watchdog thresholds scale with this many ns per "second" (tests lower it)
    second_ns: int = 1_000_000_000
    tlb_capacity: int | None = 1536
    psc_capacity: int | None = 32

    def host_settings(self) -> dict:
        """The HostConfig fields this configuration sets (as the JSON's config shows them)."""
        return {"preempt": self.preempt, "watchdog_thresh_s": self.watchdog_thresh_s,
                "rcu_stall_timeout_s": self.rcu_stall_timeout_s, "hz": self.hz}

    @property
    def nr_vcpus(self) -> int:
        """calc_default_nr_vcpus: 3/4 of the CPUs the process may run on."""
        return self.vcpus if self.vcpus is not None else self.host_cpus * 3 // 4


@dataclass(frozen=True)
class Layout:
    """What the selftest's setup loop produces."""

    nslots: int                     # memslots created (1 .. nslots)
    end_gfn: int                    # end of the range the vCPUs write ("gpa" in the test)
    chunk_pages: int                # 4 KiB pages per vCPU
    guest_gib: int                  # "Running with %lugb of guest memory"


def _bad(option: str, msg: str) -> ValueError:
    return ValueError(f"{option}: {msg}")


def layout(cfg: MgmConfig) -> Layout:
    """The setup checks and the memslot loop of the selftest's main().

    Raises ValueError naming the option for every configuration the selftest (or KVM, or
    this simulator) rejects."""
    if not 36 <= cfg.maxphyaddr <= 52:
        raise _bad("--maxphyaddr", f"expected 36..52, got {cfg.maxphyaddr}")
    if not 1 <= cfg.host_cpus <= 8192:
        raise _bad("--host-cpus", f"expected 1..8192, got {cfg.host_cpus}")
    nvcpus = cfg.nr_vcpus
    if cfg.vcpus is None and nvcpus < 1:
        # calc_default_nr_vcpus: TEST_ASSERT(nr_vcpus > 0, "Uh, no CPUs?")
        raise _bad("--host-cpus", f"expected at least 2 (the default -c is 3/4 of it), "
                                  f"got {cfg.host_cpus}; or give -c")
    if not 1 <= nvcpus <= KVM_MAX_VCPUS:
        raise _bad("-c/--vcpus", f"expected 1..{KVM_MAX_VCPUS}, got {nvcpus}")
    # the guest physical address space: 2^MAXPHYADDR bytes
    gpa_gib = 1 << (cfg.maxphyaddr - 30)
    if not 1 <= cfg.max_mem_gib <= gpa_gib:
        raise _bad("-m/--max-mem", f"expected 1..{gpa_gib} GiB with --maxphyaddr "
                                   f"{cfg.maxphyaddr}, got {cfg.max_mem_gib}")
    if not 1 <= cfg.slot_gib <= MAX_SLOT_GIB:
        raise _bad("-s/--slot-size", f"expected 1..{MAX_SLOT_GIB} GiB (KVM's largest "
                                     f"memslot), got {cfg.slot_gib}")
    if cfg.slot_gib > cfg.max_mem_gib:
        raise _bad("-m/--max-mem", f"expected at least one memslot, -s/--slot-size "
                                   f"({cfg.slot_gib} GiB), got {cfg.max_mem_gib} GiB")
    slot_pages = cfg.slot_gib * GIB_PAGES
    # vm->max_gfn is the last guest frame: max_gpa is one page short of 2^MAXPHYADDR
    max_gpa_pages = (1 << (cfg.maxphyaddr - 12)) - 1
    if not max_gpa_pages > 4 * slot_pages:
        raise _bad("-s/--slot-size", f"expected below {max_gpa_pages // (4 * GIB_PAGES) + 1}"
                   f" GiB with --maxphyaddr {cfg.maxphyaddr} (the selftest needs MAXPHYADDR "
                   f"above 4 slots), got {cfg.slot_gib}")
    max_mem_pages = cfg.max_mem_gib * GIB_PAGES
    # for (slot = 1; slot < max_slots; slot++): stop at MAXPHYADDR or -m
    by_gpa = (max_gpa_pages - GPA_4G_GFN) // slot_pages       # slots that fit below max_gpa
    by_mem = -(-max_mem_pages // slot_pages)                   # (gpa - start) < max_mem
    by_cap = KVM_USER_MEM_SLOTS - FIRST_SLOT                   # slots 1 .. max_slots - 1
    nslots = min(by_gpa, by_mem, by_cap)
    # (nslots >= 1: max_gpa > 4 slots and max_gpa >= 64 GiB leave room for one above 4 GiB)
    # The loop leaves "gpa" at the first slot it did not create, except when it ran out of
    # slot numbers without breaking: then at the last slot created, which the vCPUs
    # therefore never touch (a quirk of the selftest, kept).
    used = nslots - 1 if by_gpa >= by_cap and by_mem >= by_cap else nslots
    end_gfn = GPA_4G_GFN + used * slot_pages
    # The selftest's "at least one page per vCPU" assert cannot fire here: a slot is at
    # least 1 GiB (262144 pages) and -c at most KVM_MAX_VCPUS, which is what catches
    # "more vCPUs than pages".
    chunk = (end_gfn - GPA_4G_GFN) // nvcpus
    return Layout(nslots, end_gfn, chunk, (end_gfn - GPA_4G_GFN) // GIB_PAGES)


class Rendezvous:
    """The selftest's atomic counter between the main thread ("boss") and the vCPUs."""

    def __init__(self, host, nvcpus: int):
        self.host = host
        self.n = nvcpus
        self.parked: list = []
        self.boss = None

    def vcpu_arrive(self, th):
        """rendezvous_with_boss: arrive, then wait to be released."""
        self.parked.append(th)
        if len(self.parked) == self.n and self.boss is not None:
            boss, self.boss = self.boss, None
            self.host.sched.wake(boss)
        yield from self.host.sched.block(th)

    def boss_wait(self, th):
        """rendezvous_with_vcpus: poll every 100 us until every vCPU has arrived, take the
        time, release them.  Returns the timestamp."""
        eng = self.host.engine
        t0 = eng.now
        if len(self.parked) < self.n:
            self.boss = th
            yield from self.host.sched.block(th)
            polls = -(-(eng.now - t0) // POLL_NS)
            if t0 + polls * POLL_NS > eng.now:
                yield from self.host.sched.sleep(th, t0 + polls * POLL_NS - eng.now)
        ts = eng.now
        parked, self.parked = self.parked, []
        for v in parked:
            self.host.sched.wake(v)
        return ts


@dataclass
class Progress:
    """What the run has reached, for a progress display (read between engine slices)."""

    phase: str = "setup"
    done: int = 0
    total: int = 0


def run(cfg: MgmConfig, policy: Policy | str = "5.18", trace=None,
        on_slice: Callable[["Progress", int], None] | None = None,
        slice_ns: int = 50_000_000) -> dict:
    """Run the selftest on the simulated host; returns the plain-data result.

    ``on_slice(progress, now_ns)`` (optional) is called between slices of ``slice_ns``
    simulated ns; slicing does not change the run (the engine resumes where it stopped)."""
    lay = layout(cfg)
    measure.reset_peak()
    wall0 = time.perf_counter()
    pol = preset(policy) if isinstance(policy, str) else policy
    nvcpus = cfg.nr_vcpus
    slot_pages = cfg.slot_gib * GIB_PAGES
    h = VmHarness(ncpus=cfg.host_cpus, nvcpus=nvcpus, pages=slot_pages, nslots=0,
                  maxphyaddr=cfg.maxphyaddr, granularity=cfg.granularity,
                  strategy=cfg.strategy, seed=cfg.seed, policy=pol, hugetlb=cfg.hugetlb,
                  costs=CostModel(dict(cfg.costs)), tlb_capacity=cfg.tlb_capacity,
                  psc_capacity=cfg.psc_capacity, second_ns=cfg.second_ns, trace=trace,
                  storage=cfg.storage, host_config=cfg.host_settings())
    for _ in range(lay.nslots):
        h.add_slot()
    host, eng = h.host, h.host.engine
    rv = Rendezvous(host, nvcpus)
    prog = Progress(total=lay.end_gfn - GPA_4G_GFN)
    guests: list[TouchGuest] = []
    stamps: dict[str, int] = {}

    def vcpu_worker(th, v, start):
        g = TouchGuest(start, lay.chunk_pages)
        guests.append(g)
        yield from rv.vcpu_arrive(th)                 # spawned
        yield from v.run(th, g)                       # run 1
        yield from rv.vcpu_arrive(th)
        yield from v.set_sregs_toggle_cr0_wp(th)      # reset
        yield from rv.vcpu_arrive(th)
        g.pos = 0
        yield from v.run(th, g)                       # run 2
        yield from rv.vcpu_arrive(th)

    def boss(th):
        threads = [h.spawn_vcpu(v, vcpu_worker, GPA_4G_GFN + i * lay.chunk_pages)
                   for i, v in enumerate(h.vcpus)]
        for name in PHASES[:4]:
            prog.phase, prog.done = name, 0
            stamps[name] = yield from rv.boss_wait(th)
        prog.phase = "delete slots"
        even = range(lay.nslots & ~1, FIRST_SLOT - 1, -2)     # highest first
        prog.total = len(even)
        for k, slot in enumerate(even):
            prog.done = k
            yield from h.kvm.set_user_memory_region(th, slot, 0, 0, 0, 0)
        stamps["delete slots"] = eng.now
        prog.phase = "munmap"
        yield from h.mm.munmap(th, h.hva, slot_pages // 2)
        stamps["munmap"] = eng.now
        for t in threads:
            yield from host.join(th, t)
        prog.phase = "exit"
        yield from h.mm.exit(th)                      # mmu_notifier release
        yield from h.arch.destroy(th)                 # the last fd closed: kvm_destroy_vm
        stamps["exit"] = eng.now

    h.spawn(boss, "max_guest_memory")
    if on_slice is None:
        host.run()
    else:
        while True:
            t = eng.now
            host.run(t + slice_ns)
            if prog.phase in ("run 1", "run 2"):
                prog.done = sum(g.pos for g in guests)
            on_slice(prog, eng.now)
            if eng.stopped or eng.idle:
                break
    host.finish()
    wall = time.perf_counter() - wall0
    return _result(cfg, lay, pol, h, stamps, wall)


def _result(cfg, lay, pol, h, stamps, wall) -> dict:
    kernel = label(pol)
    tdp = h.tdp
    ops = tdp.leaves_installed + tdp.leaves_zapped
    sel = {
        "run1_ns": stamps["run 1"] - stamps["spawning"],
        "reset_ns": stamps["reset"] - stamps["run 1"],
        "run2_ns": stamps["run 2"] - stamps["reset"],
        "delete_slots_ns": stamps["delete slots"] - stamps["run 2"],
        "munmap_ns": stamps["munmap"] - stamps["delete slots"],
        "exit_ns": stamps["exit"] - stamps["munmap"],
    }
    return {
        "schema": SCHEMA,
        "kernel": kernel,
        "knobs": asdict(pol),
        "config": {"vcpus": cfg.nr_vcpus, "max_mem_gib": cfg.max_mem_gib,
                   "slot_gib": cfg.slot_gib, "hugetlb": cfg.hugetlb,
                   "maxphyaddr": cfg.maxphyaddr, "host_cpus": cfg.host_cpus,
                   "seed": cfg.seed, "strategy": cfg.strategy,
                   "granularity": cfg.granularity, "storage": cfg.storage,
                   "costs": dict(cfg.costs), "host": cfg.host_settings()},
        "layout": {"slots": lay.nslots, "guest_gib": lay.guest_gib,
                   "chunk_pages": lay.chunk_pages, "root_level": tdp.root_level},
        "selftest": sel,
        "sim_end_ns": h.host.engine.now,
        "symptoms": h.monitors.summary(),
        "findings": [f.as_dict() | {"excerpt": f.excerpt[-5:]} for f in h.findings],
        "verdict": h.checker.verdict(),
        "work": {"leaves_installed": tdp.leaves_installed,
                 "leaves_zapped": tdp.leaves_zapped, "events": h.host.engine.events,
                 "bulks": h.host.engine.bulks_started},
        "wall": {"seconds": round(wall, 3), "peak_rss_mib": round(measure.peak_mib(), 1),
                 "spte_ops_per_s": round(ops / wall) if wall else 0},
    }
