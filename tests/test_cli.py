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
