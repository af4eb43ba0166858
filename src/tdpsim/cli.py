"""The ``tdpsim`` command.

Bad input never gives a traceback: it exits with code 2 and one line on stderr naming the
option and what it accepts.
"""

from __future__ import annotations

import functools
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


class OneOf(click.Choice):
    """``click.Choice`` whose error says what it expected, like every other option."""

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        self.fail(f"expected one of {', '.join(self.choices)}, got {value!r}", param, ctx)


class CostOpt(click.ParamType):
    name = "NAME=NS"

    def convert(self, value, param, ctx):
        try:
            return parse_cost_option(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class KnobOpt(click.ParamType):
    name = "NAME=on|off"

    def convert(self, value, param, ctx):
        from .mmu.policy import Policy
        name, sep, v = value.partition("=")
        if name not in Policy.knobs():
            self.fail(f"unknown knob {name!r}; expected one of {', '.join(Policy.knobs())}",
                      param, ctx)
        if v not in ("on", "off"):
            self.fail(f"{name}: expected on or off, got {v!r}", param, ctx)
        return name, v == "on"


def load_policy(kernel: str | None, knobs, config: str | None):
    """The policy from a config file (``kernel = "5.17"``, ``[knobs] name = true``), then
    ``--kernel``, then each ``--knob``.  Raises click.BadParameter naming the source."""
    import tomllib
    from .mmu.policy import Policy, preset
    cfg = {}
    if config:
        try:
            with open(config, "rb") as fp:
                cfg = tomllib.load(fp)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise click.BadParameter(f"cannot read {config}: {e}", param_hint="'--config'")
        unknown = set(cfg) - {"kernel", "knobs"}
        if unknown:
            raise click.BadParameter(f"unknown keys {sorted(unknown)}; expected kernel, knobs",
                                     param_hint="'--config'")
    name = kernel or cfg.get("kernel", "5.18")
    try:
        pol = preset(str(name))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--kernel'")
    changes = {}
    for k, v in (cfg.get("knobs") or {}).items():
        if k not in Policy.knobs() or not isinstance(v, bool):
            raise click.BadParameter(f"knobs.{k}: expected a known knob = true|false",
                                     param_hint="'--config'")
        changes[k] = v
    changes.update(dict(knobs))
    return pol.with_knobs(**changes)


def _costs(pairs) -> CostModel:
    return CostModel(dict(pairs))


def _options(*opts):
    """Apply click options in the order listed (as stacked decorators would)."""
    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def run_options(strategy: str, costs: bool):
    """--seed, --strategy, --granularity (and --cost): how every run is driven."""
    opts = [
        click.option("--seed", type=Int(0, 2**63 - 1), default=0, show_default=True),
        click.option("--strategy", type=OneOf(["fifo", "random"]), default=strategy,
                     show_default=True,
                     help="who decides simultaneous events and other choices"),
        click.option("--granularity", type=OneOf(["exact", "fast"]), default="fast",
                     show_default=True),
    ]
    if costs:
        opts.append(click.option("--cost", "cost", type=CostOpt(), multiple=True,
                                 help="override a cost, NAME=NS (repeatable)"))
    return _options(*opts)


#: --storage: the page-table layout of a VM run
storage_option = click.option(
    "--storage", type=OneOf(["dense", "compressed"]), default="compressed",
    show_default=True,
    help="page-table layout: dense arrays, or leaf tables as runs of consecutive pages "
         "and full tables in a row as one record (same results; less memory, faster "
         "teardown on 5.18)")


class HzOpt(OneOf):
    """--hz: one of CONFIG_HZ's values, as an int."""

    def convert(self, value, param, ctx):
        return int(super().convert(str(value), param, ctx))


def host_options(f):
    """--preempt, --watchdog-thresh, --rcu-stall-timeout, --hz: the host kernel's settings
    that change the answer, passed on as ``host`` (HostConfig's fields)."""
    from .host.host import HZ_CHOICES, PREEMPT_MODELS, HostConfig
    d = HostConfig()
    opts = [
        click.option("--preempt", type=OneOf(list(PREEMPT_MODELS)), default=d.preempt,
                     show_default=True,
                     help="the host's preemption model: none, voluntary, dynamic (a "
                          "PREEMPT_DYNAMIC build, whatever mode it boots in) or full; "
                          "with none and voluntary, rwlock_needbreak never sees lock "
                          "waiters and holding or spinning on a lock holds up RCU "
                          "grace periods (RCU-sched)"),
        click.option("--watchdog-thresh", type=Int(1, 60), default=d.watchdog_thresh_s,
                     show_default=True,
                     help="kernel.watchdog_thresh, s: soft lockups after twice this"),
        click.option("--rcu-stall-timeout", type=Int(3, 300),
                     default=d.rcu_stall_timeout_s, show_default=True,
                     help="rcupdate.rcu_cpu_stall_timeout, s"),
        click.option("--hz", type=HzOpt([str(x) for x in HZ_CHOICES]), default=str(d.hz),
                     show_default=True,
                     help="CONFIG_HZ: the tick that RCU's stall checks run on.  The "
                          "host defaults are a 2022 distribution kernel: a PREEMPT_DYNAMIC "
                          "build at HZ=1000, with the kernel's default thresholds"),
    ]

    def wrap(*args, preempt, watchdog_thresh, rcu_stall_timeout, hz, **kw):
        return f(*args, host={"preempt": preempt, "watchdog_thresh_s": watchdog_thresh,
                              "rcu_stall_timeout_s": rcu_stall_timeout, "hz": hz}, **kw)
    return _options(*opts)(functools.update_wrapper(wrap, f))


#: --knob and --config: the policy on top of --kernel (read by ``load_policy``)
policy_options = _options(
    click.option("--knob", "knobs", type=KnobOpt(), multiple=True,
                 help="switch one behavioural change, NAME=on|off (repeatable; applies to "
                      "every kernel)"),
    click.option("--config", type=click.Path(dir_okay=False),
                 help='TOML file: kernel = "5.17" and a [knobs] table of name = true|false'),
)


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
@run_options(strategy="random", costs=True)
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


@cli.command()
@click.option("--kernel", type=OneOf(["5.17", "5.18"]), default=None,
              help="kernel preset (default 5.18, or the config file's)")
@policy_options
@click.option("--vcpus", type=Int(1, 64), default=2, show_default=True)
@click.option("--slots", type=Int(1, 64), default=4, show_default=True,
              help="memslots of 64 MiB, all aliasing one memfd")
@run_options(strategy="fifo", costs=False)
@storage_option
@host_options
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True),
              help="write the run's summary as JSON to this file")
def vm(kernel, knobs, config, vcpus, slots, seed, strategy, granularity, storage, host,
       json_file):
    """A small VM on the chosen kernel: vCPUs populate guest memory, reset their MMU
    context (dropping the root), populate again; a memslot is deleted, the host unmaps part
    of the backing, the process exits.  Prints the symptoms and the oracle verdict."""
    from .workloads.vm_demo import render, run_vm_demo
    policy = load_policy(kernel, knobs, config)
    summary = run_vm_demo(policy, vcpus, slots, seed, strategy, granularity, storage, host)
    click.echo(render(summary))
    if json_file:
        with open(json_file, "w") as fp:
            json.dump(summary, fp, indent=1, sort_keys=True)


class KernelList(click.ParamType):
    """``5.18``, ``5.17`` or a comma-separated list of them (run side by side)."""

    name = "KERNEL[,KERNEL]"

    def convert(self, value, param, ctx):
        from .mmu.policy import PRESETS
        if isinstance(value, tuple):
            return value
        names = tuple(x.strip() for x in str(value).split(","))
        for n in names:
            if n not in PRESETS:
                self.fail(f"expected {' or '.join(PRESETS)}, or both comma-separated, "
                          f"got {n!r}", param, ctx)
        if len(set(names)) != len(names):
            self.fail(f"each kernel at most once, got {value!r}", param, ctx)
        return names


@cli.command("max-guest-memory")
@click.option("-c", "--vcpus", type=Int(1, 1024), default=None,
              help="vCPUs  [default: 3/4 of --host-cpus]")
@click.option("-m", "--max-mem", type=Int(1, 1 << 22), default=128, show_default=True,
              help="maximum guest memory, GiB: up to 2^MAXPHYADDR bytes (64 TiB at 46, "
                   "4 PiB at 52)")
@click.option("-s", "--slot-size", type=Int(1, 8191), default=2, show_default=True,
              help="size of the backing region and of each memslot, GiB: up to 8191 (KVM's "
                   "largest memslot; the host keeps the region as runs) and below a "
                   "quarter of 2^MAXPHYADDR")
@click.option("-H", "--hugetlb", is_flag=True, help="back guest memory with 2 MiB hugetlb")
@click.option("--kernel", type=KernelList(), default=None,
              help="5.18, 5.17, or 5.17,5.18 to compare  [default: 5.18, or the config's]")
@policy_options
@click.option("--maxphyaddr", type=Int(36, 52), default=46, show_default=True,
              help="host (and guest) MAXPHYADDR; above 48 the root has 5 levels")
@click.option("--host-cpus", type=Int(1, 8192), default=16, show_default=True)
@run_options(strategy="fifo", costs=True)
@storage_option
@host_options
@click.option("--json", "json_file", type=click.Path(dir_okay=False, writable=True),
              help="write every figure to this file (schema: docs/max-guest-memory.md)")
@click.option("--progress/--no-progress", default=None,
              help="progress bars on stderr  [default: when stderr is a terminal]")
def max_guest_memory(vcpus, max_mem, slot_size, hugetlb, kernel, knobs, config, maxphyaddr,
                     host_cpus, seed, strategy, granularity, cost, storage, host, json_file,
                     progress):
    """max_guest_memory_test, the series' selftest, on a simulated host: populate up to -m
    GiB through memslots aliasing one backing region, reset every vCPU's MMU context,
    populate again, delete the even memslots, unmap half the backing, exit.  Prints the
    selftest's lines, the symptoms, the oracle verdict, and the simulator's own costs."""
    from .mmu.policy import label
    from .report.max_guest_memory import render
    from .workloads import max_guest_memory as mgm
    kernels = kernel or (None,)
    policies = [load_policy(k, knobs, config) for k in kernels]
    cfg = mgm.MgmConfig(vcpus=vcpus, max_mem_gib=max_mem, slot_gib=slot_size,
                        hugetlb=hugetlb, maxphyaddr=maxphyaddr, host_cpus=host_cpus,
                        seed=seed, strategy=strategy, granularity=granularity,
                        storage=storage, costs=tuple(cost), **host)
    mgm.layout(cfg)                      # every configuration error before any run
    if json_file:                        # and an unwritable output before the first run
        open(json_file, "a").close()
    show = sys.stderr.isatty() if progress is None else progress
    results = []
    for pol in policies:
        if show:
            from .report.progress import PhaseProgress
            with PhaseProgress(label(pol)) as bar:
                results.append(mgm.run(cfg, pol, on_slice=bar.update))
        else:
            results.append(mgm.run(cfg, pol))
    click.echo(render(results))
    if json_file:
        with open(json_file, "w") as fp:
            json.dump({"schema": mgm.SCHEMA, "runs": results}, fp, indent=1, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: click in non-standalone mode so every error is one line + exit 2.
    With no arguments it prints the help and succeeds (click 8.2 made a bare group a usage
    error; the project allows click 8.1 and later)."""
    if not (sys.argv[1:] if argv is None else argv):
        with cli.make_context("tdpsim", [], resilient_parsing=True) as ctx:
            click.echo(ctx.get_help())
        return 0
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
    except OSError as e:                    # an output file that cannot be written
        _die(f"{e.filename}: {e.strerror}")
    return rv if isinstance(rv, int) else 0


def _sub(argv) -> str:
    args = sys.argv[1:] if argv is None else argv
    return f"{args[0]} " if args and not args[0].startswith("-") else ""


def _die(msg: str) -> None:
    click.echo(f"tdpsim: error: {msg.splitlines()[0]}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
