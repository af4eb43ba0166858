"""The cost model: one table of named per-operation costs in ns, each with its source.

Defaults come from ../shared/spec/workloads.md section 0 ("Cost anchors") where a number is
published there; the rest are named assumptions.  Override with ``--cost NAME=NS`` or
``CostModel.with_overrides``.  Layers read costs as attributes: ``costs.spte_zap_4k``.
"""

from __future__ import annotations

from dataclasses import dataclass

WORKLOADS = "workloads.md s0"


@dataclass(frozen=True)
class CostDef:
    name: str
    default_ns: int
    source: str
    what: str


_TABLE = [
    # --- host ---
    CostDef("context_switch", 2_000, "assumption (typical Linux switch, 1-3 us)",
            "switching a pCPU from one task to another"),
    CostDef("sched_timeslice", 3_000_000, "assumption (CFS-like slice)",
            "a running task gets need_resched this long after its slice started, if others wait"),
    CostDef("rcu_gp_min", 3_000_000, "assumption (a few jiffies at HZ=1000)",
            "shortest RCU grace period"),
    CostDef("wq_wakeup", 5_000, "assumption", "latency to start an idle kworker"),
    CostDef("host_pte_zap", 20, "assumption", "zap one host PTE in munmap/madvise"),
    CostDef("notifier_call", 200, "assumption", "call one mmu_notifier hook (no work inside)"),
    # --- KVM / TDP MMU (used from the next layers up) ---
    CostDef("spte_zap_4k", 52, f"{WORKLOADS}: teardown times of 4 KiB guests, v4 22-24",
            "zap one present 4 KiB leaf SPTE incl. A/D write-back and share of table free"),
    CostDef("spte_visit", 3, f"{WORKLOADS}: assumption ('a few ns')",
            "visit a non-present SPTE during a walk"),
    CostDef("fault_4k", 1_300, f"{WORKLOADS}: 1.2-1.5 us (fast PF Jun 2021; parallel faults Jan 2021)",
            "first-touch 4 KiB TDP fault under mmu_lock read, pre-faulted host memory"),
    # (the spec also quotes ~31 us per new table: the same measurement, 1.547 s for 96 GiB,
    # divided by tables instead of SPTEs, so only one of the two is charged)
    CostDef("split_spte", 61, f"{WORKLOADS}: eager page splitting v2 (Jan 2022)",
            "eager split: per created SPTE (512 per new table, allocation included)"),
    CostDef("guest_access", 20, "assumption",
            "a guest memory access that hits the TLB or walks present SPTEs"),
    CostDef("sp_alloc", 400, "assumption (allocate and zero a 4 KiB page table)",
            "allocating a shadow page in the fault or split path"),
    CostDef("tlb_flush_request", 100, "assumption", "set KVM_REQ_TLB_FLUSH on one vCPU"),
    CostDef("ipi_round", 2_000, f"{WORKLOADS}: 'a few us with few running vCPUs'",
            "fixed part of an IPI round that waits for vCPUs in guest mode"),
    CostDef("ipi_per_vcpu", 150, f"{WORKLOADS}: 'tens of us on large VMs' (derived)",
            "per vCPU in guest mode in an IPI round"),
    CostDef("root_load", 800, f"{WORKLOADS}: '< 1 us typical' (TDP MMU (un)load, Jan 2024)",
            "vCPU root load, uncontended"),
]

COST_TABLE: dict[str, CostDef] = {c.name: c for c in _TABLE}


class CostModel:
    """Resolved costs, readable as attributes (``costs.fault_4k``)."""

    def __init__(self, overrides: dict[str, int] | None = None):
        for c in _TABLE:
            setattr(self, c.name, c.default_ns)
        self.overrides: dict[str, int] = {}
        for name, ns in (overrides or {}).items():
            self.set(name, ns)

    def set(self, name: str, ns: int) -> None:
        if name not in COST_TABLE:
            raise ValueError(f"unknown cost {name!r}; expected one of "
                             f"{', '.join(sorted(COST_TABLE))}")
        if not isinstance(ns, int) or isinstance(ns, bool) or ns < 1:
            raise ValueError(f"cost {name}: expected an integer number of ns >= 1, got {ns!r}")
        setattr(self, name, ns)
        self.overrides[name] = ns

    def as_dict(self) -> dict[str, int]:
        return {c.name: getattr(self, c.name) for c in _TABLE}


def parse_cost_option(text: str) -> tuple[str, int]:
    """Parse ``NAME=NS`` (NS a positive integer).  Raises ValueError with a one-line reason."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep:
        raise ValueError(f"expected NAME=NS, got {text!r}")
    if name not in COST_TABLE:
        raise ValueError(f"unknown cost {name!r}; expected one of "
                         f"{', '.join(sorted(COST_TABLE))}")
    try:
        ns = int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer number of ns >= 1, got {value!r}") from None
    if ns < 1:
        raise ValueError(f"{name}: expected an integer number of ns >= 1, got {ns}")
    return name, ns
