"""Text rendering of a ``tdpsim demo`` run."""

from __future__ import annotations


def _s(ns: int) -> str:
    """Simulated time in the most readable unit."""
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.3f} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.3f} ms"
    if ns >= 1_000:
        return f"{ns / 1e3:.1f} us"
    return f"{ns} ns"


def render(host, summary: dict, cfg) -> str:
    eng = host.engine
    lines = [
        f"tdpsim demo: {cfg.cpus} pCPUs, {cfg.loopers} loopers x {cfg.iterations} iterations, "
        f"{cfg.writers} writers, seed {cfg.seed} ({cfg.strategy}), {cfg.granularity} granularity",
        f"simulated time {_s(summary['end_ns'])}, {eng.events} events, "
        f"{len(eng.decisions)} decisions",
        "",
        "loops (rwlock read + RCU, yielding on need_resched or rwlock_needbreak):",
    ]
    for name, t in summary["loops_done_at"].items():
        lines.append(f"  {name:10s} done at {_s(t):>12s}  yields {summary['yields'][name]}")
    lines.append("writers saw the shared table (they settle the loopers' progress first):")
    for name, t, total in summary["observed"]:
        lines.append(f"  {name:10s} at {_s(t):>12s}  sum {total}")
    lines += [
        f"RCU: {summary['rcu_gps']} grace periods, {summary['rcu_callbacks']} callbacks invoked",
        f"workqueue: queue_work results {summary['queue_results']} "
        f"(2nd call on a pending item is a no-op), flushed at {_s(summary['flushed_at'])}, "
        f"ran {summary['work']}",
    ]
    if summary.get("invalidations") is not None:
        lines.append(f"mmu_notifier: {summary['invalidations']} invalidations seen by the "
                     f"secondary MMU, {summary['young']} young pages aged, "
                     f"{summary['shadow_entries']} entries left before exit, release "
                     f"{'called' if summary.get('shadow_entries') is not None else '-'}")
    p = summary["pages"]
    lines.append(f"host pages: {p['allocs']} allocated, {p['frees']} freed, "
                 f"{p['allocated']} still in use at exit")
    lines.append("")
    reps = [r for r in summary["reports"] if r["kind"] != "soft_lockup_end"]
    if not reps:
        lines.append("detectors: nothing reported")
    else:
        lines.append("detectors:")
        for r in reps:
            extra = ", ".join(f"{k}={_s(v) if k.endswith('_ns') else v}"
                              for k, v in r.items() if k not in ("t", "kind", "task"))
            lines.append(f"  {_s(r['t']):>12s}  {r['kind']:12s} task {r['task']}: {extra}")
    return "\n".join(lines)
