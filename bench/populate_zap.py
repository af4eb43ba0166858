"""Populate and destroy a VM: wall time, peak RSS, simulated SPTE operations per wall second.

An 8-vCPU VM with 64 GiB of 4 KiB-backed guest memory (32 memslots of 2 GiB aliasing one
2 GiB memfd, as max_guest_memory_test lays them out) is populated by its vCPUs, then
destroyed (VM teardown: vCPUs unload their root, the last put queues the zap worker, the
workqueue is flushed), in ``fast`` granularity.

    python bench/populate_zap.py [--gib 64] [--vcpus 8] [--granularity fast]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=64)
    ap.add_argument("--vcpus", type=int, default=8)
    ap.add_argument("--slot-gib", type=int, default=2)
    ap.add_argument("--granularity", choices=["fast", "exact"], default="fast")
    a = ap.parse_args()

    from tdpsim.kvm.vcpu import TouchGuest
    from tdpsim.workloads.vm import VmHarness

    t_start = time.perf_counter()
    pages = a.slot_gib << 18
    nslots = a.gib // a.slot_gib
    h = VmHarness(ncpus=a.vcpus, nvcpus=a.vcpus, pages=pages, nslots=nslots,
                  maxphyaddr=46, granularity=a.granularity, tlb_capacity=1536,
                  psc_capacity=32)
    total = nslots * pages
    chunk = total // a.vcpus
    phase = {}

    def vcpu_script(th, v, start, n):
        yield from v.run(th, TouchGuest(start, n))

    def vmm(th):
        ths = [h.spawn_vcpu(v, vcpu_script, h.slot_gfn(1) + i * chunk, chunk)
               for i, v in enumerate(h.vcpus)]
        for t in ths:
            yield from h.host.join(th, t)
        phase["populated_ns"] = h.host.engine.now
        phase["pages_4k"] = h.kvm.stat["pages_4k"]
        phase["wall_populate_s"] = time.perf_counter() - t_start
        yield from h.arch.destroy(th)
        phase["destroyed_ns"] = h.host.engine.now

    h.spawn(vmm, "vmm")
    t0 = time.perf_counter()
    h.run()
    wall = time.perf_counter() - t_start
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    spte_ops = 2 * phase["pages_4k"]          # each 4 KiB SPTE installed once, zapped once
    out = {
        "bench": "populate_zap",
        "config": {"gib": a.gib, "vcpus": a.vcpus, "slot_gib": a.slot_gib,
                   "granularity": a.granularity},
        "wall_s": round(wall, 2),
        "wall_run_s": round(time.perf_counter() - t0, 2),
        "wall_populate_s": round(phase["wall_populate_s"], 2),
        "peak_rss_mib": round(rss_kib / 1024, 1),
        "spte_ops": spte_ops,
        "spte_ops_per_wall_s": round(spte_ops / wall),
        "sim_populated_s": phase["populated_ns"] / 1e9,
        "sim_destroyed_s": phase["destroyed_ns"] / 1e9,
        "events": h.host.engine.events,
        "findings": len(h.findings),
        "pages_4k_after": h.kvm.stat["pages_4k"],
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
