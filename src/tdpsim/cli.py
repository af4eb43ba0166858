"""The ``tdpsim`` command.

Bad input never gives a traceback: it exits with code 2 and one line on stderr naming the
option and what it accepts.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .costs import CostModel, parse_cost_option


class Int(click.ParamType):
    """An integer in [lo, hi], with a one-line message naming the accepted range."""

    name = "integer"

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            v = value
        else:
            try:
                v = int(str(value), 0)
            except ValueError:
                self.fail(f"expected an integer from {self.lo} to {self.hi}, got {value!r}",
                          param, ctx)
        if not self.lo <= v <= self.hi:
            self.fail(f"expected an integer from {self.lo} to {self.hi}, got {v}", param, ctx)
        return v


class CostOpt(click.ParamType):
    name = "NAME=NS"

    def convert(self, value, param, ctx):
        try:
            return parse_cost_option(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _costs(pairs) -> CostModel:
    return CostModel(dict(pairs))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tdpsim")
def cli() -> None:
    """tdpsim: a deterministic model of the KVM x86 TDP MMU (Linux 5.17 vs 5.18)."""


@cli.command()
@click.option("--cpus", type=Int(1, 4096), default=2, show_default=True, help="host pCPUs")
@click.option("--loopers", type=Int(0, 1024), default=3, show_default=True,
              help="threads looping under the rwlock (read) and RCU")
@click.option("--iterations", type=Int(1, 10_000_000), default=400, show_default=True,
              help="loop iterations per looper")
@click.option("--writers", type=Int(0, 1024), default=2, show_default=True,
              help="threads taking the rwlock for write")
@click.option("--stuck-s", type=Int(0, 3600), default=25, show_default=True,
              help="a thread spins this many simulated seconds holding RCU (0: none)")
@click.option("--seed", type=Int(0, 2**63 - 1), default=0, show_default=True)
@click.option("--strategy", type=click.Choice(["fifo", "random"]), default="random",
              show_default=True, help="who decides simultaneous events and other choices")
@click.option("--granularity", type=click.Choice(["exact", "fast"]), default="fast",
              show_default=True)
@click.option("--cost", "cost", type=CostOpt(), multiple=True,
              help="override a cost, NAME=NS (repeatable)")
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False, writable=True),
              help="write the event trace (JSON Lines) to this file")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True),
              help="write the run's summary as JSON to this file")
def demo(cpus, loopers, iterations, writers, stuck_s, seed, strategy, granularity, cost,
         trace_file, json_file):
    """A small end-to-end run of the simulated host: locks, RCU, workqueue, mmu_notifier,
    watchdogs.  Prints what happened."""
    from .sim.trace import Trace
    from .workloads import host_demo as hd
    from .report.host_demo import render

    cfg = hd.DemoConfig(cpus=cpus, loopers=loopers, iterations=iterations, writers=writers,
                        stuck_ns=stuck_s * 1_000_000_000, seed=seed, strategy=strategy,
                        granularity=granularity, second_ns=1_000_000_000)
    trace = Trace(header={"cmd": "demo", "seed": seed, "strategy": strategy,
                          "granularity": granularity, "tdpsim": __version__}) \
        if trace_file else None
    costs = _costs(cost) if cost else None
    host, out = hd.build(cfg, trace=trace, costs=costs)
    host.run()
    host.finish()
    summary = hd.summary(host, out)
    click.echo(render(host, summary, cfg))
    if trace_file:
        with open(trace_file, "w") as fp:
            trace.dump(fp)
    if json_file:
        with open(json_file, "w") as fp:
            json.dump(summary, fp, indent=1, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: click in non-standalone mode so every error is one line + exit 2."""
    try:
        rv = cli.main(args=argv, prog_name="tdpsim", standalone_mode=False)
    except click.exceptions.NoSuchOption as e:
        _die(f"{e.format_message()} (see 'tdpsim {_sub(argv)}--help' for the options)")
    except click.exceptions.UsageError as e:
        _die(e.format_message())
    except click.exceptions.Abort:
        _die("aborted")
    except (ValueError, MemoryError) as e:  # configuration rejected by a layer below
        _die(str(e))
    return rv if isinstance(rv, int) else 0


def _sub(argv) -> str:
    args = sys.argv[1:] if argv is None else argv
    return f"{args[0]} " if args and not args[0].startswith("-") else ""


def _die(msg: str) -> None:
    click.echo(f"tdpsim: error: {msg.splitlines()[0]}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
