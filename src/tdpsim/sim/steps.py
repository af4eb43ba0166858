"""Steps: an immutable sequence of steps with integer costs, queried in O(log segments).

A bulk (``engine.Bulk``) runs a sequence of loop steps; step i starts at the sum of the costs
of steps 0..i-1.  Instead of one running sum per step (O(n) memory and time to build), the
sequence is a tree of:

* ``Run(n, cost)``: n steps of the same cost (constant memory, n may be 10**10 or more);
* ``Costs(costs)``: an arbitrary array of costs, kept as its running sum (int64), bisected;
* ``Seq(parts)``: the parts one after the other, with the prefix sums of their step counts
  and durations, bisected;
* ``Repeat(part, times)``: ``part`` ``times`` times over, by integer division.

Invariants:

* every cost is an integer >= 1, so step start times strictly increase, and step i of a
  part starts at the part's start plus ``part.start_of(i)``;
* ``n`` and ``total`` are Python ints, and every query answers with exact integer
  arithmetic (no float; a ``Costs`` array's running sum must fit in int64);
* a structure never changes once built: ``prefix`` and the constructors share the parts
  (and a ``Costs`` array, which the caller must not change afterwards);
* ``Seq`` holds no empty part and no nested ``Seq`` (they are flattened), and merges
  neighbouring ``Run``s of the same cost and check flag.

Check points: a leaf's ``check`` flag says whether each of its steps is a loop-top check
point, where the kernel tests need_resched / rwlock_needbreak before running it (default:
every step is).  ``next_check(k)`` finds the next one.

Time of the queries, with P parts per ``Seq`` and d levels of nesting: ``start_of``,
``started_before``, ``next_check`` and ``cost_of`` O(d log P) (a ``Costs`` leaf: O(log n));
``prefix`` O(d P) (it copies the part list of the ``Seq``s it cuts).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from itertools import accumulate
from operator import index
from typing import Iterable

import numpy as np


class Steps(ABC):
    """Base of the step structures.  ``n`` steps, ``total`` ns; ``first_check`` is
    ``next_check(0)`` (n if no step is a check point)."""

    __slots__ = ("n", "total", "first_check")

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, n: int, total: int, first_check: int) -> None:
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "first_check", first_check)

    @staticmethod
    def from_costs(costs, check: bool = True) -> Costs:
        """The steps of an array of per-step costs (each >= 1)."""
        return Costs(costs, check)

    @staticmethod
    def from_cum(cum, check: bool = True) -> Costs:
        """The steps whose running sum of costs is ``cum`` (increasing, ``cum[0] >= 1``)."""
        return Costs.from_cum(cum, check)

    # ---- queries (defined by each structure) ----------------------------------------

    def start_of(self, k: int) -> int:
        """Sum of the costs of steps 0..k-1, k in [0, n] (``start_of(n) == total``)."""
        if 0 <= k < self.n:
            return self._start(k)
        if k == self.n:
            return self.total
        raise IndexError(k)

    def started_before(self, d: int) -> int:
        """Number of steps that start before time d (0 if d <= 0, n if d >= total)."""
        if d <= 0:
            return 0
        if d >= self.total:
            return self.n
        return self._started(d)

    @abstractmethod
    def _start(self, k: int) -> int:
        """``start_of`` for 0 <= k < n."""

    @abstractmethod
    def _started(self, d: int) -> int:
        """``started_before`` for 0 < d < total."""

    @abstractmethod
    def next_check(self, k: int) -> int:
        """The first check-point step at or after step k; n if there is none."""

    def cost_of(self, k: int) -> int:
        """Cost of step k, k in [0, n)."""
        if 0 <= k < self.n:
            return self._cost(k)
        raise IndexError(k)

    def prefix(self, m: int) -> Steps:
        """The first m steps (all of them if m >= n, none if m <= 0)."""
        return self if m >= self.n else self._prefix(max(m, 0))

    @abstractmethod
    def _cost(self, k: int) -> int:
        """``cost_of`` for 0 <= k < n."""

    @abstractmethod
    def _prefix(self, m: int) -> Steps:
        """``prefix`` for 0 <= m < n."""

    @abstractmethod
    def nodes(self) -> int:
        """Size of the structure: its nodes, a cost array counting one per element."""


class _Leaf(Steps):
    """A leaf: its steps are all check points, or none is (``check``)."""

    __slots__ = ("check",)

    def next_check(self, k: int) -> int:
        if k >= self.n or not self.check:
            return self.n
        return max(k, 0)


class Run(_Leaf):
    """n steps of cost ``cost`` each."""

    __slots__ = ("cost",)

    def __init__(self, n: int, cost: int, check: bool = True):
        n, cost = index(n), index(cost)
        if n < 0 or cost < 1:
            raise ValueError(f"Run({n}, {cost}): need n >= 0 and cost >= 1")
        object.__setattr__(self, "cost", cost)
        object.__setattr__(self, "check", bool(check))
        self._set(n, n * cost, 0 if check and n else n)

    def _start(self, k: int) -> int:
        return k * self.cost

    def _started(self, d: int) -> int:
        return -(-d // self.cost)

    def _cost(self, k: int) -> int:
        return self.cost

    def _prefix(self, m: int) -> Steps:
        return Run(m, self.cost, self.check)

    def nodes(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"Run({self.n}, {self.cost}{'' if self.check else ', check=False'})"


class Costs(_Leaf):
    """Steps of arbitrary costs, stored as their running sum ``cum`` (int64): step i ends at
    ``cum[i]``."""

    __slots__ = ("cum",)

    def __init__(self, costs, check: bool = True):
        a = np.asarray(costs)
        if a.ndim != 1 or len(a) and (a.dtype.kind not in "iu" or a.min() < 1):
            raise ValueError("costs must be a 1-d array of integers >= 1")
        costs = a.astype(np.int64, copy=False)
        self._init(np.cumsum(costs), check)

    @classmethod
    def from_cum(cls, cum, check: bool = True) -> Costs:
        """From the running sum itself (kept, not copied; not checked)."""
        self = cls.__new__(cls)
        self._init(np.asarray(cum, dtype=np.int64), check)
        return self

    def _init(self, cum: np.ndarray, check: bool) -> None:
        n = len(cum)
        object.__setattr__(self, "cum", cum)
        object.__setattr__(self, "check", bool(check))
        self._set(n, int(cum[-1]) if n else 0, 0 if check and n else n)

    def _start(self, k: int) -> int:
        return int(self.cum[k - 1]) if k else 0

    def _started(self, d: int) -> int:
        # step 0 starts at 0 < d; step i >= 1 starts at cum[i-1]
        return 1 + int(self.cum.searchsorted(d, "left"))

    def _cost(self, k: int) -> int:
        return int(self.cum[k]) - (int(self.cum[k - 1]) if k else 0)

    def _prefix(self, m: int) -> Steps:
        return Costs.from_cum(self.cum[:m], self.check)

    def nodes(self) -> int:
        return 1 + self.n

    def __repr__(self) -> str:
        return f"Costs(n={self.n}, total={self.total}{'' if self.check else ', check=False'})"


class Seq(Steps):
    """The parts' steps one after the other.  ``offs_n[i]`` / ``offs_t[i]``: steps and
    duration before part i (one more entry each: n, total)."""

    __slots__ = ("parts", "offs_n", "offs_t", "_next_ck")

    def __init__(self, parts: Iterable[Steps]):
        flat: list[Steps] = []
        for p in parts:
            for q in (p.parts if isinstance(p, Seq) else (p,)):
                if not q.n:
                    continue
                last = flat[-1] if flat else None
                if q.__class__ is Run and last.__class__ is Run and last.cost == q.cost \
                        and last.check == q.check:
                    flat[-1] = Run(last.n + q.n, q.cost, q.check)
                else:
                    flat.append(q)
        offs_n = [0, *accumulate(p.n for p in flat)]
        offs_t = [0, *accumulate(p.total for p in flat)]
        # _next_ck[i]: the first part j >= i with a check point (len(flat) if none)
        nxt = [len(flat)] * (len(flat) + 1)
        for i in range(len(flat) - 1, -1, -1):
            nxt[i] = i if flat[i].first_check < flat[i].n else nxt[i + 1]
        object.__setattr__(self, "parts", tuple(flat))
        object.__setattr__(self, "offs_n", offs_n)
        object.__setattr__(self, "offs_t", offs_t)
        object.__setattr__(self, "_next_ck", nxt)
        j = nxt[0]
        self._set(offs_n[-1], offs_t[-1],
                  offs_n[j] + flat[j].first_check if j < len(flat) else offs_n[-1])

    def _part(self, k: int) -> int:
        return bisect_right(self.offs_n, k) - 1

    def _start(self, k: int) -> int:
        i = self._part(k)
        return self.offs_t[i] + self.parts[i].start_of(k - self.offs_n[i])

    def _started(self, d: int) -> int:
        i = bisect_left(self.offs_t, d) - 1     # the last part starting before d
        return self.offs_n[i] + self.parts[i].started_before(d - self.offs_t[i])

    def next_check(self, k: int) -> int:
        if k <= 0:
            return self.first_check
        if k >= self.n:
            return self.n
        i = self._part(k)
        off = self.offs_n[i]
        c = self.parts[i].next_check(k - off)
        if c < self.parts[i].n:
            return off + c
        j = self._next_ck[i + 1]
        if j == len(self.parts):
            return self.n
        return self.offs_n[j] + self.parts[j].first_check

    def _cost(self, k: int) -> int:
        i = self._part(k)
        return self.parts[i].cost_of(k - self.offs_n[i])

    def _prefix(self, m: int) -> Steps:
        if m == 0:
            return Seq(())
        i = self._part(m)               # part i holds step m: keep its first steps only
        return Seq((*self.parts[:i], self.parts[i].prefix(m - self.offs_n[i])))

    def nodes(self) -> int:
        return 1 + sum(p.nodes() for p in self.parts)

    def __repr__(self) -> str:
        return f"Seq([{', '.join(map(repr, self.parts))}])"


class Repeat(Steps):
    """``part``'s steps ``times`` times over."""

    __slots__ = ("part", "times")

    def __init__(self, part: Steps, times: int):
        times = index(times)
        if times < 0:
            raise ValueError(f"Repeat: times {times} < 0")
        object.__setattr__(self, "part", part)
        object.__setattr__(self, "times", times)
        n = part.n * times
        first = part.first_check
        self._set(n, part.total * times, first if n and first < part.n else n)

    def _start(self, k: int) -> int:
        q, r = divmod(k, self.part.n)
        return q * self.part.total + self.part.start_of(r)

    def _started(self, d: int) -> int:
        q, r = divmod(d, self.part.total)       # d falls r ns into repetition q < times
        return q * self.part.n + self.part.started_before(r)

    def next_check(self, k: int) -> int:
        if k <= 0:
            return self.first_check
        if k >= self.n:
            return self.n
        part = self.part
        q, r = divmod(k, part.n)
        c = part.next_check(r)
        if c < part.n:
            return q * part.n + c
        if q + 1 < self.times and part.first_check < part.n:
            return (q + 1) * part.n + part.first_check
        return self.n

    def _cost(self, k: int) -> int:
        return self.part.cost_of(k % self.part.n)

    def _prefix(self, m: int) -> Steps:
        if m == 0:
            return Seq(())
        q, r = divmod(m, self.part.n)
        head = Repeat(self.part, q)
        return Seq((head, self.part.prefix(r))) if r else head

    def nodes(self) -> int:
        return 1 + self.part.nodes()

    def __repr__(self) -> str:
        return f"Repeat({self.part!r}, {self.times})"
