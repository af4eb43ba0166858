"""vCPUs: the run loop (vcpu_enter_guest), requests, guest mode, faults, MMU context reset.

A vCPU runs in its own host thread.  ``run(th, guest)`` is KVM_RUN: it loops

1. process requests (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS / KVM_REQ_MMU_RELOAD, then
   KVM_REQ_TLB_FLUSH), reload the MMU root if it has none (``kvm_mmu_reload``: root load plus
   a local flush), reschedule if need_resched;
2. enter guest mode and perform the guest's next access: TLB hit, or a hardware walk that
   sets A/D and fills the caches;
3. on an EPT violation, exit and handle the fault in two steps, as the kernel does:
   phase 1 snapshots ``mmu_notifier_seq`` and resolves gfn -> hva -> pfn (may sleep);
   phase 2 takes ``mmu_lock`` for read, drops the fault if it is stale (obsolete root or
   ``mmu_notifier_retry_hva``), otherwise maps it (``kvm_tdp_mmu_map``), unlocks and
   re-enters the guest, whose retried access then completes.

An IPI kick (``make_all_cpus_request`` on a vCPU in guest mode) marks it EXITING; it leaves
guest mode at its next step boundary and tells the waiting requester.

As a Resource, a vCPU stands for its requests and mode: fast-mode bulks of its run loop
declare it, and ``make_all_cpus_request`` settles it before reading the mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

import numpy as np

from ..sim.engine import Resource
from .tlb import Tlb, TlbEntry, hw_walk
from .vm import (EXITING_GUEST_MODE, IN_GUEST_MODE, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
                 KVM_REQ_MMU_RELOAD, KVM_REQ_TLB_FLUSH, OUTSIDE_GUEST_MODE, Kvm)

if TYPE_CHECKING:
    from ..host.sched import Thread

#: the per-vCPU statistics 5.17/5.18 KVM has (kvm_vcpu_stats_desc) that the model keeps
VCPU_STATS = ("exits", "pf_fixed", "mmio_exits", "tlb_flush")
#: the model's own per-vCPU counters (KVM's pf_taken / pf_spurious / pf_retry arrived after
#: 5.18; root loads are not counted by KVM)
MODEL_COUNTERS = ("pf_taken", "pf_spurious", "pf_retry", "root_loads")


class Fault:
    """``struct kvm_page_fault`` (the parts the TDP MMU uses)."""
    __slots__ = ("gfn", "write", "exec", "slot", "hva", "pfn", "gen", "mmu_seq", "max_level",
                 "goal_level", "map_writable", "huge_page_disallowed", "req_level")

    def __init__(self, gfn: int, write: bool):
        self.gfn = gfn
        self.write = write
        self.exec = False
        self.slot = None
        self.hva = 0
        self.pfn = -1
        self.gen = 0
        self.mmu_seq = 0
        self.max_level = 3
        self.goal_level = 1
        self.req_level = 1
        self.map_writable = True
        self.huge_page_disallowed = False


class Guest:
    """Guest code: accesses ``(gfn, write)`` or ``(gfn, write, exec)`` run in order, then
    UCALL_DONE."""

    def __init__(self, accesses):
        self.accesses = [a if len(a) == 3 else (a[0], a[1], False) for a in accesses]
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.accesses)

    def current(self) -> tuple[int, bool, bool]:
        return self.accesses[self.pos]

    def advance(self, n: int = 1) -> None:
        """The next ``n`` accesses completed."""
        self.pos += n


class TouchGuest(Guest):
    """The selftest's guest: write the first bytes of every page of [start_gfn, +npages)."""

    def __init__(self, start_gfn: int, npages: int, stride: int = 1, write: bool = True):
        self.start = start_gfn
        self.n = (npages + stride - 1) // stride
        self.stride = stride
        self.write = write
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= self.n

    def current(self) -> tuple[int, bool, bool]:
        return self.start + self.pos * self.stride, self.write, False


class Accesses:
    """Guest accesses that completed, in order: the gfns, the translation each used (pfn
    and host page generation), whether through a TLB entry (``via_tlb``) or a walk, and
    when each happened (``times``) and its translation was filled (``fill_t``: the access
    time for a walk).  ``times`` may be given as a function, called once on first use: a
    bulk's access times cost a pass over its pages that only some observers need.

    ``by_runs`` gives walks in closed form instead: ``runs`` of ``(first gfn, first pfn,
    count, gen)``, consecutive gfns through consecutive pages; the per-access arrays are
    then made only if someone reads them."""

    __slots__ = ("_gfns", "_pfns", "_gens", "runs", "via_tlb", "write", "_times", "_fill_t")

    def __init__(self, gfns, pfns, gens, times, via_tlb: bool, write: bool, fill_t=None):
        self._gfns, self._pfns, self._gens = gfns, pfns, gens
        self.runs = None
        self.via_tlb, self.write = via_tlb, write
        self._times, self._fill_t = times, fill_t

    @classmethod
    def by_runs(cls, runs: list, times, write: bool) -> "Accesses":
        self = cls(None, None, None, times, False, write)
        self.runs = runs
        return self

    def _arrays(self) -> tuple:
        """(gfns, pfns, gens), made from the runs on first use."""
        if self._gfns is None:
            runs = self.runs
            steps = [np.arange(n, dtype=np.int64) for _, _, n, _ in runs]
            self._gfns = np.concatenate([g + j for (g, _, _, _), j in zip(runs, steps)])
            self._pfns = np.concatenate([p + j for (_, p, _, _), j in zip(runs, steps)])
            self._gens = np.concatenate([np.full(n, gen, dtype=np.uint32)
                                         for _, _, n, gen in runs])
        return self._gfns, self._pfns, self._gens

    gfns = property(lambda self: self._arrays()[0])
    pfns = property(lambda self: self._arrays()[1])
    gens = property(lambda self: self._arrays()[2])

    @property
    def times(self):
        if callable(self._times):
            self._times = self._times()
        return self._times

    @property
    def fill_t(self):
        return self.times if self._fill_t is None else self._fill_t


class Vcpu(Resource):
    __slots__ = ("kvm", "id", "name", "thread", "mode", "requests", "root", "tlb",
                 "exit_waiters", "stat", "fault", "cr0_wp")

    def __init__(self, kvm: Kvm, vid: int, tlb_capacity: int | None = 1536,
                 psc_capacity: int | None = 32):
        super().__init__()
        self.kvm = kvm
        self.id = vid
        self.name = f"vcpu{vid}"
        self.thread: Thread | None = None
        self.mode = OUTSIDE_GUEST_MODE
        self.requests: set[str] = set()
        self.root = None          # the loaded root (ShadowPage) or None
        self.tlb = Tlb(tlb_capacity, psc_capacity)
        self.exit_waiters: list = []
        #: KVM's statistics of this vCPU (VCPU_STATS) and the model's own counters
        #: (MODEL_COUNTERS)
        self.stat = dict.fromkeys(VCPU_STATS + MODEL_COUNTERS, 0)
        self.fault: Fault | None = None
        #: CR0.WP is part of the root's role in 5.17/5.18: toggling it needs a new root
        self.cr0_wp = True
        kvm.vcpus.append(self)

    # ---- statistics and observations ------------------------------------------------------

    def account(self, **deltas: int) -> None:
        """Add to the vCPU's statistics: by one from the run loop, by many from a fast-mode
        bulk of it (the only writers of ``stat``)."""
        st = self.stat
        for k, d in deltas.items():
            st[k] += d

    def observe_accesses(self, acc: "Accesses") -> None:
        """Tell the check layer about guest accesses that completed (the run loop: one;
        a fast-mode bulk: many, in order)."""
        kvm = self.kvm
        if kvm.observers:
            kvm.observe("guest_accesses", vcpu=self, acc=acc)

    # ---- guest mode ---------------------------------------------------------------------

    def enter_guest(self) -> None:
        self.mode = IN_GUEST_MODE

    def left_guest(self) -> None:
        """Outside guest mode after an exit that a fast-mode bulk has accounted (and that
        no kick was waiting for: a kick settles the bulk first)."""
        self.mode = OUTSIDE_GUEST_MODE

    def _exit_guest(self) -> None:
        if self.mode != OUTSIDE_GUEST_MODE:
            self.account(exits=1)
        self.mode = OUTSIDE_GUEST_MODE
        if self.exit_waiters:
            eng = self.kvm.engine
            for w in self.exit_waiters:
                w.vcpu_exited(eng)
            self.exit_waiters.clear()

    # ---- vcpu_enter_guest preamble ------------------------------------------------------------

    def prepare(self, th: "Thread") -> Generator:
        """Requests, MMU reload and need_resched before (re-)entering the guest."""
        kvm = self.kvm
        host = kvm.host
        if self.bulks:                  # another task's bulk may owe it a request
            kvm.engine.settle(self)
        if self.mode != OUTSIDE_GUEST_MODE and (self.requests or host.sched.need_resched(th)):
            # a request (IPI) or the tick makes the guest exit first: a vCPU never
            # reschedules or handles requests while it is marked in guest mode
            self._exit_guest()
        if self.requests:
            if KVM_REQ_MMU_FREE_OBSOLETE_ROOTS in self.requests:
                self.requests.discard(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
                yield from kvm.arch.free_obsolete_roots(self, th)
            if KVM_REQ_MMU_RELOAD in self.requests:
                self.requests.discard(KVM_REQ_MMU_RELOAD)
                yield from kvm.arch.mmu_unload(self, th)
            if KVM_REQ_TLB_FLUSH in self.requests:
                self.requests.discard(KVM_REQ_TLB_FLUSH)
                self.tlb.flush(kvm.engine.now)
                self.account(tlb_flush=1)
        if self.root is None:
            yield from kvm.arch.mmu_load(self, th)
        if host.sched.need_resched(th):
            yield from host.sched.cond_resched(th)

    # ---- KVM_RUN ---------------------------------------------------------------------------

    def run(self, th: "Thread", guest: Guest) -> Generator:
        """KVM_RUN until the guest signals done (exact mode, one step per access or phase)."""
        kvm = self.kvm
        costs = kvm.costs
        # fast mode: the accelerator of this loop (tdpsim.fast) runs stretches of it in bulk
        accel = kvm.accel.get("vcpu_run")
        while not guest.done:
            yield from self.prepare(th)
            if self.requests:
                continue                      # a request arrived while preparing
            if accel is not None and self.fault is None:
                n = yield from accel(self, th, guest)
                if n:
                    if self.mode == EXITING_GUEST_MODE:   # kicked during an access step
                        self._exit_guest()
                    continue
            if self.fault is not None:         # phase 2 of a fault whose phase 1 is done
                yield from self._fault_phase2(th, guest)
                continue
            self.enter_guest()
            acc = guest.current()          # (gfn, write) or (gfn, write, exec)
            gfn, write = acc[0], acc[1]
            exe = len(acc) > 2 and acc[2]
            if self._access(gfn, write, exe):
                guest.advance()
                yield costs.guest_access
                if self.mode == EXITING_GUEST_MODE:
                    self._exit_guest()
                continue
            # EPT violation: exit, phase 1 of the fault
            self._exit_guest()
            if kvm.memslots[0].find(gfn) is None:
                # no memslot: an MMIO exit; userspace emulates the access and re-enters
                self.account(mmio_exits=1)
                guest.advance()
                yield costs.fault_4k
                continue
            self.account(pf_taken=1)
            self.fault_phase1(gfn, write, exe)
            if self.fault.slot.invalid:
                # kvm_faultin_pfn: KVM_MEMSLOT_INVALID -> RET_PF_RETRY before mmu_lock
                self.fault = None
                self.account(pf_retry=1)
            yield costs.fault_4k // 4
        self._exit_guest()

    def _access(self, gfn: int, write: bool, exe: bool = False) -> bool:
        """One guest access in guest mode: TLB, else a hardware walk.  False: EPT violation."""
        kvm = self.kvm
        tlb = self.tlb
        e = tlb.lookup(gfn)
        if e is not None and (not write or e.dirty) and (not exe or e.executable):
            tlb.hits += 1
            if kvm.observers:
                now = kvm.engine.now
                self.observe_accesses(Accesses((gfn,), (e.pfn,), (e.gen,), (now,), True,
                                               write, fill_t=(e.fill_t,)))
            return True
        tlb.count_misses(1)
        if self.root is None:
            return False
        r = hw_walk(kvm.arch.pt, self.root, tlb, gfn, write, exe)
        if r.freed_table is not None:
            kvm.host.report("use_after_free", self.thread, pfn=r.freed_table[0],
                            what=f"hardware walk through {r.freed_table[1]}", reused=False,
                            now_owner=None)
            if kvm.observers:
                kvm.observe("walk_freed_table", vcpu=self, gfn=gfn, pfn=r.freed_table[0],
                            t=kvm.engine.now)
            return False
        if not r.ok:
            return False
        now = kvm.engine.now
        tlb.fill(gfn, TlbEntry(r.pfn, r.gen, r.writable, write, now, r.level, r.executable))
        if kvm.observers:
            self.observe_accesses(Accesses((gfn,), (r.pfn,), (r.gen,), (now,), False, write))
        return True

    def fault_phase1(self, gfn: int, write: bool, exe: bool = False) -> None:
        """kvm_tdp_page_fault up to kvm_faultin_pfn: seq snapshot, memslot, pfn (the vCPU
        then stands outside guest mode with ``fault`` pending until phase 2)."""
        kvm = self.kvm
        f = Fault(gfn, write)
        f.exec = exe
        # the NX huge page mitigation: no huge page for an instruction fetch
        f.huge_page_disallowed = exe and kvm.arch.nx_huge_pages
        f.mmu_seq = kvm.mmu_notifier_seq
        slot = kvm.memslots[0].find(gfn)
        f.slot = slot
        f.hva = slot.gfn_to_hva(gfn)
        f.map_writable = not slot.readonly
        if write and slot.readonly:
            raise RuntimeError(f"{self.name}: write to read-only memslot (MMIO exit)")
        f.pfn, f.gen = kvm.mm.fault(f.hva, write)
        f.max_level = slot.max_mapping_level(gfn)
        self.fault = f

    def _fault_phase2(self, th: "Thread", guest: Guest) -> Generator:
        """direct_page_fault from taking mmu_lock: stale check, map, unlock, re-enter."""
        kvm = self.kvm
        f = self.fault
        self.fault = None
        if f.slot.invalid or kvm.memslots[0].find(f.gfn) is not f.slot:
            # the memslot is going away since phase 1 (the kernel's SRCU would hold the
            # deletion off until the fault is done; the model retries instead)
            self.account(pf_retry=1)
            yield kvm.costs.fault_4k - kvm.costs.fault_4k // 4
            return
        yield from kvm.mmu_lock.read_lock(th)
        kvm.host.rcu.read_lock(th)
        extra = 0
        if self.root is None or kvm.arch.is_obsolete_root(self.root) or \
                kvm.mmu_notifier_retry_hva(f.mmu_seq, f.hva):
            ret = "retry"
        else:
            ret, extra = yield from kvm.arch.tdp_map(self, th, f)
        kvm.host.rcu.read_unlock(th)
        kvm.mmu_lock.read_unlock(th)
        self.account(**{"pf_" + ret: 1})
        yield kvm.costs.fault_4k - kvm.costs.fault_4k // 4 + extra

    # ---- ioctls run by the vCPU thread --------------------------------------------------------

    def set_sregs_toggle_cr0_wp(self, th: "Thread") -> Generator:
        """KVM_SET_SREGS changing CR0.WP: kvm_mmu_reset_context -> kvm_mmu_unload.  The
        next entry loads a root for the new role (CR0.WP is in the role)."""
        self.cr0_wp = not self.cr0_wp
        yield from self.kvm.arch.reset_context(self, th)
