"""Run-length maps (sim/runs.py) against per-key reference models, under random operations."""

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from tdpsim.sim.runs import FreeStack, RunMap, ShardedRunMap

KEYS = 40
TAGS = st.sampled_from([None, "a", ("b", 1)])

assign_op = st.tuples(st.just("assign"), st.integers(0, KEYS), st.integers(0, KEYS),
                      st.integers(-3, 3), st.integers(-2, 2), TAGS)
many_op = st.tuples(st.just("many"),
                    st.lists(st.integers(0, KEYS - 1), unique=True, max_size=12),
                    st.integers(-3, 3), st.sampled_from([0, 1, -1, 2]), TAGS)


def _apply(m: RunMap, ref: list, op) -> None:
    if op[0] == "assign":
        _, a, b, value, step, tag = op
        step = step if m.affine else 0
        m.assign(a, b, value, step, tag)
        for k in range(a, b):
            ref[k] = (value + step * (k - a), tag)
    else:
        _, keys, v0, dv, tag = op
        vals = [v0 + dv * j for j in range(len(keys))]
        m.assign_many(np.array(keys, dtype=np.int64), np.array(vals, dtype=np.int64), tag)
        for k, v in zip(keys, vals):
            ref[k] = (v, tag)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(assign_op, many_op), max_size=25))
@example([("assign", 0, 5, 10, 1, None), ("assign", 2, 3, 12, 0, None)])  # rejoins
@example([("many", [3, 4, 5, 7], 0, 1, "a"), ("assign", 6, 7, 3, 0, "a")])
@pytest.mark.parametrize("affine", [True, False])
def test_runmap_matches_per_key_model(affine, ops):
    m, ref = RunMap(affine=affine), [(0, None)] * (KEYS + 2)
    for op in ops:
        _apply(m, ref, op)
        m._check()
        assert affine or not any(m._step), "a constant map holds constant runs"
    assert [m.get(k) for k in range(KEYS + 2)] == ref
    vals, idx = m.values(np.arange(KEYS + 2)), m.runs_of(np.arange(KEYS + 2))
    assert vals.tolist() == [v for v, _ in ref]
    for lo in range(0, KEYS, 7):               # a few runs at a time, or one
        assert m.values(np.arange(lo, lo + 3)).tolist() == [v for v, _ in ref[lo:lo + 3]]
    assert [m.tag_at(int(i)) for i in idx] == [t for _, t in ref]
    # runs() clipped to a window covers it exactly, with the same values
    got = []
    for lo, hi, v, step, tag in m.runs(3, 30):
        got += [(v + step * (k - lo), tag) for k in range(lo, hi)]
    assert got == ref[3:30]


@settings(max_examples=200, deadline=None)
@given(st.lists(assign_op, max_size=25))
def test_sharded_runmap_reads_as_one_runmap(ops):
    """Shards of 8 keys: runs crossing shard edges read the same as in one map."""
    m, ref = ShardedRunMap(bits=3), [(0, None)] * (KEYS + 2)
    assert m.empty()
    for _, a, b, value, step, tag in ops:
        if a < b:
            m.assign(a, b, value, step, tag)
            for k in range(a, b):
                ref[k] = (value + step * (k - a), tag)
    assert [m.get(k) for k in range(KEYS + 2)] == ref
    got = []
    for lo, hi, v, step, tag in m.runs(3, 30):
        got += [(v + step * (k - lo), tag) for k in range(lo, hi)]
    assert got == ref[3:30]


def test_uniform_state_is_one_run():
    m = RunMap(-1)
    for k in range(100):                    # page by page, consecutive values: one run
        m.assign(k, k + 1, 500 + k)
    assert len(m) == 2 and m.get(99) == (599, None) and m.get(100) == (-1, None)
    m.assign(50, 51, 7)                     # a divergent key splits it
    assert len(m) == 4
    m.assign(50, 51, 550)                   # and putting it back merges again
    assert len(m) == 2


push_op = st.tuples(st.just("push"), st.lists(st.integers(1, 30), max_size=8))
pop_op = st.tuples(st.just("pop"), st.integers(0, 8))
drop_op = st.tuples(st.just("drop"), st.integers(0, 8))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(push_op, pop_op, drop_op), max_size=30))
@example([("push", [5, 6, 7]), ("pop", 2), ("push", [6, 5]), ("pop", 3)])
def test_freestack_is_a_lifo_stack(ops):
    fs, ref = FreeStack(), []
    for kind, arg in ops:
        if kind == "push":
            if len(arg) == 1:
                fs.push(arg[0])
            else:
                fs.push_many(np.array(arg, dtype=np.int64))
            ref += arg
        elif kind == "drop":                # look at the top runs, then pop them
            k = min(arg, len(ref))
            seen = [p + d * j for p, d, c in fs.top_runs(k) for j in range(c)]
            assert seen == ref[::-1][:k]
            fs.drop(k)
            del ref[len(ref) - k:]
        else:
            k = min(arg, len(ref))
            if k == 1:
                assert fs.pop() == ref.pop()
            else:
                want = ref[::-1][:k]
                del ref[len(ref) - k:]
                assert fs.pop_many(k).tolist() == want
        assert len(fs) == len(ref)


def test_freestack_runs_are_compact():
    fs = FreeStack()
    fs.push_many(np.arange(1000, 0, -1))
    fs.push_many(np.arange(2000, 3000))
    assert len(fs._runs) == 2 and len(fs) == 2000
    assert fs.pop_many(3).tolist() == [2999, 2998, 2997]
