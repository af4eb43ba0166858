"""How max_guest_memory_test's cost grows with guest size: the acceptance ladder of the
compressed-storage issue (64 GiB, 1 TiB, 16 TiB, 64 TiB, 4 PiB), each kernel.

Each (size, kernel) runs in its own process (so each peak RSS is its own), with a wall-time
limit and an address-space limit, so that a size out of reach is recorded as such instead
of taking the machine down.  Prints one JSON document; progress lines go to stderr.

    python bench/scale.py                                  # 64 GiB and 1 TiB, each kernel
    python bench/scale.py --sizes 64,1024,16384,65536 --timeout 600
    python bench/scale.py --sizes 4194304 --kernel 5.18    # 4 PiB (-s 128, MAXPHYADDR 52)

Sizes are GiB.  The configuration is the issue's: ``-c 32 --host-cpus 48``; sizes up to
64 TiB run at MAXPHYADDR 46 with 2 GiB slots, larger ones at 52 with 128 GiB slots.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def spec_for(gib: int, kernel: str, storage: str) -> dict:
    big = gib > 1 << 16
    return {"max_mem_gib": gib, "vcpus": 32, "host_cpus": 48, "kernel": kernel,
            "maxphyaddr": 52 if big else 46, "slot_gib": 128 if big else 2,
            "storage": storage}


def one(spec: dict, mem_gib: float) -> dict:
    """Run one configuration in this process; the figures the benchmark records."""
    lim = int(mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    from tdpsim.workloads.max_guest_memory import MgmConfig, run
    kernel = spec.pop("kernel")
    r = run(MgmConfig(**spec), kernel)
    sy = r["symptoms"]
    return {
        "kernel": kernel,
        "guest_gib": r["layout"]["guest_gib"],
        "config": r["config"],
        "wall_s": r["wall"]["seconds"],
        "peak_rss_mib": r["wall"]["peak_rss_mib"],
        "events": r["work"]["events"],
        "bulks": r["work"]["bulks"],
        "page_tables": sy["page_tables"]["allocated"],
        "spte_ops": r["work"]["leaves_installed"] + r["work"]["leaves_zapped"],
        "selftest_s": {k: v / 1e9 for k, v in r["selftest"].items()},
        "soft_lockups": sy["soft_lockups"]["count"],
        "rcu_stalls": sy["rcu_stalls"]["count"],
        "verdict": r["verdict"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,1024", help="guest sizes, GiB, comma-separated")
    ap.add_argument("--kernel", default="5.17,5.18")
    ap.add_argument("--storage", default="compressed")
    ap.add_argument("--timeout", type=float, default=900, help="wall seconds per run")
    ap.add_argument("--mem-gib", type=float, default=16, help="address-space limit per run")
    ap.add_argument("--one", help=argparse.SUPPRESS)     # internal: run one spec (JSON)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(json.loads(a.one), a.mem_gib)))
        return
    runs = []
    for gib in (int(x) for x in a.sizes.split(",")):
        for kernel in a.kernel.split(","):
            spec = spec_for(gib, kernel, a.storage)
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, __file__, "--mem-gib", str(a.mem_gib),
                                    "--one", json.dumps(spec)],
                                   capture_output=True, text=True, timeout=a.timeout)
                if p.returncode:
                    rec = {"spec": spec, "error": p.stderr.strip().splitlines()[-1:]}
                else:
                    rec = json.loads(p.stdout)
            except subprocess.TimeoutExpired:
                rec = {"spec": spec, "error": f"over {a.timeout:.0f} s wall"}
            rec["process_wall_s"] = round(time.perf_counter() - t0, 1)
            runs.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "scale", "runs": runs, "python": sys.version.split()[0],
                      "machine": platform.machine(),
                      "processor": platform.processor() or platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
