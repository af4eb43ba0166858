"""``tdpsim max-guest-memory``: the selftest's layout, the behaviour the series changes
(5.17 vs 5.18, at small scale with the watchdog thresholds lowered), exactness and
determinism of the whole run, the report, and bad input."""

import json
import subprocess
import sys

import pytest

from tdpsim.workloads.max_guest_memory import GIB_PAGES, MgmConfig, layout, run

MS = 1_000_000


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "tdpsim.cli", "max-guest-memory", *args],
                       capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


# ---- the selftest's setup loop ----------------------------------------------------------

def test_default_layout_is_128_gib_in_64_slots_over_three_quarters_of_the_cpus():
    cfg = MgmConfig()
    lay = layout(cfg)
    assert cfg.nr_vcpus == 12                      # 3/4 of 16 host CPUs
    assert (lay.nslots, lay.guest_gib) == (64, 128)
    assert lay.chunk_pages == 128 * GIB_PAGES // 12


def test_max_mem_is_rounded_up_to_whole_slots():
    # (gpa - start) < max_mem decides: -m 3 with 2 GiB slots creates two of them
    assert (layout(MgmConfig(max_mem_gib=3)).nslots, layout(MgmConfig(max_mem_gib=3)).guest_gib) \
        == (2, 4)


def test_maxphyaddr_caps_the_slots_one_page_short_of_the_limit():
    # 2^40 bytes (-m at the limit): vm->max_gfn is the last frame, so the slot ending
    # exactly at 1 TiB is out
    lay = layout(MgmConfig(max_mem_gib=1024, maxphyaddr=40))
    assert lay.nslots == 509 and lay.guest_gib == 1018


def test_running_out_of_slot_numbers_leaves_the_last_slot_untouched():
    # slots 1..32763 exist, but the loop ends with gpa at the last one, as in the selftest
    lay = layout(MgmConfig(max_mem_gib=1 << 17, maxphyaddr=48))
    assert lay.nslots == 32763
    assert lay.guest_gib == 2 * 32762


# ---- 5.17 vs 5.18 -----------------------------------------------------------------------

def small(kernel, **kw):
    """4 GiB, 3 vCPUs on 4 CPUs, every watchdog threshold scaled by 1/1000 (soft lockup at
    20 ms, RCU stall at 21 ms): the 55 ms teardown of a 4 GiB root is then "long"."""
    cfg = dict(max_mem_gib=4, slot_gib=1, vcpus=3, host_cpus=4, second_ns=MS)
    cfg.update(kw)
    return run(MgmConfig(**cfg), kernel)


@pytest.fixture(scope="module")
def both():
    return {k: small(k) for k in ("5.17", "5.18")}


def reset_teardown(r):
    """The teardown of run 1's root (the first root torn down)."""
    return r["symptoms"]["root_zaps"][0]


def test_517_the_vcpu_dropping_the_last_reference_tears_the_root_down(both):
    r = both["5.17"]
    z = reset_teardown(r)
    assert z["task"].startswith("vcpu") and not z["shared"]        # under mmu_lock (write)
    assert z["ns"] > 50 * MS
    vb = r["symptoms"]["vcpu_blocked"]
    # blocked for the whole teardown, which is the whole reset phase
    assert vb["max_ns"] >= z["ns"] and vb["why"] == "root put" and vb["who"] == z["task"]
    assert r["selftest"]["reset_ns"] >= z["ns"]
    sl, rc = r["symptoms"]["soft_lockups"], r["symptoms"]["rcu_stalls"]
    assert sl["count"] >= 1 and rc["count"] >= 1
    assert z["task"] in (sl["task"], rc["task"])
    assert r["verdict"] == "clean"


def test_518_a_worker_tears_the_root_down_and_no_vcpu_waits_for_it(both):
    r = both["5.18"]
    z = reset_teardown(r)
    assert z["task"].startswith("kworker") and z["shared"]
    assert z["ns"] > 50 * MS
    vb = r["symptoms"]["vcpu_blocked"]
    # vCPUs only wait for mmu_lock while the worker finishes one 1 GiB subtree (5.18 still
    # loads roots under the write lock): far less than the teardown
    assert vb["max_ns"] < z["ns"] / 3 and vb["why"] != "root put"
    assert r["selftest"]["reset_ns"] < MS
    assert r["symptoms"]["soft_lockups"]["count"] == 0
    assert r["symptoms"]["rcu_stalls"]["count"] == 0
    assert r["symptoms"]["zap_work"]["queued"] >= 1
    assert r["verdict"] == "clean"


def test_both_kernels_do_the_same_work(both):
    a, b = both["5.17"]["work"], both["5.18"]["work"]
    chunk = 4 * GIB_PAGES // 3                 # per vCPU, rounded down to whole pages
    assert both["5.17"]["layout"]["chunk_pages"] == chunk
    assert a["leaves_installed"] == b["leaves_installed"] == 2 * 3 * chunk
    assert a["leaves_zapped"] == b["leaves_zapped"] == a["leaves_installed"]
    for r in both.values():
        pt = r["symptoms"]["page_tables"]
        assert pt["allocated"] == pt["freed"] > 0


@pytest.mark.parametrize("hugetlb,maxphyaddr", [(False, 46), (True, 46), (False, 52)])
def test_fast_granularity_gives_the_exact_run(hugetlb, maxphyaddr, settle_checker):
    """The whole selftest, every step an event vs bulks: the same figures (with -H the
    bulks are the accesses through 2 MiB leaves; at MAXPHYADDR 52 the root has 5 levels
    and the slots sit just below 4 PiB)."""
    for k in ("5.18", "5.17"):
        cfg = dict(max_mem_gib=1, slot_gib=1, vcpus=2, host_cpus=3, hugetlb=hugetlb,
                   maxphyaddr=maxphyaddr)
        ex = run(MgmConfig(granularity="exact", **cfg), k)
        fa = run(MgmConfig(granularity="fast", **cfg), k)
        for key in ("selftest", "symptoms", "findings", "sim_end_ns", "verdict"):
            assert ex[key] == fa[key], (k, key)
        assert ex["work"]["events"] > 50 * fa["work"]["events"]


def _sim(r):
    return {k: v for k, v in r.items() if k != "wall"}


def test_same_seed_same_run_and_slicing_for_progress_changes_nothing():
    cfg = MgmConfig(max_mem_gib=2, slot_gib=1, vcpus=3, host_cpus=4, strategy="random",
                    seed=11)
    a, b = run(cfg, "5.18"), run(cfg, "5.18")
    seen = []
    c = run(cfg, "5.18", on_slice=lambda p, now: seen.append((p.phase, now)),
            slice_ns=7 * MS)
    assert _sim(a) == _sim(b) == _sim(c)
    phases = [p for p, _ in seen]
    assert {"run 1", "run 2", "exit"} <= set(phases)     # (5.18's reset is 0.1 ms)
    assert [t for _, t in seen] == sorted(t for _, t in seen)


# ---- the command ------------------------------------------------------------------------

def test_command_prints_the_selftest_lines_the_table_and_the_verdict(tmp_path):
    js = tmp_path / "r.json"
    rc, out, err = cli("-m", "2", "-s", "1", "-c", "2", "--host-cpus", "4",
                       "--kernel", "5.17,5.18", "--json", str(js))
    assert rc == 0, err
    assert err == ""                                 # no progress bars when not a terminal
    lines = out.splitlines()
    assert lines.count("Running with 2gb of guest memory and 2 vCPUs") == 2
    for phase in ("spawning", "run 1", "reset", "run 2"):       # the rendezvous lines
        w = [i for i, x in enumerate(lines) if x == f"Waiting for vCPUs to finish {phase}..."]
        assert len(w) == 2
        assert all(lines[i + 1] == f"All vCPUs finished {phase}, releasing..." for i in w)
    runs = [x for x in lines if x.startswith("run1 = ")]
    assert len(runs) == 2 and all(", run2 =  " in x for x in runs)
    head = next(x for x in lines if x.startswith("symptom"))
    assert "kernel 5.17" in head and "kernel 5.18" in head
    for row in ("soft lockup reports", "RCU stall reports", "vCPU blocked: max", "mmu_lock max hold: read",
                "remote TLB flushes", "page tables allocated", "  peak memory",
                "oracle verdict", "wall time", "peak RSS", "SPTE ops / wall s"):
        assert any(x.startswith(row) for x in lines), row
    verdict = next(x for x in lines if x.startswith("oracle verdict"))
    assert verdict.split()[2:] == ["clean", "clean"]
    doc = json.loads(js.read_text())
    assert doc["schema"] == "tdpsim.max-guest-memory/1"
    assert [r["kernel"] for r in doc["runs"]] == ["5.17", "5.18"]
    assert doc["runs"][0]["selftest"]["run1_ns"] > 0


def test_progress_bars_go_to_stderr_only_when_asked():
    rc, out, err = cli("-m", "1", "-s", "1", "-c", "1", "--host-cpus", "2", "--progress")
    assert rc == 0
    assert "run 1" in err and "run 2" in err
    assert "Running with 1gb" in out


def test_knobs_apply_to_the_kernel_and_name_it():
    rc, out, _ = cli("-m", "1", "-s", "1", "-c", "1", "--host-cpus", "2",
                     "--kernel", "5.18", "--knob", "async_defunct_zap=off")
    assert rc == 0
    assert "== kernel 5.18 async_defunct_zap=off" in out


@pytest.mark.parametrize("args, option", [
    (["-m", "1"], "-m/--max-mem"),                       # too small for one 2 GiB slot
    (["-m", "4", "-s", "8"], "-m/--max-mem"),            # -s larger than -m
    (["-m", "0"], "'-m' / '--max-mem'"),
    (["-c", "0"], "'-c' / '--vcpus'"),
    (["-c", "300000", "-m", "1", "-s", "1"], "'-c' / '--vcpus'"),   # more vCPUs than pages
    (["--maxphyaddr", "35"], "'--maxphyaddr'"),
    (["--maxphyaddr", "53"], "'--maxphyaddr'"),
    (["-s", "16", "-m", "64", "--maxphyaddr", "36"], "-s/--slot-size"),
    (["-s", "8192"], "'-s' / '--slot-size'"),             # beyond KVM's largest memslot
    (["-m", "65537", "--maxphyaddr", "46"], "-m/--max-mem"),   # beyond 2^MAXPHYADDR
    (["-m", "4194305", "--maxphyaddr", "52"], "'-m' / '--max-mem'"),
    (["--knob", "nope=on"], "'--knob'"),
    (["--knob", "deferred_flush=maybe"], "'--knob'"),
    (["--cost", "nope=1"], "'--cost'"),
    (["--cost", "spte_zap_4k=-1"], "'--cost'"),
    (["--kernel", "5.16"], "'--kernel'"),
    (["--host-cpus", "1"], "--host-cpus"),
    (["-s", "x"], "'-s' / '--slot-size'"),
    (["--storage", "sparse"], "'--storage'"),
    (["--granularity", "coarse"], "'--granularity'"),
    (["--preempt", "rt"], "'--preempt'"),
    (["--hz", "200"], "'--hz'"),
    (["--watchdog-thresh", "0"], "'--watchdog-thresh'"),
    (["--rcu-stall-timeout", "301"], "'--rcu-stall-timeout'"),
])
def test_bad_input_is_one_line_naming_the_option_and_exit_2(args, option):
    rc, out, err = cli(*args)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert option in err and "expected" in err


def test_host_settings_reach_the_host_the_header_and_the_json(tmp_path):
    """--preempt, --hz, --watchdog-thresh, --rcu-stall-timeout: shown, recorded, and in
    force (without CONFIG_PREEMPTION rwlock_needbreak is false, so 5.18's zap worker no
    longer yields to a vCPU waiting for mmu_lock)."""
    base = ("-m", "16", "-c", "12", "--host-cpus", "16")
    blocked = {}
    for preempt in ("dynamic", "none"):
        js = tmp_path / f"{preempt}.json"
        rc, out, err = cli(*base, "--preempt", preempt, "--hz", "250",
                           "--watchdog-thresh", "7", "--rcu-stall-timeout", "60",
                           "--json", str(js))
        assert rc == 0, err
        assert f"preempt={preempt}, HZ=250, watchdog_thresh=7 s, RCU stall timeout 60 s" \
            in out.splitlines()[0]
        run = json.loads(js.read_text())["runs"][0]
        assert run["config"]["host"] == {"preempt": preempt, "hz": 250,
                                         "watchdog_thresh_s": 7, "rcu_stall_timeout_s": 60}
        blocked[preempt] = run["symptoms"]["vcpu_blocked"]["max_ns"]
    assert blocked["none"] > 10 * blocked["dynamic"]
