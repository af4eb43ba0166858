"""The ``tdpsim`` command: the demo runs; bad input gets one line and exit code 2."""

import json
import subprocess
import sys

import pytest

from tdpsim.cli import main


def run_cli(*args):
    r = subprocess.run([sys.executable, "-m", "tdpsim.cli", *args], capture_output=True,
                       text=True)
    return r.returncode, r.stdout, r.stderr


def test_demo_prints_what_happened(tmp_path):
    tr, js = tmp_path / "t.jsonl", tmp_path / "s.json"
    rc, out, err = run_cli("demo", "--seed", "3", "--trace", str(tr), "--json", str(js))
    assert rc == 0, err
    assert "soft_lockup" in out and "rcu_stall" in out
    assert "queue_work results [True, False, True, True]" in out
    lines = tr.read_text().splitlines()
    assert json.loads(lines[0])["ev"] == "header"
    assert all("t" in json.loads(x) and "ev" in json.loads(x) for x in lines[1:])
    s = json.loads(js.read_text())
    assert s["pages"]["allocated"] == 0 and s["rcu_gps"] > 0


def test_demo_exact_and_fast_print_the_same_results():
    outs = []
    for g in ("exact", "fast"):
        rc, out, _ = run_cli("demo", "--seed", "5", "--granularity", g, "--stuck-s", "22")
        assert rc == 0
        # the header line names the granularity and the event count differs: skip both
        outs.append(out.splitlines()[3:])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("args, option", [
    (["demo", "--cpus", "x"], "--cpus"),
    (["demo", "--cpus", "-2"], "--cpus"),
    (["demo", "--cpus", "0"], "--cpus"),
    (["demo", "--iterations", "1.5"], "--iterations"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--stuck-s", "nan"], "--stuck-s"),
    (["demo", "--granularity", "slow"], "--granularity"),
    (["demo", "--cost", "nosuch=5"], "--cost"),
    (["demo", "--cost", "spte_zap_4k=-5"], "--cost"),
    (["demo", "--cost", "spte_zap_4k"], "--cost"),
    (["demo", "--frobnicate"], "--frobnicate"),
    (["nosuchcommand"], "nosuchcommand"),
])
def test_bad_input_one_line_exit_2(args, option):
    rc, out, err = run_cli(*args)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert option in lines[0] and "Traceback" not in err


def test_ranges_are_named():
    rc, _, err = run_cli("demo", "--cpus", "-2")
    assert "from 1 to 4096" in err


def test_main_returns_zero_in_process(capsys):
    assert main(["demo", "--stuck-s", "0", "--iterations", "50"]) == 0
    assert "detectors: nothing reported" in capsys.readouterr().out


def test_vm_command_kernels_differ(tmp_path):
    import json as _json
    out = {}
    for k in ("5.17", "5.18"):
        js = tmp_path / f"{k}.json"
        rc, text, err = run_cli("vm", "--kernel", k, "--slots", "2", "--json", str(js))
        assert rc == 0, err
        assert "verdict: clean" in text
        out[k] = _json.loads(js.read_text())
    zap17 = out["5.17"]["symptoms"]["root_zaps"][0]
    zap18 = out["5.18"]["symptoms"]["root_zaps"][0]
    assert zap17["task"].startswith("vcpu") and not zap17["shared"]
    assert zap18["task"].startswith("kworker") and zap18["shared"]


def test_vm_knob_and_config_select_the_policy(tmp_path):
    import json as _json
    cfg = tmp_path / "k.toml"
    cfg.write_text('kernel = "5.17"\n[knobs]\nasync_defunct_zap = true\n')
    js = tmp_path / "o.json"
    rc, _, err = run_cli("vm", "--config", str(cfg), "--knob", "deferred_flush=on",
                         "--slots", "1", "--json", str(js))
    assert rc == 0, err
    knobs = _json.loads(js.read_text())["knobs"]
    assert knobs["async_defunct_zap"] and knobs["deferred_flush"]      # config, then --knob
    assert not knobs["two_pass_root_zap"]                               # from the 5.17 preset


@pytest.mark.parametrize("args, option", [
    (["vm", "--knob", "nope=on"], "--knob"),
    (["vm", "--knob", "deferred_flush=maybe"], "--knob"),
    (["vm", "--kernel", "5.16"], "--kernel"),
    (["vm", "--config", "/nonexistent.toml"], "--config"),
    (["vm", "--vcpus", "0"], "--vcpus"),
    (["vm", "--hz", "512"], "--hz"),
    (["vm", "--preempt", "lazy"], "--preempt"),
])
def test_vm_bad_input_one_line_exit_2(args, option):
    rc, out, err = run_cli(*args)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and option in err


@pytest.mark.parametrize("module", ["tdpsim", "tdpsim.cli"])
def test_bare_command_prints_the_help_and_succeeds(module):
    """``tdpsim`` alone (and ``python -m tdpsim``) lists the commands and exits 0."""
    r = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: tdpsim") and "max-guest-memory" in r.stdout


def test_python_m_tdpsim_runs_a_command():
    r = subprocess.run([sys.executable, "-m", "tdpsim", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("tdpsim")


def test_vm_host_settings_in_the_header_and_the_json(tmp_path):
    js = tmp_path / "vm.json"
    rc, out, err = run_cli("vm", "--preempt", "voluntary", "--hz", "100", "--json", str(js))
    assert rc == 0, err
    assert "preempt=voluntary, HZ=100, watchdog_thresh=10 s" in out.splitlines()[0]
    assert json.loads(js.read_text())["config"]["host"] == {
        "preempt": "voluntary", "hz": 100, "watchdog_thresh_s": 10, "rcu_stall_timeout_s": 21}
