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
from tdpsim.mmu.store import AffineLeaves, CompactStore, DenseStore

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


# ---- runs of tables: alloc_tables, lookup, removable_children, detach and free ------------

STEP = 1 << S.PFN_SHIFT
#: (first entry, count, leaves: "run" (consecutive pages) / "odd" (one page off) / "part"
#: (not full), page stride between tables (512: continuing), host pages freed before, two
#: PFNs apart, for the new tables to reuse)
tables_op = st.tuples(st.just("tables"), st.integers(0, 500), st.integers(1, 12),
                      st.lists(st.sampled_from(["run", "run", "run", "odd", "part"]),
                               min_size=12, max_size=12),
                      st.sampled_from([512, 512, 1024, 7]), st.integers(0, 3))
look_op = st.tuples(st.just("look"), st.integers(0, 10 ** 6))
zap_op = st.tuples(st.just("zap"), st.integers(0, 10 ** 6), st.integers(0, N - 1))
teardown_op = st.tuples(st.just("teardown"), st.integers(0, 10 ** 6), st.integers(1, 12))


def _run_tables(store, ops):
    """Apply ``ops`` to ``store`` (a level-2 parent); returns everything a caller can
    read, table by table, in a canonical form."""
    host = store.host
    parent = store.alloc(0, make_role(2))
    role = make_role(1)
    made = []                           # (entry, pfn) of every table linked, in order
    gone = []                           # pfns of tables torn down, freed in order
    page = 1 << 20
    for op in ops:
        kind = op[0]
        if kind == "tables":
            _, lo, n, kinds, stride, frees = op
            # every other one of 2 * frees new pages freed: the next allocations reuse
            # them, two PFNs apart (the rest stay allocated)
            got = [host.memory.alloc("x") for _ in range(2 * frees)]
            for p in got[::2]:
                host.memory.free(p)
            idx = [i for i in range(lo, min(N, lo + n))
                   if store.read(parent, i) == 0]
            full_idx, rows, gens = [], [], []
            for k, i in enumerate(idx):
                if kinds[k] == "part":
                    continue
                vals = [S.make_spte(page + j, 1, True) for j in range(N)]
                if kinds[k] == "odd":
                    vals[300] += STEP
                full_idx.append(i)
                rows.append(vals)
                gens.append([1] * N)
                page += stride
            full = (full_idx, np.array(rows, dtype=np.uint64).reshape(-1, N),
                    np.array(gens, dtype=np.uint32).reshape(-1, N)) if full_idx else None
            if full and lo % 2 and "odd" not in kinds[:len(idx)] and \
                    full_idx == list(range(full_idx[0], full_idx[0] + len(full_idx))):
                # the same leaves in closed form (what the fresh populate bulk passes)
                full = AffineLeaves(full_idx[0], len(full_idx), int(full[1][0, 0]),
                                    stride * STEP, 1)
            pfns = store.alloc_tables(parent, idx, role, full)
            made += list(zip(idx, pfns))
        elif kind == "look" and made:
            i, pfn = made[op[1] % len(made)]
            store.lookup(pfn)            # makes the SP of a table kept in a run
        elif kind == "zap" and made:     # one leaf zapped: the table diverges from its run
            i, pfn = made[op[1] % len(made)]
            sp = store.lookup(pfn)
            if sp is not None and not sp.unlinked:
                store.write(sp, op[2], 0, 0)
        elif kind == "teardown" and made:
            # handle_removed_pt's loop from some child on: what removable_children offers
            live = sorted(i for i, p in made if store.read(parent, i) != 0)
            if not live:
                continue
            pos = op[1] % len(live)
            old = store.entries(parent)
            pieces = store.removable_children(parent, old, live, pos)
            count = 0
            for piece in pieces:
                if count == op[2]:
                    break
                if isinstance(piece, tuple):
                    kr, c = piece
                    c = min(c, op[2] - count)
                    batch = store.detach_kids(kr, c, np.arange(c) + 100)
                    store.free_kids(batch)
                    gone += [batch.pfn0 + k * batch.dpfn for k in range(c)]
                    count += c
                else:
                    store.freeze_all(piece, True)
                    store.free(piece)
                    gone.append(piece.pfn)
                    count += 1
            for i in live[pos:pos + count]:
                store.write(parent, i, 0, 0)
    out = []
    for i, pfn in made:
        sp = store.lookup(pfn)
        if sp is None:
            out.append((i, pfn, "freed"))
            continue
        out.append((i, pfn, sp.id, sp.gfn, sp.role, sp.pgen, sp.ptep[1], sp.unlinked,
                    store.entries(sp).tolist(), store.gens_at(sp, slice(None), 0, N).tolist()))
    return out, gone, store.allocated, store.freed, store.live, store.peak


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.one_of(tables_op, tables_op, look_op, zap_op, teardown_op),
                    min_size=1, max_size=14))
@example(seq=[("tables", 0, 12, ["run"] * 12, 512, 0), ("look", 5),
              ("teardown", 0, 12)])                     # a run split by a lookup
@example(seq=[("tables", 0, 6, ["run"] * 12, 512, 0), ("teardown", 0, 12),
              ("tables", 0, 6, ["run"] * 12, 512, 0)])  # PFNs reused downwards
def test_runs_of_tables_read_as_dense_tables(seq):
    """The same operations on a dense and a compressed store: every table reads the same
    (id, PFN, generation, entries), the same children are removable, frees happen in the
    same order, and the accounting agrees."""
    d = _run_tables(DenseStore(Host()), seq)
    c = _run_tables(CompactStore(Host()), seq)
    assert c == d


def test_full_tables_in_a_row_are_one_run_and_cost_no_sp():
    store = CompactStore(Host())
    parent = store.alloc(0, make_role(2))
    rows = np.array([[S.make_spte((1 << 20) + k * N + j, 1, True) for j in range(N)]
                     for k in range(64)], dtype=np.uint64)
    pfns = store.alloc_tables(parent, list(range(64)), make_role(1),
                              (list(range(64)), rows, np.ones((64, N), dtype=np.uint32)))
    assert len(parent._kids) == 1 and len(store.by_pfn) == 1      # the parent only
    assert store.count_present(store.lookup(pfns[10])) == N       # one SP made on demand
    assert len(parent._kids) == 2 and len(store.by_pfn) == 2
