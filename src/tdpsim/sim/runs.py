"""Run-length maps: per-page state that costs per run of equal pages, not per page.

A ``RunMap`` maps every integer key k >= 0 to ``(value, tag)``, stored as runs: the run
that starts at ``s`` (and ends where the next one starts) gives key k the value
``base + step * (k - s)`` and its ``tag``.  Affine values say "consecutive host pages" or
"one generation for all" in one run; the tag carries what is equal across a run (state,
owner).  Assigning a range splits the runs at its ends and merges it with neighbours that
continue it, so the map stays as short as the state is uniform: a 128 GiB memfd mapped in
one go is one run, not 32 M array cells.

Invariants (checked by ``_check``, used by the property tests): run starts strictly
increase from 0, and no two neighbouring runs of several keys could be one (same tag and
step, the second's values continuing the first's).  Assigning a key next to a run it
continues joins that run (a one-key run takes whatever step its neighbour needs).

``FreeStack`` is a LIFO stack of page numbers stored as arithmetic runs (step +1 or -1),
for the host allocator's free list: pushing the pages of a freed run, or popping a run of
them, costs per run.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Iterator

import numpy as np


class RunMap:
    """Integer keys [0, inf) to ``(base + step * (k - start), tag)``, by runs."""

    __slots__ = ("_start", "_base", "_step", "_tag", "_np", "affine")

    def __init__(self, value: int = 0, tag: Any = None, affine: bool = True):
        #: False: every run is constant (step 0), e.g. flags
        self.affine = affine
        self._start = [0]
        self._base = [value]
        self._step = [0]
        self._tag = [tag]
        self._np = None                 # cached (starts, bases, steps) arrays

    def __len__(self) -> int:
        """Number of runs."""
        return len(self._start)

    # ---- reads -----------------------------------------------------------------------------

    def get(self, k: int) -> tuple[int, Any]:
        """``(value, tag)`` of key ``k``."""
        i = bisect_right(self._start, k) - 1
        return self._base[i] + self._step[i] * (k - self._start[i]), self._tag[i]

    def value(self, k: int) -> int:
        i = bisect_right(self._start, k) - 1
        return self._base[i] + self._step[i] * (k - self._start[i])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._np is None:
            self._np = (np.array(self._start, dtype=np.int64),
                        np.array(self._base, dtype=np.int64),
                        np.array(self._step, dtype=np.int64))
        return self._np

    def values(self, keys: np.ndarray) -> np.ndarray:
        """Values of many keys (non-negative int64)."""
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return keys.copy()
        st = self._start
        i = bisect_right(st, int(keys.min())) - 1
        j = bisect_right(st, int(keys.max()))
        if j - i == 1:                  # all in one run (the usual case: one table's pages)
            return self._base[i] + self._step[i] * (keys - st[i])
        if self._np is None and j - i <= 64:
            # the map changed since the arrays were built: arrays of these runs only
            sub = np.array(st[i:j], dtype=np.int64)
            r = np.searchsorted(sub, keys, side="right") - 1
            return np.array(self._base[i:j], dtype=np.int64)[r] + \
                np.array(self._step[i:j], dtype=np.int64)[r] * (keys - sub[r])
        sta, ba, sp = self._arrays()
        r = np.searchsorted(sta, keys, side="right") - 1
        return ba[r] + sp[r] * (keys - sta[r])

    def constant_over(self, lo: int, hi: int) -> int | None:
        """The value of keys [lo, hi] if they all lie in one run of step 0, else None."""
        st = self._start
        i = bisect_right(st, lo) - 1
        if (i + 1 == len(st) or st[i + 1] > hi) and not self._step[i]:
            return self._base[i]
        return None

    def runs_of(self, keys: np.ndarray) -> np.ndarray:
        """The index of the run of each key (for ``tag_at``)."""
        sta = self._arrays()[0]
        return np.searchsorted(sta, np.asarray(keys, dtype=np.int64), side="right") - 1

    def tag_at(self, run: int) -> Any:
        """The tag of run number ``run`` (as ``runs_of`` gives them)."""
        return self._tag[run]

    def runs(self, a: int, b: int) -> Iterator[tuple[int, int, int, int, Any]]:
        """The runs over keys [a, b), clipped: ``(lo, hi, value at lo, step, tag)``."""
        st = self._start
        i = bisect_right(st, a) - 1
        n = len(st)
        while i < n and st[i] < b:
            lo = max(a, st[i])
            hi = min(b, st[i + 1]) if i + 1 < n else b
            yield lo, hi, self._base[i] + self._step[i] * (lo - st[i]), self._step[i], \
                self._tag[i]
            i += 1

    # ---- writes ----------------------------------------------------------------------------

    def _split(self, k: int) -> int:
        """Make a run start at ``k``; returns its index."""
        st = self._start
        i = bisect_right(st, k) - 1
        if st[i] == k:
            return i
        st.insert(i + 1, k)
        self._base.insert(i + 1, self._base[i] + self._step[i] * (k - st[i]))
        self._step.insert(i + 1, self._step[i])
        self._tag.insert(i + 1, self._tag[i])
        return i + 1

    def _join_step(self, i: int) -> int | None:
        """The step of runs i and i + 1 as one run, or None if they cannot be one (a
        one-key run takes whatever step its neighbour needs)."""
        st, ba, sp = self._start, self._base, self._step
        if self._tag[i] != self._tag[i + 1]:
            return None
        if not self.affine:
            return 0 if ba[i] == ba[i + 1] else None
        n_i = st[i + 1] - st[i]
        one_j = i + 2 < len(st) and st[i + 2] - st[i + 1] == 1
        if n_i == 1 and one_j:
            return ba[i + 1] - ba[i]
        if n_i == 1:
            return sp[i + 1] if ba[i] + sp[i + 1] == ba[i + 1] else None
        if one_j or sp[i] == sp[i + 1]:
            return sp[i] if ba[i] + sp[i] * n_i == ba[i + 1] else None
        return None

    def _drop(self, i: int, j: int) -> None:
        del self._start[i:j], self._base[i:j], self._step[i:j], self._tag[i:j]

    def assign(self, a: int, b: int, value: int, step: int = 0, tag: Any = None) -> None:
        """Keys [a, b) become ``value + step * (k - a)`` with ``tag``."""
        if b <= a:
            return
        assert self.affine or not step, "a constant map takes constant runs"
        self._np = None
        if b == a + 1 and self._grow_neighbour(a, value, tag):
            return
        j = self._split(b)
        n = len(self._start)
        i = self._split(a)
        j += len(self._start) - n
        # runs i .. j-1 become one
        self._drop(i + 1, j)
        self._base[i], self._step[i], self._tag[i] = value, step, tag
        self._joins_at(i)

    def _grow_neighbour(self, k: int, value: int, tag: Any) -> bool:
        """Fast path of a one-key assignment (a page allocated or freed next to pages in
        the same state): if key ``k`` is at an end of its run and the neighbour run on
        that side continues to ``value``, move the boundary by one key.  False if not."""
        st, ba, sp, tg = self._start, self._base, self._step, self._tag
        i = bisect_right(st, k) - 1
        last = i + 1 == len(st)
        if st[i] == k and i and tg[i - 1] == tag and ba[i - 1] + sp[i - 1] * (k - st[i - 1]) \
                == value:
            if not last and st[i + 1] == k + 1:       # run i was just k: it goes
                self._drop(i, i + 1)
            else:
                st[i] = k + 1
                ba[i] += sp[i]
            self._joins_at(i)
            return True
        if not last and st[i + 1] == k + 1 and tg[i + 1] == tag and \
                ba[i + 1] - sp[i + 1] == value:
            if st[i] == k:                              # run i was just k: it goes
                self._drop(i, i + 1)
                st[i], ba[i] = k, value
                self._joins_at(i)
            else:
                st[i + 1], ba[i + 1] = k, value
                self._joins_at(i + 1)
            return True
        return False

    def _joins_at(self, i: int) -> None:
        """Merge runs around run i where they can be one (after run i changed).  A one-key
        run that merges takes a step, which may let the merged run join the next one, so
        this repeats over the few runs around i until nothing merges."""
        k = max(i - 2, 0)
        while k < min(i + 2, len(self._start) - 1):
            step = self._join_step(k)
            if step is None:
                k += 1
                continue
            self._step[k] = step
            self._drop(k + 1, k + 2)
            i -= 1
            k = max(k - 1, 0)

    def assign_many(self, keys: np.ndarray, values: np.ndarray, tag: Any = None) -> None:
        """Each of ``keys`` (distinct) becomes its entry of ``values``, with ``tag``: one
        assignment per run of consecutive keys whose values go by a constant step."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        k = np.asarray(keys, dtype=np.int64)[order]
        v = np.asarray(values, dtype=np.int64)[order]
        dk, dv = np.diff(k), np.diff(v)
        # cut after element i where keys jump or the value step changes
        cut = dk != 1
        cut[1:] |= dv[1:] != dv[:-1]
        cuts = [0, *(np.flatnonzero(cut) + 1).tolist(), len(k)]
        for a, b in zip(cuts, cuts[1:]):
            if a >= b:
                continue
            step = int(v[a + 1] - v[a]) if b - a > 1 else 0
            if step and not self.affine:      # a constant map: one run per equal value
                for x in range(a, b):
                    self.assign(int(k[x]), int(k[x]) + 1, int(v[x]), 0, tag)
                continue
            self.assign(int(k[a]), int(k[b - 1]) + 1, int(v[a]), step, tag)

    def _check(self) -> None:
        st = self._start
        assert st[0] == 0 and all(x < y for x, y in zip(st, st[1:])), "run starts"
        ends = st[1:] + [st[-1] + 2]               # the last run is unbounded
        for i in range(len(st) - 2):
            if ends[i] - st[i] > 1 and ends[i + 1] - st[i + 1] > 1 \
                    and self._step[i] == self._step[i + 1]:
                assert self._join_step(i) is None, f"unmerged runs at {st[i + 1]}"


class ShardedRunMap:
    """A ``RunMap`` cut into shards of ``2**bits`` keys, each a ``RunMap`` of its own made
    when first written: the same reads, but an update costs by the runs of its shard, not
    of the whole map (a run map with runs spread over millions of keys, e.g. one per
    run of page tables, would otherwise move long lists at every insertion)."""

    __slots__ = ("_shards", "_value", "_tag", "bits")

    def __init__(self, value: int = 0, tag: Any = None, bits: int = 16):
        self._shards: dict[int, RunMap] = {}
        self._value, self._tag, self.bits = value, tag, bits

    def empty(self) -> bool:
        """Nothing was ever written (every key has the default)."""
        return not self._shards

    def get(self, k: int) -> tuple[int, Any]:
        sh = self._shards.get(k >> self.bits)
        return (self._value, self._tag) if sh is None else sh.get(k)

    def assign(self, a: int, b: int, value: int, step: int = 0, tag: Any = None) -> None:
        """``RunMap.assign`` over keys [a, b)."""
        bits = self.bits
        for s in range(a >> bits, ((b - 1) >> bits) + 1):
            lo, hi = max(a, s << bits), min(b, (s + 1) << bits)
            sh = self._shards.get(s)
            if sh is None:
                sh = self._shards[s] = RunMap(self._value, self._tag)
            sh.assign(lo, hi, value + step * (lo - a), step, tag)

    def runs(self, a: int, b: int) -> Iterator[tuple[int, int, int, int, Any]]:
        """``RunMap.runs`` over keys [a, b) (runs cut at shard edges)."""
        bits = self.bits
        for s in range(a >> bits, ((b - 1) >> bits) + 1):
            lo, hi = max(a, s << bits), min(b, (s + 1) << bits)
            sh = self._shards.get(s)
            if sh is None:
                yield lo, hi, self._value, 0, self._tag
            else:
                yield from sh.runs(lo, hi)


class FreeStack:
    """A LIFO stack of page numbers, as runs ``[first, last, d]``: the pages first,
    first + d, ..., last were pushed in that order (d is +1 or -1; 0 for a single page)
    and pop from ``last``."""

    __slots__ = ("_runs", "n")

    def __init__(self):
        self._runs: list[list[int]] = []
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def push_run(self, first: int, count: int, d: int) -> None:
        """Push first, first + d, ..., count pages, in that order."""
        if count <= 0:
            return
        if count == 1:
            d = 0
        r = self._runs
        last = first + d * (count - 1)
        if r:
            top = r[-1]
            td = top[2] or (first - top[1] if abs(first - top[1]) == 1 else 0)
            if td and first == top[1] + td and (d == 0 or d == td):
                top[1], top[2] = last, td
                self.n += count
                return
        r.append([first, last, d])
        self.n += count

    def push(self, p: int) -> None:
        self.push_run(p, 1, 0)

    def push_many(self, pages: np.ndarray) -> None:
        """Push ``pages`` in order (one run per stretch going up or down by one)."""
        pages = np.asarray(pages, dtype=np.int64)
        n = len(pages)
        if not n:
            return
        d = np.diff(pages)
        # cut after element i where the difference is not +-1, or changes
        cut = np.abs(d) != 1
        cut[1:] |= d[1:] != d[:-1]
        cuts = [0, *(np.flatnonzero(cut) + 1).tolist(), n]
        for a, b in zip(cuts, cuts[1:]):
            if a < b:
                self.push_run(int(pages[a]), b - a, int(d[a]) if b - a > 1 else 0)

    def pop(self) -> int:
        top = self._runs[-1]
        p = top[1]
        if p == top[0]:
            self._runs.pop()
        else:
            top[1] -= top[2]
        self.n -= 1
        return p

    def top_runs(self, k: int) -> list[tuple[int, int, int]]:
        """The next ``k`` pages ``pop`` would give (at most the stack's), without popping
        them, as runs ``(first, step, count)``: first, first + step, ... (step +-1)."""
        out = []
        for first, last, d in reversed(self._runs):
            if k <= 0:
                break
            count = (last - first) * d + 1 if d else 1
            take = min(count, k)
            out.append((last, -d or 1, take))
            k -= take
        return out

    def drop(self, k: int) -> None:
        """Pop the next ``k`` pages (as ``pop_many`` would, without returning them)."""
        r = self._runs
        self.n -= k
        while k:
            first, last, d = r[-1]
            count = (last - first) * d + 1 if d else 1
            if count <= k:
                r.pop()
                k -= count
            else:
                r[-1][1] = last - d * k
                k = 0

    def pop_many(self, k: int) -> np.ndarray:
        """The next ``k`` pages ``pop`` would give, in that order."""
        out = np.empty(k, dtype=np.int64)
        j = 0
        r = self._runs
        while j < k:
            first, last, d = r[-1]
            count = (last - first) * d + 1 if d else 1
            take = min(count, k - j)
            out[j:j + take] = last - d * np.arange(take, dtype=np.int64)
            j += take
            if take == count:
                r.pop()
            else:
                r[-1][1] = last - d * take
        self.n -= k
        return out
