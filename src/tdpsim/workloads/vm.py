"""A VM on a simulated host, ready to script: the building block of the selftest ports,
the scenario tests and the stateful test.

``VmHarness`` creates the host, one process with a memfd backing region (pre-faulted), the
VM with the TDP MMU, ``nslots`` memslots from GPA 4 GiB all aliasing that region (like
max_guest_memory_test), vCPUs, and the checker and monitors.  Threads are then spawned
with ``spawn_vcpu`` / ``spawn`` and the whole thing run with ``run``.
"""

from __future__ import annotations

from typing import Callable, Generator

from ..check.monitors import Monitors
from ..check.oracles import Checker
from .. import fast as accel
from ..costs import CostModel
from ..host.host import Host, HostConfig
from ..host.mm import PAGE
from ..kvm.vcpu import Vcpu
from ..mmu import spte as S
from ..mmu.policy import Policy, preset
from ..mmu.tdp_iter import for_each_leaf
from ..mmu.x86 import create_vm
from ..sim.strategy import make_strategy
from ..sim.trace import Trace

GPA_4G_GFN = 1 << 20


def run_now(gen: Generator):
    """Run a generator that must not block (setup ioctls); returns its value."""
    try:
        while True:
            v = next(gen)
            if not isinstance(v, int):
                raise RuntimeError(f"setup step blocked ({v!r})")
    except StopIteration as stop:
        return stop.value


class VmHarness:
    def __init__(self, *, ncpus: int = 4, nvcpus: int = 2, pages: int = 512, nslots: int = 1,
                 maxphyaddr: int = 40, granularity: str = "exact", strategy: str = "fifo",
                 seed: int = 0, policy: Policy | str = "5.18", hugetlb: bool = False,
                 costs: dict | CostModel | None = None, tlb_capacity: int | None = None,
                 psc_capacity: int | None = None, second_ns: int = 1_000_000_000,
                 trace: Trace | None = None, host_config: dict | None = None,
                 nx_huge_pages: bool = False, nx_recovery_period_ms: int = 0,
                 huge_pages: int = 512, storage: str = "dense", first_gfn: int = GPA_4G_GFN):
        costs = costs if isinstance(costs, CostModel) else CostModel(costs or {})
        self.host = Host(HostConfig(ncpus=ncpus, second_ns=second_ns, **(host_config or {})),
                         costs, make_strategy(strategy, seed), granularity, trace)
        self.mm = self.host.mm("vmm")
        self.pages = pages
        self.first_gfn = first_gfn
        self.memfd = self.mm.memfd_create(pages, hugetlb=hugetlb, huge_pages=huge_pages)
        self.hva = self.mm.mmap(pages, self.memfd)
        self.mm.prefault(self.hva, pages)
        pol = preset(policy) if isinstance(policy, str) else policy
        self.kvm = create_vm(self.host, self.mm, pol, maxphyaddr=maxphyaddr, storage=storage)
        self.arch = self.kvm.arch
        self.tdp = self.arch.tdp
        if granularity == "fast":          # the one granularity switch
            accel.install(self.kvm)
        if nx_huge_pages:
            self.arch.nx_huge_pages = True
            self.arch.nx_huge_pages_recovery_period_ms = nx_recovery_period_ms
            self.arch.start_nx_recovery()
        self.checker = Checker(self.host, self.kvm)
        self.monitors = Monitors(self.host, self.kvm)
        self.vcpus = [Vcpu(self.kvm, i, tlb_capacity, psc_capacity) for i in range(nvcpus)]
        self.nslots = 0
        for _ in range(nslots):
            self.add_slot()

    # ---- setup -----------------------------------------------------------------------------

    def slot_gfn(self, k: int) -> int:
        """First gfn of memslot k (1-based), slots back to back from ``first_gfn`` (4 GiB
        unless given)."""
        return self.first_gfn + (k - 1) * self.pages

    def add_slot(self, flags: int = 0) -> int:
        k = self.nslots + 1
        run_now(self.kvm.set_user_memory_region(None, k, flags, self.slot_gfn(k) * PAGE,
                                                self.pages * PAGE, self.hva))
        self.nslots = k
        return k

    @property
    def gfn_end(self) -> int:
        return self.slot_gfn(self.nslots + 1)

    # ---- threads -----------------------------------------------------------------------------

    def spawn_vcpu(self, v: Vcpu, script: Callable[..., Generator], *args, cpu=None):
        """Run ``script(th, vcpu, *args)`` in the vCPU's thread."""
        def body(th, *a):
            v.thread = th
            yield from script(th, v, *a)
        return self.host.spawn(body, v.name, *args, cpu=cpu, kind="vcpu")

    def spawn(self, fn: Callable[..., Generator], name: str, *args, cpu=None, kind="kthread"):
        return self.host.spawn(fn, name, *args, cpu=cpu, kind=kind)

    def run(self, until: int | None = None) -> int:
        t = self.host.run(until)
        self.host.finish()
        return t

    # ---- results -------------------------------------------------------------------------------

    @property
    def findings(self):
        return self.checker.findings

    def mapping(self) -> dict:
        """The logical content of every root: {root index: {gfn: (level, leaf spte)}}.

        Page-table PFNs are left out (they depend on the order of allocations)."""
        out = {}
        pt = self.tdp.pt
        for r_i, root in enumerate(self.tdp.roots):
            leaves = {}
            for it in for_each_leaf(pt, root, 0, S.pages_per_hpage(root.level + 1),
                                    report=False):
                leaves[it.gfn] = (it.level, it.old_spte, pt.gen(it.sp, it.index))
            out[(r_i, root.invalid, root.tdp_mmu_root_count)] = leaves
        return out

    def shape(self) -> list:
        """SP headers per root, in tree order, without PFNs."""
        res = []
        for root in self.tdp.roots:
            res.append((root.level, root.gfn, root.invalid, root.lpage_disallowed))
            it = self.tdp.pt.walk(root, 1, 0, report=False)
            while it.valid:
                if it.level > 1 and S.is_shadow_present_pte(it.old_spte) and \
                        not S.is_last_spte(it.old_spte, it.level):
                    child = self.tdp.pt.child(it.old_spte)
                    if child is not None:
                        res.append((child.level, child.gfn, child.invalid,
                                    child.lpage_disallowed))
                it.next()
        return res
