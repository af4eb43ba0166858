"""max_guest_memory_test on the simulated host: wall time, peak RSS, simulated SPTE
operations per wall second, for the issue's three configurations (or one given by hand).

Each (configuration, kernel) runs in its own process, so each peak RSS is its own.

    python bench/max_guest_memory.py                       # 128 GiB on 5.18
    python bench/max_guest_memory.py --set 1tib            # -m 1024 -c 8, each kernel
    python bench/max_guest_memory.py --set 4tib            # -m 4096 -c 8, each kernel
    python bench/max_guest_memory.py -m 256 -c 8 --kernel 5.17
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

SETS = {
    "default": [{"max_mem_gib": 128, "kernel": "5.18"}],
    "1tib": [{"max_mem_gib": 1024, "vcpus": 8, "kernel": k} for k in ("5.17", "5.18")],
    "4tib": [{"max_mem_gib": 4096, "vcpus": 8, "kernel": k} for k in ("5.17", "5.18")],
}


def one(spec: dict) -> dict:
    """Run one configuration in this process; the figures the benchmark records."""
    from tdpsim.workloads.max_guest_memory import MgmConfig, run
    kernel = spec.pop("kernel")
    r = run(MgmConfig(**spec), kernel)
    sy = r["symptoms"]
    return {
        "kernel": kernel,
        "config": r["config"],
        "guest_gib": r["layout"]["guest_gib"],
        "wall_s": r["wall"]["seconds"],
        "peak_rss_mib": r["wall"]["peak_rss_mib"],
        "spte_ops": r["work"]["leaves_installed"] + r["work"]["leaves_zapped"],
        "spte_ops_per_wall_s": r["wall"]["spte_ops_per_s"],
        "events": r["work"]["events"],
        "selftest_s": {k: v / 1e9 for k, v in r["selftest"].items()},
        "soft_lockups": sy["soft_lockups"]["count"],
        "rcu_stalls": sy["rcu_stalls"]["count"],
        "vcpu_blocked_max_s": sy["vcpu_blocked"]["max_ns"] / 1e9,
        "page_table_peak_mib": sy["page_tables"]["peak_bytes"] / 2**20,
        "verdict": r["verdict"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", choices=sorted(SETS), default=None)
    ap.add_argument("-m", type=int, default=None)
    ap.add_argument("-c", type=int, default=None)
    ap.add_argument("-s", type=int, default=2)
    ap.add_argument("--kernel", default="5.18")
    ap.add_argument("--one", help=argparse.SUPPRESS)     # internal: run one spec (JSON)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(json.loads(a.one))))
        return
    if a.m is not None:
        specs = [{"max_mem_gib": a.m, "vcpus": a.c, "slot_gib": a.s, "kernel": k}
                 for k in a.kernel.split(",")]
    else:
        specs = SETS[a.set or "default"]
    runs = []
    for spec in specs:
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                           capture_output=True, text=True)
        if p.returncode:
            runs.append({"spec": spec, "error": p.stderr.strip().splitlines()[-1:]})
        else:
            runs.append(json.loads(p.stdout))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "max_guest_memory", "runs": runs,
                      "python": sys.version.split()[0], "machine": platform.machine(),
                      "processor": platform.processor() or platform.machine()}, indent=2))


if __name__ == "__main__":
    main()
