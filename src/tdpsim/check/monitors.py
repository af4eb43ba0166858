"""Latency monitors: soft lockups, RCU stalls, vCPU blocked time, mmu_lock hold and wait,
remote flushes, flush requests, IPIs, page-table memory, zap work.

``Monitors`` attaches to a host and a VM and produces a plain-data ``summary()``.

vCPU blocked time is a distribution over *episodes* in which a vCPU thread could not run
its guest: waiting for mmu_lock (``mmu_lock wait``), putting its root (``root put``: with
5.17 this includes the whole teardown), loading a root (``root load``, includes the lock
wait), and waiting for other vCPUs in a remote flush.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..kvm.vcpu import MODEL_COUNTERS, VCPU_STATS

if TYPE_CHECKING:
    from ..host.host import Host
    from ..kvm.vm import Kvm


def _percentile(values: np.ndarray, q: float) -> int:
    """The q-th percentile as one of the observed values (nearest rank: the smallest value
    with at least q % of the values at or below it), 0 for none."""
    if not len(values):
        return 0
    return int(np.percentile(values, q, method="inverted_cdf"))


def _vcpu_stats(kvm: "Kvm", names: tuple) -> dict:
    """Per-vCPU counters: their totals over the VM, and each vCPU's."""
    return {"total": {k: sum(v.stat[k] for v in kvm.vcpus) for k in names},
            "per_vcpu": {v.name: {k: v.stat[k] for k in names} for v in kvm.vcpus}}


class Monitors:
    def __init__(self, host: "Host", kvm: "Kvm"):
        self.host = host
        self.kvm = kvm
        #: (duration ns, vcpu name, reason, start time)
        self.blocked: list[tuple[int, str, str, int]] = []
        kvm.observers.append(self._on_observe)
        prev = kvm.mmu_lock.on_wait

        def on_wait(th, mode, wait):
            if th.kind == "vcpu" and wait:
                self.blocked.append((wait, th.name, f"mmu_lock wait ({mode})",
                                     host.engine.now - wait))
            if prev is not None:
                prev(th, mode, wait)

        kvm.mmu_lock.on_wait = on_wait

    def _on_observe(self, kind: str, **f) -> None:
        if kind == "root_put":
            d = f["t"] - f["t0"]
            if d:
                self.blocked.append((d, f["vcpu"].name, "root put", f["t0"]))

    # ---- summary ---------------------------------------------------------------------------

    def summary(self) -> dict:
        host, kvm = self.host, self.kvm
        sched = host.sched
        eps = list(sched.lockup_episodes)
        for c in sched.cpus:   # still stuck at the end of the run
            if c.lockup_touch == c.touch and c.lockup_touch >= 0:
                th = c.curr
                eps.append({"cpu": c.id, "task": th.name if th else None, "start": c.touch,
                            "stuck_ns": host.engine.now - c.touch,
                            "doing": th.doing if th else ""})
        reported = host.reports_of("soft_lockup")
        longest = max(eps, key=lambda e: e["stuck_ns"]) if eps else None
        rcu = host.rcu
        stalls = rcu.stalls
        lstall = max(stalls, key=lambda s: s["inside_ns"]) if stalls else None
        geps = list(rcu.stall_episodes) + [e for e in (rcu.open_stall(),) if e]
        blocked = sorted(self.blocked)
        durs = np.array([b[0] for b in blocked], dtype=np.int64)
        lock = kvm.mmu_lock
        tdp = kvm.arch.tdp
        out = {
            "soft_lockups": {
                # reports as the kernel prints them (re-reported while stuck), episodes
                "count": len(reported),
                "episodes": len(eps),
                "longest_ns": longest["stuck_ns"] if longest else 0,
                "cpu": longest["cpu"] if longest else None,
                "task": longest["task"] if longest else None,
                "doing": longest["doing"] if longest else None,
            },
            "rcu_stalls": {
                # stall warnings (one per tick that reports), GPs reported stalled
                "count": len({(s["gp"], s["t"]) for s in stalls}),
                "episodes": len(geps),
                "longest_gp_ns": max((e["ns"] for e in geps), default=0),
                "longest_inside_ns": lstall["inside_ns"] if lstall else 0,
                "task": lstall["task"] if lstall else None,
                "doing": lstall["doing"] if lstall else None,
                "longest_read_side_ns": host.rcu.longest_section,
                "longest_read_side_task": (host.rcu.longest_section_who or (None,))[0],
            },
            "vcpu_blocked": {
                "episodes": len(blocked),
                "max_ns": int(durs.max()) if len(durs) else 0,
                "p50_ns": _percentile(durs, 50),
                "p99_ns": _percentile(durs, 99),
                "total_ns": int(durs.sum()) if len(durs) else 0,
                "who": blocked[-1][1] if blocked else None,
                "why": blocked[-1][2] if blocked else None,
            },
            "mmu_lock": {
                "read_max_hold_ns": lock.stats_read.max_hold,
                "write_max_hold_ns": lock.stats_write.max_hold,
                "read_max_wait_ns": lock.stats_read.max_wait,
                "write_max_wait_ns": lock.stats_write.max_wait,
                "read_acquires": lock.stats_read.acquires,
                "write_acquires": lock.stats_write.acquires,
            },
            "remote_tlb_flush": kvm.stat["remote_tlb_flush"],
            "remote_tlb_flush_requests": kvm.stat["remote_tlb_flush_requests"],
            "ipis": kvm.ipis,
            "page_tables": {"allocated": tdp.pt.allocated, "freed": tdp.pt.freed,
                            "peak_pages": tdp.pt.peak,
                            "peak_bytes": tdp.pt.peak * 4096},
            "zap_work": {"queued": tdp.zap_wq.queued, "completed": tdp.zap_wq.completed},
            "root_zaps": [dict(z) for z in tdp.root_zaps],
            "stats": dict(kvm.stat),
            "vcpu_stats": _vcpu_stats(kvm, VCPU_STATS),
            "model_counters": {"ipis": kvm.ipis,
                               "vcpu": _vcpu_stats(kvm, MODEL_COUNTERS)},
        }
        return out
