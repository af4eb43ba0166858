"""Engine throughput: tdpsim exact mode vs SimPy on the same workload, in one process.

Workload: P processes, each doing T timeouts whose lengths (1..1000 ns) come from a seeded
generator, identical for both engines.  Prints JSON with events/s for each and the ratio.

    python bench/engine.py [--procs 100] [--timeouts 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time


def delays(procs: int, timeouts: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(1, 1000) for _ in range(timeouts)] for _ in range(procs)]


def run_tdpsim(plan: list[list[int]]) -> tuple[float, int, int]:
    from tdpsim.sim.engine import Engine

    eng = Engine(record_decisions=True)

    def proc(ds):
        for d in ds:
            yield d

    for i, ds in enumerate(plan):
        eng.spawn(proc(ds), f"p{i}")
    t0 = time.perf_counter()
    eng.run()
    wall = time.perf_counter() - t0
    return wall, eng.events, eng.now


def run_simpy(plan: list[list[int]]) -> tuple[float, int, int]:
    import simpy

    env = simpy.Environment()
    count = [0]

    def proc(env, ds):
        for d in ds:
            yield env.timeout(d)
            count[0] += 1

    for ds in plan:
        env.process(proc(env, ds))
    t0 = time.perf_counter()
    env.run()
    wall = time.perf_counter() - t0
    return wall, count[0] + len(plan), int(env.now)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=100)
    ap.add_argument("--timeouts", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    plan = delays(a.procs, a.timeouts, a.seed)
    best = {}
    for name, fn in (("tdpsim", run_tdpsim), ("simpy", run_simpy)):
        walls = []
        for _ in range(a.repeat):
            wall, events, end = fn(plan)
            walls.append(wall)
        w = min(walls)
        best[name] = {"wall_s": round(w, 4), "events": events, "sim_end_ns": end,
                      "events_per_s": round(events / w)}
    assert best["tdpsim"]["sim_end_ns"] == best["simpy"]["sim_end_ns"], "engines disagree"
    out = {
        "bench": "engine",
        "workload": f"{a.procs} processes x {a.timeouts} timeouts (1..1000 ns, seed {a.seed})",
        "tdpsim_exact": best["tdpsim"],
        "simpy": best["simpy"],
        "ratio": round(best["tdpsim"]["events_per_s"] / best["simpy"]["events_per_s"], 2),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
