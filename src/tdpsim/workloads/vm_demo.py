"""``tdpsim vm``: a small VM run on a chosen kernel policy, with symptoms and verdict."""

from __future__ import annotations

from dataclasses import asdict

from ..host.mm import PAGE
from ..kvm.vcpu import TouchGuest
from ..mmu.policy import PRESETS, Policy, label
from .vm import VmHarness

SLOT_PAGES = 16384           # 64 MiB per memslot


def run_vm_demo(policy: Policy, nvcpus: int, nslots: int, seed: int, strategy: str,
                granularity: str, storage: str = "compressed", host: dict | None = None
                ) -> dict:
    """``host``: HostConfig fields (``--preempt`` ...); the defaults otherwise."""
    h = VmHarness(ncpus=nvcpus + 1, nvcpus=nvcpus, pages=SLOT_PAGES, nslots=nslots,
                  policy=policy, seed=seed, strategy=strategy, granularity=granularity,
                  tlb_capacity=1536, psc_capacity=32, storage=storage, host_config=host)
    hc = h.host.config
    total = nslots * SLOT_PAGES
    chunk = total // nvcpus

    def vcpu(th, v, start):
        yield from v.run(th, TouchGuest(start, chunk))
        yield from v.set_sregs_toggle_cr0_wp(th)
        yield from v.run(th, TouchGuest(start, chunk))

    def vmm(th):
        ths = [h.spawn_vcpu(v, vcpu, h.slot_gfn(1) + i * chunk) for i, v in enumerate(h.vcpus)]
        for t in ths:
            yield from h.host.join(th, t)
        if nslots > 1:
            yield from h.kvm.set_user_memory_region(th, nslots, 0,
                                                    h.slot_gfn(nslots) * PAGE, 0, h.hva)
        yield from h.mm.munmap(th, h.hva, SLOT_PAGES // 2)
        yield from h.mm.exit(th)
        yield from h.arch.destroy(th)

    h.spawn(vmm, "vmm")
    h.run()
    name = label(policy)
    return {
        "kernel": name if name in PRESETS else "custom",
        "knobs": asdict(policy),
        "config": {"vcpus": nvcpus, "slots": nslots, "seed": seed, "strategy": strategy,
                   "granularity": granularity, "storage": storage,
                   "host": {"preempt": hc.preempt, "watchdog_thresh_s": hc.watchdog_thresh_s,
                            "rcu_stall_timeout_s": hc.rcu_stall_timeout_s, "hz": hc.hz}},
        "sim_end_s": h.host.engine.now / 1e9,
        "symptoms": h.monitors.summary(),
        "findings": [f.as_dict() | {"excerpt": f.excerpt[-5:]} for f in h.findings],
        "verdict": h.checker.verdict(),
    }


def host_line(hc: dict) -> str:
    """The host kernel's settings, as the run headers show them."""
    return (f"preempt={hc['preempt']}, HZ={hc['hz']}, watchdog_thresh={hc['watchdog_thresh_s']}"
            f" s, RCU stall timeout {hc['rcu_stall_timeout_s']} s")


def render(s: dict) -> str:
    sy = s["symptoms"]
    off = [k for k, v in s["knobs"].items() if not v]
    lines = [
        f"tdpsim vm: kernel {s['kernel']}"
        + (f" (knobs off: {', '.join(off)})" if s["kernel"] == "custom" else "")
        + f", {s['config']['vcpus']} vCPUs, {s['config']['slots']} x 64 MiB slots, "
          f"{s['config']['granularity']}, {s['config']['storage']} page tables; "
          f"{host_line(s['config']['host'])}",
        f"simulated time {s['sim_end_s']:.6f} s",
        "root zaps: " + ", ".join(f"root#{z['root']} by {z['task']} "
                                   f"({z['ns'] / 1e6:.3f} ms, "
                                   f"{'read' if z['shared'] else 'write'} lock)"
                                   for z in sy["root_zaps"]),
        f"vCPU blocked: max {sy['vcpu_blocked']['max_ns'] / 1e3:.1f} us "
        f"({sy['vcpu_blocked']['who']}: {sy['vcpu_blocked']['why']}), "
        f"p99 {sy['vcpu_blocked']['p99_ns'] / 1e3:.1f} us",
        f"mmu_lock max hold: read {sy['mmu_lock']['read_max_hold_ns'] / 1e3:.1f} us, "
        f"write {sy['mmu_lock']['write_max_hold_ns'] / 1e3:.1f} us",
        f"remote TLB flushes {sy['remote_tlb_flush']}, flush requests "
        f"{sy['remote_tlb_flush_requests']}, IPIs {sy['ipis']}",
        f"soft lockups {sy['soft_lockups']['count']}, RCU stalls {sy['rcu_stalls']['count']}, "
        f"longest RCU read-side section {sy['rcu_stalls']['longest_read_side_ns'] / 1e6:.3f} ms",
        f"page tables: {sy['page_tables']['allocated']} allocated, "
        f"{sy['page_tables']['freed']} freed, peak {sy['page_tables']['peak_pages']}",
        f"verdict: {s['verdict']}",
    ]
    for f in s["findings"][:5]:
        lines.append(f"  finding: {f['kind']} at {f['t']} ns ({f['task']}): {f['details']}")
    return "\n".join(lines)
