"""Step structures (``sim.steps``): every query against a NumPy reference built from the same
random costs, huge structures in constant space, and bulks of any structure settling as
bulks of the equivalent cost array do."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdpsim.sim.engine import Bulk, Engine, Resource
from tdpsim.sim.loop import run_loop
from tdpsim.sim.steps import Costs, Repeat, Run, Seq, Steps

# ---- random structures, each with its expansion: (structure, costs, check flags) ----------


def _run(n, cost, check):
    return Run(n, cost, check), [cost] * n, [check] * n


def _costs(costs, check, via_cum):
    s = (Steps.from_cum(np.cumsum(np.array(costs, dtype=np.int64)), check) if via_cum
         else Steps.from_costs(costs, check))
    return s, costs, [check] * len(costs)


def _seq(items):
    return (Seq([s for s, _, _ in items]), [c for _, cs, _ in items for c in cs],
            [k for _, _, ks in items for k in ks])


def _repeat(item, times):
    s, cs, ks = item
    return Repeat(s, times), cs * times, ks * times


leaves = (st.builds(_run, st.integers(0, 5), st.integers(1, 9), st.booleans())
          | st.builds(_costs, st.lists(st.integers(1, 9), max_size=6), st.booleans(),
                      st.booleans()))
structures = st.recursive(
    leaves,
    lambda kids: (st.builds(_seq, st.lists(kids, max_size=4))
                  | st.builds(_repeat, kids, st.integers(0, 4))),
    max_leaves=10)


def assert_matches(s: Steps, costs: list[int], checks: list[bool]) -> None:
    """Every query of ``s`` agrees with the cumsum reference of ``costs``/``checks``."""
    c = np.array(costs, dtype=np.int64)
    n = len(c)
    starts = np.concatenate(([0], np.cumsum(c))).astype(np.int64)   # starts[n] = total
    checkpoints = np.flatnonzero(np.array(checks, dtype=bool))
    assert s.n == n
    assert s.total == int(starts[n])
    assert type(s.n) is int and type(s.total) is int
    for k in range(n + 1):
        assert s.start_of(k) == int(starts[k])
        assert type(s.start_of(k)) is int
    ds = {-1, 0, 1, int(starts[n]) + 1}
    if starts[n] <= 200:
        ds.update(range(int(starts[n]) + 2))
    else:
        ds.update(int(x) + e for x in starts for e in (-1, 0, 1))
    for d in ds:
        assert s.started_before(d) == int(np.count_nonzero(starts[:n] < d)), d
    for k in range(-1, n + 2):
        later = checkpoints[checkpoints >= k]
        assert s.next_check(k) == (int(later[0]) if len(later) else n), k
    assert s.first_check == s.next_check(0)
    for k in range(n):
        assert s.cost_of(k) == costs[k]
    for bad in (-1, n + 1):
        with pytest.raises(IndexError):
            s.start_of(bad)
    for bad in (-1, n):
        with pytest.raises(IndexError):
            s.cost_of(bad)


@settings(max_examples=400, deadline=None)
@given(structures)
def test_queries_match_cumsum_reference(item):
    assert_matches(*item)


@settings(max_examples=200, deadline=None)
@given(structures, st.data())
def test_prefix_is_the_first_m_steps(item, data):
    s, costs, checks = item
    for m in {-1, 0, 1, s.n - 1, s.n, s.n + 1,
              data.draw(st.integers(0, max(s.n, 0)), label="m")}:
        p = s.prefix(m)
        m0 = max(0, min(m, s.n))
        assert_matches(p, costs[:m0], checks[:m0])
        if m0 > 1:                      # a prefix of a prefix
            assert_matches(p.prefix(m0 - 1), costs[:m0 - 1], checks[:m0 - 1])


def _seq_nodes(s):
    if isinstance(s, Seq):
        yield s
        for p in s.parts:
            yield from _seq_nodes(p)
    elif isinstance(s, Repeat):
        yield from _seq_nodes(s.part)


@settings(max_examples=200, deadline=None)
@given(structures)
def test_seq_is_flat_without_empty_parts_and_merges_equal_runs(item):
    for q in _seq_nodes(item[0]):
        assert all(p.n > 0 and not isinstance(p, Seq) for p in q.parts)
        for a, b in zip(q.parts, q.parts[1:]):
            assert not (isinstance(a, Run) and isinstance(b, Run) and a.cost == b.cost
                        and a.check == b.check)


def test_next_check_enters_a_part_whose_first_step_is_not_a_check_point():
    tail = Repeat(Seq([Run(2, 1, check=False), Run(1, 4)]), 3)     # checks at 2, 5, 8 of it
    s = Seq([Run(2, 3), Run(1, 5, check=False), tail])
    assert [s.next_check(k) for k in range(s.n + 1)] == [0, 1, 5, 5, 5, 5, 8, 8, 8, 11, 11, 11,
                                                         12]


def test_structures_are_immutable_and_costs_validated():
    r = Run(3, 2)
    with pytest.raises(AttributeError):
        r.n = 4
    with pytest.raises(AttributeError):
        del r.total
    for bad in (lambda: Run(3, 0), lambda: Run(-1, 1), lambda: Costs([1, 0, 2]),
                lambda: Repeat(r, -1)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        Run(3, 1.5)                     # integer costs only
    with pytest.raises(ValueError):
        Costs([1, 2.5])


# ---- huge structures ----------------------------------------------------------------------

PART_COSTS = [5, 5, 5, 1, 2, 3, 7, 7]
PART_CHECKS = [True] * 6 + [False] * 2


def _part():
    return Seq([Run(3, 5), Costs([1, 2, 3]), Run(2, 7, check=False)])


def test_ten_billion_steps_in_constant_space():
    big = Repeat(Repeat(_part(), 100_000), 20_000)            # 1.6e10 steps
    pn, pt = len(PART_COSTS), sum(PART_COSTS)
    pstart = np.concatenate(([0], np.cumsum(PART_COSTS)))
    n = pn * 2 * 10**9
    assert big.n == n and big.total == pt * 2 * 10**9
    assert big.nodes() < 20

    def start(k):
        return k // pn * pt + int(pstart[k % pn])

    rng = np.random.default_rng(1)
    ks = [0, 1, 5, 6, 7, 8, n // 2, n - 9, n - 3, n - 2, n - 1] \
        + [int(x) for x in rng.integers(0, n, 200)]
    for k in ks:
        assert big.start_of(k) == start(k)
        assert big.cost_of(k) == PART_COSTS[k % pn]
        assert big.started_before(start(k)) == k
        assert big.started_before(start(k) + 1) == k + 1
        assert big.next_check(k) == (k if PART_CHECKS[k % pn]
                                     else min(n, k - k % pn + pn))
        p = big.prefix(k + 1)
        assert p.n == k + 1 and p.total == start(k + 1)
        assert p.started_before(p.total) == k + 1 and p.start_of(k) == start(k)
        assert p.nodes() < 40
    assert big.start_of(n) == big.total
    assert big.started_before(big.total + 10**30) == n


def test_huge_runs_in_a_sequence():
    s = Seq([Run(10**10, 3), Run(5, 1, check=False), Run(10**12, 2, check=False), Run(1, 9)])
    assert s.n == 10**10 + 5 + 10**12 + 1
    assert s.total == 3 * 10**10 + 5 + 2 * 10**12 + 9
    assert s.nodes() == 5
    assert s.started_before(3 * 10**10 + 5 + 1) == 10**10 + 5 + 1
    assert s.next_check(10**10) == s.n - 1                  # skips 1e12 unchecked steps
    assert s.cost_of(s.n - 1) == 9 and s.cost_of(10**10 + 4) == 1
    assert s.prefix(10**10 + 7).total == 3 * 10**10 + 5 + 4


# ---- in the engine ------------------------------------------------------------------------


def test_bulk_accepts_pairs_arrays_and_structures():
    cs = [3, 3, 3, 3]
    for costs in ((4, 3), cs, Steps.from_cum(np.cumsum(cs)), Run(4, 3)):
        b = Bulk(costs, lambda k: None, [])
        assert b.n == 4 and [b.start_of(k) for k in range(5)] == [0, 3, 6, 9, 12]
    s = Repeat(Run(2, 1), 3)
    assert Bulk(s, lambda k: None, []).steps is s


def _settle_scenario(mode: str, steps: Steps, costs: list[int], read_at: int,
                     reader_first: bool):
    """An adder does one step per cost (+1 each); a reader settles at ``read_at``.  ``mode``:
    'exact', 'steps' (one bulk of ``steps``, then arrays) or 'array' (arrays only)."""
    eng = Engine(granularity="exact" if mode == "exact" else "fast")
    res = Resource()
    state = {"v": 0}
    done_by_bulk = []

    def apply(k):
        state["v"] += k

    def adder():
        if mode == "exact":
            for c in costs:
                state["v"] += 1
                yield c
            return
        done = 0
        while done < len(costs):
            first = steps if mode == "steps" and done == 0 else costs[done:]
            k = yield Bulk(first, apply, [res])
            done_by_bulk.append(k)
            done += k

    seen = []

    def reader():
        yield read_at
        if res.bulks:
            eng.settle(res)
        seen.append((eng.now, state["v"]))

    tasks = [(adder(), "adder"), (reader(), "reader")]
    for gen, name in (tasks[::-1] if reader_first else tasks):
        eng.spawn(gen, name)
    eng.run()
    return seen, state["v"], eng.now, done_by_bulk


@settings(max_examples=300, deadline=None)
@given(structures, st.data(), st.booleans())
def test_a_bulk_of_any_structure_settles_like_exact_mode(item, data, reader_first):
    s, costs, _ = item
    if s.n == 0:
        return
    read_at = data.draw(st.integers(0, s.total + 2), label="read_at")
    exact = _settle_scenario("exact", s, costs, read_at, reader_first)
    by_steps = _settle_scenario("steps", s, costs, read_at, reader_first)
    by_array = _settle_scenario("array", s, costs, read_at, reader_first)
    assert by_steps == by_array                 # the same k at every settle
    assert by_steps[:3] == exact[:3]


@pytest.mark.parametrize("costs", [(10**10, 3), Repeat(Run(10**5, 3), 10**5)])
def test_a_bulk_of_ten_billion_steps_settles(costs):
    eng = Engine(granularity="fast")
    res = Resource()
    applied = []

    def looper():
        k = yield Bulk(costs, applied.append, [res])
        applied.append(("resumed", k, eng.now))

    def reader():
        yield 3 * 10**9 + 1
        eng.settle(res)

    eng.spawn(looper(), "looper")
    eng.spawn(reader(), "reader")
    eng.run()
    k = 10**9 + 1                       # steps starting before 3e9 + 1: 0, 3, ..., 3e9
    assert applied == [k, ("resumed", k, 3 * k)]


def _loop_scenario(fast: bool, costs, n: int, deadline: int, read_at: int):
    """``run_loop`` of n iterations stopping at a time-based deadline; a reader settles."""
    eng = Engine(granularity="fast" if fast else "exact")
    res = Resource()
    done = []
    out = []

    def looper():
        i = yield from run_loop(eng, n, costs, lambda i, j: done.extend(range(i, j)),
                                lambda: eng.now >= deadline, lambda: deadline, [res])
        out.append((i, eng.now))

    def reader():
        yield read_at
        if res.bulks:
            eng.settle(res)
        out.append((len(done), eng.now))

    eng.spawn(looper(), "looper")
    eng.spawn(reader(), "reader")
    eng.run()
    return out, done


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(1, 9), st.lists(st.integers(1, 9), min_size=1, max_size=40)),
       st.data())
def test_run_loop_fast_matches_exact(costs, data):
    n = len(costs) if isinstance(costs, list) else data.draw(st.integers(1, 40), label="n")
    total = sum(costs) if isinstance(costs, list) else costs * n
    deadline = data.draw(st.integers(0, total + 2), label="deadline")
    read_at = data.draw(st.integers(0, total + 2), label="read_at")
    assert _loop_scenario(True, costs, n, deadline, read_at) \
        == _loop_scenario(False, costs, n, deadline, read_at)
