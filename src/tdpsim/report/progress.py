"""Progress bars for long runs: one per phase, on stderr, only when asked (a terminal).

Reads the workload's ``Progress`` between engine slices; never feeds anything back into the
simulation."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn)


class PhaseProgress:
    def __init__(self, label: str):
        self.label = label
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("sim {task.fields[sim]}"),
                             TimeElapsedColumn(), console=Console(stderr=True),
                             transient=False)
        self.phase = None
        self.task = None

    def __enter__(self) -> "PhaseProgress":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            t = self.bars.tasks[-1]
            self.bars.update(self.task, completed=t.total or 1, total=t.total or 1)
        self.bars.__exit__(*exc)

    def update(self, prog, now_ns: int) -> None:
        sim = f"{now_ns / 1e9:.3f} s"
        if prog.phase != self.phase:
            if self.task is not None:
                t = self.bars.tasks[-1]
                self.bars.update(self.task, completed=t.total or 1, total=t.total or 1)
            self.phase = prog.phase
            total = prog.total if prog.phase in ("run 1", "run 2", "delete slots") else None
            self.task = self.bars.add_task(f"{self.label}: {prog.phase}", total=total, sim=sim)
        self.bars.update(self.task, completed=prog.done, sim=sim)
