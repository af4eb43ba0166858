"""Hypothesis stateful test: random host events and vCPU accesses on a small VM, with every
oracle checked all along, for each kernel preset (200 examples each).

vCPU threads and a VMM/host thread each run a mailbox loop; rules queue work for them
(guest accesses, CR0.WP resets, madvise(MADV_DONTNEED), page aging, kvm_zap_gfn_range,
memslot delete and re-create) and then let the simulation run for a while.  After every
step no oracle may have fired; at the end every thread drains, the VM is destroyed and no
page table may be left.
"""

from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tdpsim.host.mm import PAGE
from tdpsim.kvm.vcpu import Guest
from tdpsim.workloads.vm import VmHarness

PAGES = 1024          # two 2 MiB regions per slot
NSLOTS = 2
NVCPUS = 2


class Mailbox:
    def __init__(self, host):
        self.host = host
        self.q: deque = deque()
        self.th = None
        self.closed = False
        self.idle = True

    def put(self, cmd) -> None:
        self.q.append(cmd)
        if self.idle and self.th is not None and self.th.state == "blocked":
            self.idle = False
            self.host.sched.wake(self.th)

    def close(self) -> None:
        self.closed = True
        self.put(None)

    def loop(self, th, handle):
        self.th = th
        while True:
            # busy from here until it blocks below: a put must not wake it while a command
            # blocks it elsewhere (a flush, a lock), which would be a spurious wakeup
            self.idle = False
            while self.q:
                cmd = self.q.popleft()
                if cmd is None:
                    continue
                yield from handle(th, cmd)
            if self.closed:
                return
            self.idle = True
            yield from self.host.sched.block(th)


class VmMachine(RuleBasedStateMachine):
    kernel = "5.18"

    @initialize(seed=st.integers(0, 2**32), ncpus=st.integers(1, 3),
                tlb=st.sampled_from([None, 8]))
    def setup(self, seed, ncpus, tlb):
        self.h = h = VmHarness(ncpus=ncpus, nvcpus=NVCPUS, pages=PAGES, nslots=NSLOTS,
                               strategy="random", seed=seed, tlb_capacity=tlb,
                               policy=self.kernel,
                               psc_capacity=None if tlb is None else 2,
                               costs={"sched_timeslice": 20_000}, second_ns=1_000_000)
        self.present_slots = set(range(1, NSLOTS + 1))
        self.boxes = []
        for v in h.vcpus:
            box = Mailbox(h.host)
            self.boxes.append(box)
            h.spawn_vcpu(v, lambda th, vv, b=box: b.loop(th, self._vcpu_cmd(vv)))
        self.vmm = Mailbox(h.host)
        h.spawn(lambda th: self.vmm.loop(th, self._vmm_cmd), "vmm")

    # ---- command handlers (run in the simulated threads) --------------------------------------

    def _vcpu_cmd(self, v):
        def handle(th, cmd):
            kind, arg = cmd
            if kind == "run":
                accesses = [a for a in arg if self.h.kvm.memslots[0].find(a[0]) is not None]
                yield from v.run(th, Guest(accesses))
            elif kind == "reset":
                yield from v.set_sregs_toggle_cr0_wp(th)
        return handle

    def _vmm_cmd(self, th, cmd):
        h = self.h
        kind, a, b = cmd
        if kind == "dontneed":
            yield from h.mm.madvise_dontneed(th, h.hva + a * PAGE, b)
            h.mm.prefault(h.hva + a * PAGE, b)
        elif kind == "age":
            yield from h.mm.age(th, h.hva + a * PAGE, b, flush=bool(a % 2))
        elif kind == "zap_gfn_range":
            yield from h.arch.kvm_zap_gfn_range(th, h.slot_gfn(1) + a, h.slot_gfn(1) + a + b)
        elif kind == "delete":
            yield from h.kvm.set_user_memory_region(th, a, 0, h.slot_gfn(a) * PAGE, 0, h.hva)
        elif kind == "create":
            yield from h.kvm.set_user_memory_region(th, a, 0, h.slot_gfn(a) * PAGE,
                                                    PAGES * PAGE, h.hva)

    def _advance(self, ns: int) -> None:
        eng = self.h.host.engine
        self.h.host.run(until=eng.now + ns)

    # ---- rules ---------------------------------------------------------------------------------

    @rule(vcpu=st.integers(0, NVCPUS - 1),
          accesses=st.lists(st.tuples(st.integers(0, NSLOTS * PAGES - 1), st.booleans()),
                            min_size=1, max_size=24),
          ns=st.integers(1_000, 200_000))
    def guest_accesses(self, vcpu, accesses, ns):
        base = self.h.slot_gfn(1)
        self.boxes[vcpu].put(("run", [(base + g, w) for g, w in accesses]))
        self._advance(ns)

    @rule(vcpu=st.integers(0, NVCPUS - 1), ns=st.integers(1_000, 100_000))
    def cr0_wp_reset(self, vcpu, ns):
        self.boxes[vcpu].put(("reset", None))
        self._advance(ns)

    @rule(page=st.integers(0, PAGES - 1), n=st.integers(1, 64), ns=st.integers(1_000, 100_000))
    def madvise_dontneed(self, page, n, ns):
        self.vmm.put(("dontneed", page, min(n, PAGES - page)))
        self._advance(ns)

    @rule(page=st.integers(0, PAGES - 1), n=st.integers(1, 16), ns=st.integers(1_000, 100_000))
    def page_aging(self, page, n, ns):
        self.vmm.put(("age", page, min(n, PAGES - page)))
        self._advance(ns)

    @rule(start=st.integers(0, NSLOTS * PAGES - 1), n=st.integers(1, 600),
          ns=st.integers(1_000, 100_000))
    def zap_gfn_range(self, start, n, ns):
        self.vmm.put(("zap_gfn_range", start, n))
        self._advance(ns)

    @precondition(lambda self: len(self.present_slots) > 1)
    @rule(data=st.data(), ns=st.integers(1_000, 300_000))
    def delete_memslot(self, data, ns):
        slot = data.draw(st.sampled_from(sorted(self.present_slots)))
        self.present_slots.discard(slot)
        self.vmm.put(("delete", slot, None))
        self._advance(ns)

    @precondition(lambda self: len(self.present_slots) < NSLOTS)
    @rule(data=st.data(), ns=st.integers(1_000, 100_000))
    def recreate_memslot(self, data, ns):
        missing = sorted(set(range(1, NSLOTS + 1)) - self.present_slots)
        slot = data.draw(st.sampled_from(missing))
        self.present_slots.add(slot)
        self.vmm.put(("create", slot, None))
        self._advance(ns)

    @rule(ns=st.integers(1_000, 2_000_000))
    def let_time_pass(self, ns):
        self._advance(ns)

    @invariant()
    def no_oracle_fired(self):
        if hasattr(self, "h"):
            assert self.h.findings == [], [str(f) for f in self.h.findings]

    def teardown(self):
        if not hasattr(self, "h"):
            return
        h = self.h
        for box in self.boxes + [self.vmm]:
            box.close()
        h.host.run()

        def destroy(th):
            yield from h.mm.exit(th)
            yield from h.arch.destroy(th)

        h.spawn(destroy, "teardown")
        h.host.run()
        assert h.findings == [], [str(f) for f in h.findings]
        assert h.tdp.pt.live == 0 and not h.tdp.roots


class VmMachine517(VmMachine):
    kernel = "5.17"


_settings = settings(max_examples=200, stateful_step_count=12, deadline=None)
VmMachine.TestCase.settings = _settings
VmMachine517.TestCase.settings = _settings
TestVmMachine518 = VmMachine.TestCase
TestVmMachine517 = VmMachine517.TestCase
