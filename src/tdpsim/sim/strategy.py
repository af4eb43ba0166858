"""Scheduling strategies: who decides each choice point of a run.

A *decision* is any point where more than one thing could happen next.  The engine names
each one with a stable string (``tie`` for simultaneous events, ``vcpu3:place`` and so on
for the layers above), asks the strategy, and records ``(time, name, choices, chosen)``.

Two kinds of question are asked:

* ``rank(task_id, t)``: the order of events due at the same instant.  A rank is a pure
  function of the task and the time, so the relative order of two tasks at an instant does
  not depend on which other tasks happen to have an event there.  That is what lets the
  ``fast`` granularity (which has fewer events) order a bulk loop's virtual iterations
  against other events exactly as ``exact`` mode orders the real ones.
* ``choose(name, n)``: any other choice among ``n`` options.  Strategies must answer from
  the name and its occurrence count only (never from a shared RNG stream), for the same
  reason.

PCT and schedule replay plug in by implementing these two methods; ``choose_tie`` lets a
replay strategy override the rank order of one simultaneous-event decision.
"""

from __future__ import annotations

import zlib

_M64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """Stable 64-bit hash of integers (splitmix64 finaliser chained over the inputs).

    Never Python's ``hash()``: that is salted per process and would break replay."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h


def name_key(name: str) -> int:
    """Stable integer key of a decision name."""
    return zlib.crc32(name.encode())


class Strategy:
    """Base class.  Subclasses set ``name`` and override ``rank``/``choose``."""

    name = "base"
    #: True when ``rank(task_id, t) == task_id``; the engine then skips the call.
    rank_is_id = False
    #: True when simultaneous events are taken in rank order (``choose_tie`` is 0).
    tie_by_rank = True

    def rank(self, task_id: int, t: int) -> int:
        return task_id

    def choose(self, name: str, n: int) -> int:
        return 0

    def choose_tie(self, t: int, task_ids: tuple[int, ...]) -> int:
        return 0

    def describe(self) -> dict:
        return {"strategy": self.name}


class FifoStrategy(Strategy):
    """Always the first choice.

    Choices are listed in a canonical order: waiters in arrival order, simultaneous events
    in task-creation order (the task created first runs first)."""

    name = "fifo"
    rank_is_id = True


class RandomStrategy(Strategy):
    """Seeded random choices, reproducible across processes and granularities.

    Simultaneous events are ordered by a keyed hash of (seed, task, time): a fresh random
    permutation at every instant.  A named decision takes the hash of (seed, name,
    occurrence of that name)."""

    name = "random"

    def __init__(self, seed: int):
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.seed = seed
        self._occurrences: dict[str, int] = {}

    def rank(self, task_id: int, t: int) -> int:
        return mix64(self.seed, task_id, t)

    def choose(self, name: str, n: int) -> int:
        k = self._occurrences.get(name, 0)
        self._occurrences[name] = k + 1
        return mix64(self.seed, name_key(name), k) % n

    def describe(self) -> dict:
        return {"strategy": self.name, "seed": self.seed}


def make_strategy(name: str, seed: int) -> Strategy:
    """Strategy by name: ``fifo`` or ``random``."""
    if name == "fifo":
        return FifoStrategy()
    if name == "random":
        return RandomStrategy(seed)
    raise ValueError(f"unknown strategy {name!r}")
