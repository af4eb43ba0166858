"""Text report of ``tdpsim max-guest-memory``: the selftest's own lines, the symptom table
(one column per kernel), the oracle verdict, then wall time, peak RSS and simulated SPTE
operations per wall second.  Input: the plain-data results of
``workloads.max_guest_memory.run`` (the ``--json`` schema, docs/max-guest-memory.md)."""

from __future__ import annotations

from ..workloads.vm_demo import host_line


def _s(ns: int) -> str:
    """Simulated seconds in the selftest's format (%ld.%.9ld)."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}s"


def _dur(ns: int | None) -> str:
    if not ns:
        return "0"
    if ns >= 1_000_000_000:
        return f"{ns / 1e9:.3f} s"
    if ns >= 1_000_000:
        return f"{ns / 1e6:.3f} ms"
    return f"{ns / 1e3:.1f} us"


def _bytes(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def selftest_lines(r: dict) -> list[str]:
    """What max_guest_memory_test itself prints (pr_info), with simulated times."""
    c, lay, t = r["config"], r["layout"], r["selftest"]
    out = [f"Running with {lay['guest_gib']}gb of guest memory and {c['vcpus']} vCPUs"]
    for name in ("spawning", "run 1", "reset", "run 2"):
        # (the "\r%d vCPUs haven't rendezvoused..." lines the test overwrites in between,
        # every 6.4 ms of waiting, are left out)
        out.append(f"Waiting for vCPUs to finish {name}...")
        out.append(f"All vCPUs finished {name}, releasing...")
    # the selftest prints two spaces before run2's value
    out.append(f"run1 = {_s(t['run1_ns'])}, reset = {_s(t['reset_ns'])}, "
               f"run2 =  {_s(t['run2_ns'])}")
    return out


def _who(task, cpu=None, doing=None) -> str:
    if task is None:
        return "-"
    s = task + (f" on CPU {cpu}" if cpu is not None else "")
    return s + (f" ({doing})" if doing else "")


def _teardown(zaps: list[dict]) -> str:
    """The longest of these root teardowns: how long, by whom, under which lock."""
    if not zaps:
        return "none"
    z = max(zaps, key=lambda z: z["ns"])
    lock = "read" if z["shared"] else "write"
    return f"{_dur(z['ns'])} by {z['task']} ({lock} lock)"


def _populated(sy: dict) -> list[dict]:
    """Teardowns of populated roots (an empty root takes well under a microsecond)."""
    return [z for z in sy["root_zaps"] if z["ns"] >= 1000]


#: rows that start a new section of the table: the verdict, then the simulator's own costs
SECTION_STARTS = ("oracle verdict", "wall time")


def rows(r: dict) -> list[tuple[str, str]]:
    """(label, value) of the symptom table for one run."""
    sy = r["symptoms"]
    sl, rc, vb, ml = sy["soft_lockups"], sy["rcu_stalls"], sy["vcpu_blocked"], sy["mmu_lock"]
    pt, t = sy["page_tables"], r["selftest"]
    return [
        ("soft lockup reports", str(sl["count"])),
        ("  episodes, longest", f"{sl['episodes']}, {_dur(sl['longest_ns'])}"),
        ("  where", _who(sl["task"], sl["cpu"], sl["doing"])),
        ("RCU stall reports", str(rc["count"])),
        ("  stalled GPs, longest", f"{rc['episodes']}, {_dur(rc['longest_gp_ns'])}"),
        ("  longest inside a GP", _dur(rc["longest_inside_ns"])),
        ("  holdout", _who(rc["task"], None, rc["doing"])),
        ("  longest read-side section", f"{_dur(rc['longest_read_side_ns'])}"
                                        f" ({rc['longest_read_side_task'] or '-'})"),
        ("vCPU blocked: max", _dur(vb["max_ns"])),
        ("  p99 / p50", f"{_dur(vb['p99_ns'])} / {_dur(vb['p50_ns'])}"),
        ("  which vCPU, why", f"{vb['who'] or '-'}: {vb['why'] or '-'}"),
        ("  episodes, total", f"{vb['episodes']}, {_dur(vb['total_ns'])}"),
        ("root teardowns", str(len(_populated(sy)))),
        ("  longest", _teardown(_populated(sy))),
        ("  longest by a vCPU", _teardown([z for z in _populated(sy)
                                           if z["task"].startswith("vcpu")])),
        ("mmu_lock max hold: read", _dur(ml["read_max_hold_ns"])),
        ("  write", _dur(ml["write_max_hold_ns"])),
        ("mmu_lock max wait: read", _dur(ml["read_max_wait_ns"])),
        ("  write", _dur(ml["write_max_wait_ns"])),
        ("remote TLB flushes", str(sy["remote_tlb_flush"])),
        ("  flush requests", str(sy["remote_tlb_flush_requests"])),
        ("  IPIs", str(sy["ipis"])),
        ("page tables allocated", str(pt["allocated"])),
        ("  freed", str(pt["freed"])),
        ("  peak memory", f"{_bytes(pt['peak_bytes'])} ({pt['peak_pages']} pages)"),
        ("zap work items", f"{sy['zap_work']['queued']} queued, "
                           f"{sy['zap_work']['completed']} done"),
        ("delete even slots", _dur(t["delete_slots_ns"])),
        ("munmap half the backing", _dur(t["munmap_ns"])),
        ("exit (release + destroy)", _dur(t["exit_ns"])),
        ("simulated end", _dur(r["sim_end_ns"])),
        ("oracle verdict", r["verdict"]),
        ("wall time", f"{r['wall']['seconds']:.1f} s"),
        ("peak RSS", f"{r['wall']['peak_rss_mib']:.0f} MiB"),
        ("SPTE ops / wall s", f"{r['wall']['spte_ops_per_s'] / 1e6:.2f} M"),
    ]


def render(results: list[dict]) -> str:
    """The whole report for one or more kernels run on the same configuration."""
    lines: list[str] = []
    c = results[0]["config"]
    lines.append(f"max_guest_memory_test: -c {c['vcpus']} -m {c['max_mem_gib']} "
                 f"-s {c['slot_gib']}{' -H' if c['hugetlb'] else ''}; host: "
                 f"{c['host_cpus']} CPUs, MAXPHYADDR {c['maxphyaddr']} "
                 f"({results[0]['layout']['root_level']}-level TDP), "
                 f"{results[0]['layout']['slots']} memslots, {host_line(c['host'])}; "
                 f"seed {c['seed']}, "
                 f"{c['strategy']}, {c['granularity']}, {c['storage']} page tables")
    for r in results:
        lines.append("")
        lines.append(f"== kernel {r['kernel']}")
        lines.extend(selftest_lines(r))
    lines.append("")
    table = [rows(r) for r in results]
    labels = [lab for lab, _ in table[0]]
    heads = [f"kernel {r['kernel']}" for r in results]
    w0 = max(len(x) for x in labels + ["symptom"])
    ws = [max(len(h), *(len(v) for _, v in t)) for h, t in zip(heads, table)]
    lines.append("  ".join([f"{'symptom':<{w0}}"] + [f"{h:<{w}}" for h, w in zip(heads, ws)])
                 .rstrip())
    lines.append("  ".join(["-" * w0] + ["-" * w for w in ws]))
    for i, lab in enumerate(labels):
        if lab in SECTION_STARTS:
            lines.append("  ".join(["-" * w0] + ["-" * w for w in ws]))
        cells = [f"{t[i][1]:<{w}}" for t, w in zip(table, ws)]
        lines.append("  ".join([f"{lab:<{w0}}"] + cells).rstrip())
    for r in results:
        for f in r["findings"][:10]:
            det = ", ".join(f"{k}={v}" for k, v in f["details"].items())
            lines.append(f"finding ({r['kernel']}): {f['kind']} at {f['t']} ns "
                         f"({f['task']}): {det}")
    return "\n".join(lines)
