"""The page-table store's interface (mmu/store.py) against a reference model.

Random sequences of store operations (table allocation, frees, entry and range writes,
bit sets and clears, freezes) run on a store and on a plain model (a dict of 512-entry
lists per table); after every operation each read the store offers must agree with the
model.  Every store layout is tested the same way (``STORES``): the layout-independent
contract is what lets the rest of tdpsim stay unaware of the layout."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tdpsim.host.host import Host
from tdpsim.host.memory import POISON
from tdpsim.mmu import spte as S
from tdpsim.mmu.page import make_role
from tdpsim.mmu.store import CompactStore, DenseStore

STORES = [DenseStore, CompactStore]
N = S.SPTE_ENTRIES
REMOVED = S.REMOVED_SPTE

#: a few SPTE values of every kind: empty, leaves (with and without A/D/W), a table
#: pointer, REMOVED
VALUES = [0, S.make_spte(7, 1, True), S.make_spte(8, 1, False), S.make_spte(9, 1, True)
          & ~(S.SHADOW_ACCESSED | S.SHADOW_DIRTY), S.make_nonleaf_spte(5), REMOVED,
          S.make_spte(1 << 20, 2, True)]
BITS = [S.EPT_W, S.SHADOW_DIRTY, S.SHADOW_ACCESSED, S.SHADOW_ACCESSED | S.SHADOW_DIRTY]

#: entry indices: the edges of a table and of its halves are where layouts split runs
index = st.sampled_from([0, 1, 2, 255, 256, 510, 511]) | st.integers(0, N - 1)
ranges = st.tuples(index, st.sampled_from([1, 2, 3, 256, N]) | st.integers(1, N)).map(
    lambda t: (t[0], min(N, t[0] + t[1])))
writes = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 7), index, st.sampled_from(VALUES),
              st.integers(0, 3)),
    st.tuples(st.just("fill"), st.integers(0, 7), ranges, st.sampled_from(VALUES),
              st.integers(0, 9), st.booleans()))
#: runs of consecutive host pages with equal flags (what faults install), and bit updates
#: over the last such run of a table: the cases compact layouts keep compact
runs = st.one_of(
    st.tuples(st.just("fill_run"), st.integers(0, 7), ranges, st.integers(1, 1 << 20),
              st.sampled_from([True, False]), st.integers(0, 3)),
    # right after the last run: continuing its PFNs and generation, or not quite
    st.tuples(st.just("fill_next"), st.integers(0, 7), st.integers(1, 64),
              st.sampled_from([0, 0, 1, -1]), st.sampled_from([0, 0, 1])),
    st.tuples(st.just("bits_run"), st.integers(0, 7), st.booleans(), st.sampled_from(BITS),
              st.sampled_from([-1, 0, 0, 1]), st.sampled_from([-1, 0, 0, 1])),
    st.tuples(st.just("zero_run"), st.integers(0, 7), st.sampled_from([-1, 0, 0, 1]),
              st.sampled_from([-1, 0, 0, 1])))
ops = st.one_of(
    writes, writes, runs, runs,     # twice as likely as the rest
    st.tuples(st.just("alloc"), st.integers(1, 4)),
    st.tuples(st.just("alloc"), st.just(1)),       # leaf tables: the compact layouts' case
    st.tuples(st.just("free"), st.integers(0, 7)),
    st.tuples(st.just("write"), st.integers(0, 7), index, st.sampled_from(VALUES),
              st.integers(0, 3)),
    st.tuples(st.just("fill"), st.integers(0, 7), ranges, st.sampled_from(VALUES),
              st.integers(1, 9), st.booleans()),
    st.tuples(st.just("set_bits"), st.integers(0, 7), ranges, st.sampled_from(BITS)),
    st.tuples(st.just("clear_bits"), st.integers(0, 7), ranges, st.sampled_from(BITS)),
    st.tuples(st.just("freeze"), st.integers(0, 7), st.booleans()),
)


class Model:
    """The reference: every table as two plain lists."""

    def __init__(self):
        self.spt: dict[int, list[int]] = {}
        self.gens: dict[int, list[int]] = {}


def _check(store, model, sps):
    for sp in sps:
        if sp.freed:
            assert (store.entries(sp) == np.uint64(POISON)).all()
            assert store.lookup(sp.pfn) is not sp        # the PFN may be reused
            continue
        spt, gens = model.spt[sp.id], model.gens[sp.id]
        assert store.entries(sp).tolist() == spt
        assert store.gens_at(sp, slice(None), 0, N).tolist() == gens
        for i in (0, 1, 255, 511):
            assert store.read(sp, i) == spt[i] and store.gen(sp, i) == gens[i]
        assert store.count_present(sp) == sum(
            1 for v in spt if S.is_shadow_present_pte(v))
        assert store.lookup(sp.pfn) is sp
    live = [sp for sp in sps if not sp.freed]
    assert store.live == len(live) and store.allocated == len(sps)


@pytest.mark.parametrize("cls", STORES)
@settings(max_examples=400, deadline=None)
@given(seq=st.lists(ops, min_size=4, max_size=60))
@example(seq=[("write", 0, 0, REMOVED, 1), ("freeze", 0, True),      # frozen at an edge
              ("freeze", 0, False), ("write", 0, 511, 0, 0)])
@example(seq=[("fill_run", 0, (10, 20), 5, True, 1), ("fill_next", 0, 4, 1, 0)])  # a PFN gap
@example(seq=[("fill_run", 0, (10, 20), 5, True, 1), ("fill_next", 0, 4, 0, 0),
              ("bits_run", 0, True, S.SHADOW_ACCESSED, 0, 1)])  # one entry past the run
@example(seq=[("fill_run", 0, (10, 20), 5, True, 1), ("zero_run", 0, 0, -1)])  # all but one
def test_store_matches_the_reference_model(cls, seq):
    store = cls(Host())
    model = Model()
    sps = []
    last_run = {}                   # table id -> the range of its last fill_run
    for op in [("alloc", 1)] + seq:
        kind = op[0]
        if kind == "alloc":
            sp = store.alloc(len(sps) * N, make_role(op[1]))
            sps.append(sp)
            model.spt[sp.id], model.gens[sp.id] = [0] * N, [0] * N
        live = [sp for sp in sps if not sp.freed]
        if kind == "alloc" or not live:
            _check(store, model, sps)
            continue
        sp = live[op[1] % len(live)]
        spt, gens = model.spt[sp.id], model.gens[sp.id]
        if kind == "free":
            store.free(sp)
        elif kind == "write":
            _, _, i, v, g = op
            store.write(sp, i, v, g if g else None)     # None keeps the generation
            spt[i] = v
            if g:
                gens[i] = g
        elif kind == "fill":
            _, _, (lo, hi), v, g, as_slice = op
            idx = slice(lo, hi) if as_slice else np.arange(lo, hi)[::2]
            picked = range(lo, hi) if as_slice else range(lo, hi, 2)
            store.write_many(sp, lo, hi, idx, np.full(len(picked), v, dtype=np.uint64), g)
            for i in picked:
                spt[i], gens[i] = v, g
        elif kind == "fill_run":
            _, _, (lo, hi), pfn, writable, g = op
            vals = np.array([S.make_spte(pfn + k, 1, writable) for k in range(hi - lo)],
                            dtype=np.uint64)
            store.write_many(sp, lo, hi, slice(lo, hi), vals, g)
            spt[lo:hi], gens[lo:hi] = [int(v) for v in vals], [g] * (hi - lo)
            last_run[sp.id] = (lo, hi)
        elif kind == "fill_next":
            _, _, n, dpfn, dgen = op
            lo0, lo = last_run.get(sp.id, (0, 0))
            hi = min(N, lo + n)
            prev = spt[lo - 1] if lo else S.make_spte(100, 1, True)
            g = (gens[lo - 1] if lo else 1) + dgen
            first = prev + ((1 + dpfn) << S.PFN_SHIFT)
            vals = np.array([first + (k << S.PFN_SHIFT) for k in range(hi - lo)],
                            dtype=np.uint64)
            store.write_many(sp, lo, hi, slice(lo, hi), vals, g)
            spt[lo:hi], gens[lo:hi] = [int(v) for v in vals], [g] * (hi - lo)
            last_run[sp.id] = (lo0 if dpfn == dgen == 0 else lo, hi)
        elif kind == "bits_run":           # the last run, give or take an entry
            _, _, set_, bits, dlo, dhi = op
            lo, hi = last_run.get(sp.id, (0, 0))
            lo = min(N, max(0, lo + dlo))
            hi = min(N, max(lo, hi + dhi))
            name = "set_bits" if set_ else "clear_bits"
            getattr(store, name)(sp, np.arange(lo, hi), lo, hi, bits)
            for i in range(lo, hi):
                spt[i] = spt[i] | bits if set_ else spt[i] & ~bits
        elif kind == "zero_run":           # a zap of the last run, give or take an entry
            _, _, dlo, dhi = op
            lo, hi = last_run.get(sp.id, (0, 0))
            lo = min(N, max(0, lo + dlo))
            hi = min(N, max(lo, hi + dhi))
            store.write_many(sp, lo, hi, slice(lo, hi), np.zeros(hi - lo, dtype=np.uint64), 0)
            spt[lo:hi], gens[lo:hi] = [0] * (hi - lo), [0] * (hi - lo)
        elif kind in ("set_bits", "clear_bits"):
            _, _, (lo, hi), bits = op
            idx = np.arange(lo, hi)
            getattr(store, kind)(sp, idx, lo, hi, bits)
            for i in range(lo, hi):
                spt[i] = spt[i] | bits if kind == "set_bits" else spt[i] & ~bits
        elif kind == "freeze":
            unless_frozen = op[2]
            got = store.freeze_all(sp, unless_frozen)
            if unless_frozen and REMOVED in spt:
                assert got is None
            else:
                old, g = got
                assert old.tolist() == spt and g.tolist() == gens
                spt[:] = [REMOVED] * N
        _check(store, model, sps)


@pytest.mark.parametrize("cls", STORES)
def test_double_free_is_reported_once_and_changes_nothing(cls):
    host = Host()
    store = cls(host)
    sp = store.alloc(0, make_role(1))
    store.free(sp)
    store.free(sp)
    assert len(host.reports_of("double_free")) == 1 and store.freed == 1 and store.live == 0


@pytest.mark.parametrize("cls", STORES)
def test_child_and_walk_follow_table_pointers(cls):
    store = cls(Host())
    root = store.alloc(0, make_role(4))
    l3 = store.alloc(0, make_role(3), (root, 0))
    store.write(root, 0, S.make_nonleaf_spte(l3.pfn))
    assert store.child(store.read(root, 0)) is l3
    it = store.walk(root, 3, 0)
    assert it.try_step_down() and it.sp is l3 and it.level == 3
    store.free(l3)
    assert store.child(store.read(root, 0)) is None
