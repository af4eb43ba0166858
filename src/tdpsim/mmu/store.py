"""The page-table store: the only code that reads or writes SPTE storage.

A VM's page tables are ``ShadowPage`` headers (page.py) whose 512 entries, and the
model-only generation of the host page each leaf maps, live in a store.  Everything else
(the TDP MMU, the hardware walker, the fast-path accelerators, the oracles, the harness)
goes through this interface: entry operations (``read``, ``write``, ``gen``), range
operations (``entries``, ``write_many``, ``set_bits``, ``clear_bits``, ``count_present``,
``freeze_all``), table allocation, lookup by PFN and freeing, and the one walker built on
them (``TdpIter``, tdp_iter.py).

Settling (docs/design-notes.md, "fast granularity"): a table is a Resource whose keys are
its entry indices.  Every entry operation settles the fast-mode bulks that depend on the
entries it touches before touching them: a read settles the bulks that write them (bulks
that only read them may stay), a write settles every bulk that reads or writes them.  Call
sites never settle tables by hand.  Under the settle checker (``TDPSIM_CHECK_SETTLE=1``,
engine.py) every operation then asserts that no pending bulk of another task still
overlaps what it touches, so a settle missing here raises at the operation that lacked it.

``DenseStore`` is the reference layout: a NumPy ``uint64[512]`` of SPTEs and a
``uint32[512]`` of generations per table, in the header's ``_spt`` / ``_gens`` slots, which
no other module reads.  A store for another layout implements the same methods (see
docs/design-notes.md, "how to add a storage").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..host.memory import POISON
from ..sim.engine import Resource
from ..sim.runs import ShardedRunMap
from . import spte as S
from .page import ShadowPage
from .tdp_iter import TdpIter

if TYPE_CHECKING:
    from ..host.host import Host

U64 = np.uint64
_REMOVED = U64(S.REMOVED_SPTE)


def _freeze_arrays(spt: np.ndarray, gens: np.ndarray, unless_frozen: bool
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """``freeze_all`` on a table held as arrays (see ``PageTableStore.freeze_all``)."""
    if unless_frozen and (spt == _REMOVED).any():
        return None
    old = spt.copy()
    spt[:] = _REMOVED
    return old, gens


_STEP = 1 << S.PFN_SHIFT               # from one 4 KiB page to the next, in an SPTE


class LeafRows:
    """The leaves of tables filled whole at allocation (``alloc_tables``): table
    ``idx[r]`` gets row r of ``sptes`` and ``gens`` (two (n, 512) arrays)."""

    def __init__(self, idx: list[int], sptes: np.ndarray, gens: np.ndarray):
        self.idx, self.sptes, self.gens = list(idx), sptes, gens
        self.n = len(self.idx)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sptes[r], self.gens[r]

    def affine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per table: its first SPTE, its first generation, and whether its 512 leaves
        are present, of consecutive pages, with one generation."""
        fs, fg = self.sptes, self.gens
        first = fs[:, 0]
        ok = (first != 0) & (first != _REMOVED) & (fg == fg[:, :1]).all(axis=1) & \
            (np.diff(fs, axis=1) == U64(_STEP)).all(axis=1)
        return first, fg[:, 0].astype(np.int64), ok


class AffineLeaves:
    """Leaves in closed form: the ``n`` tables at entries ``idx0 ..`` in a row; table r
    gets ``first0 + r * dfirst + j * STEP`` at entry j (512 consecutive 4 KiB pages,
    ``first0`` a present leaf), all of generation ``gen``.  Costs nothing per table."""

    def __init__(self, idx0: int, n: int, first0: int, dfirst: int, gen: int):
        self.idx0, self.n, self.first0, self.dfirst, self.gen = idx0, n, first0, dfirst, gen

    @property
    def idx(self) -> list[int]:
        return list(range(self.idx0, self.idx0 + self.n))

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        j = np.arange(S.SPTE_ENTRIES, dtype=np.uint64)
        return U64(self.first0 + r * self.dfirst) + j * U64(_STEP), \
            np.full(S.SPTE_ENTRIES, self.gen, dtype=np.uint32)

    def affine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = np.arange(self.n, dtype=np.int64)
        return (self.first0 + self.dfirst * r).astype(np.uint64), \
            np.full(self.n, self.gen, dtype=np.int64), np.ones(self.n, dtype=bool)


def as_leaves(full) -> "LeafRows | AffineLeaves | None":
    """``full`` as a leaves object: given as one, or as ``(indices, SPTEs, generations)``."""
    if isinstance(full, AffineLeaves):
        return full if full.n else None
    if full is None or isinstance(full, LeafRows):
        return full if full is None or full.n else None
    return LeafRows(*full) if len(full[0]) else None


class PageTableStore(ABC):
    """Allocation, lookup by PFN and freeing of a VM's page-table pages, and the page-table
    accounting (allocated, freed, live, peak).  Subclasses hold the entries."""

    def __init__(self, host: "Host", name: str = "kvm"):
        self.host = host
        self.engine = host.engine
        self.mem = host.memory
        self.name = name
        #: the settle checker is on (engine.py)
        self.checking = host.engine.check_settle
        self.by_pfn: dict[int, ShadowPage] = {}
        self._next_id = 0
        self.allocated = 0
        self.freed = 0
        self.live = 0
        self.peak = 0

    # ---- tables --------------------------------------------------------------------------

    def alloc(self, gfn: int, role: int, ptep=None) -> ShadowPage:
        """Allocate an SP (the kernel takes it from the vCPU's memory cache), all entries 0."""
        pfn = self.mem.alloc(f"{self.name}:pt")
        sp = ShadowPage(self._next_id, gfn, role, pfn, self.mem.gen_of(pfn), ptep)
        self._next_id += 1
        self._init_entries(sp)
        self.by_pfn[pfn] = sp
        self.allocated += 1
        self.live += 1
        if self.live > self.peak:
            self.peak = self.live
        return sp

    def alloc_tables(self, parent: ShadowPage, idx: list[int], role: int,
                     full=None) -> list[int]:
        """Allocate a table for each entry ``idx`` (ascending) of ``parent`` and link it
        there (a non-leaf SPTE), as that many ``alloc`` and ``write`` calls would, in that
        order.  ``full`` (``LeafRows``, ``AffineLeaves`` or ``(indices, SPTEs,
        generations)``): the tables at its indices (a subset of ``idx``, ascending) get all
        512 entries at once.  Returns the tables' PFNs.  A layout may keep full tables as
        records instead of SPs (``lookup`` then makes the SP of one when asked for it);
        ids, PFNs and contents are the same either way."""
        full = as_leaves(full)
        rows = {i: r for r, i in enumerate(full.idx)} if full else {}
        pfns = []
        for i in idx:
            sp = self.alloc(parent.gfn_of(i), role, (parent, i))
            self.write(parent, i, S.make_nonleaf_spte(sp.pfn), 0)
            r = rows.get(i)
            if r is not None:
                self.write_many(sp, 0, S.SPTE_ENTRIES, slice(0, S.SPTE_ENTRIES), *full.row(r))
            pfns.append(sp.pfn)
        return pfns

    def removable_children(self, parent: ShadowPage, old: np.ndarray, idx: list[int],
                           pos: int) -> list:
        """For an accelerated handle_removed_pt of ``parent`` (frozen; its old entries
        ``old``): the children at entries idx[pos], idx[pos] + 1, ... (consecutive in
        ``idx``), in order, as long as each is a plain full leaf table: 512 present leaves,
        none frozen, nothing pending on it, not on the NX list.  Pieces: an SP, or
        ``(KidRun, count)`` for tables a layout keeps as a run (``alloc_tables``)."""
        out = []
        n = 0
        while pos + n < len(idx) and idx[pos + n] == idx[pos] + n:
            piece = self._run_piece(parent, idx, pos + n)
            if piece is None:
                sp = self.by_pfn.get(S.spte_to_pfn(int(old[idx[pos + n]])))
                if not self._plain_full(sp):
                    break
                piece = sp
            out.append(piece)
            n += piece[1] if isinstance(piece, tuple) else 1
        return out

    def _run_piece(self, parent: ShadowPage, idx: list[int], at: int
                   ) -> "tuple[KidRun, int] | None":
        """The children from ``idx[at]`` on (consecutive) that this layout keeps in one
        run, as ``(run, count)``; None if that child is not in a run."""
        return None

    def run_child(self, parent: ShadowPage, i: int) -> bool:
        """The child of ``parent[i]`` is a full leaf table this layout keeps in a run (it
        has 512 present leaves; look-only walks count it without making its SP)."""
        return False

    def _plain_full(self, sp: ShadowPage | None) -> bool:
        return (sp is not None and sp.level == 1 and not sp.freed and not sp.unlinked
                and not sp.bulks and not sp.lpage_disallowed
                and self.count_present(sp) == S.SPTE_ENTRIES)

    def lookup(self, pfn: int) -> ShadowPage | None:
        """The SP living at ``pfn`` (None if that page is not a live page table)."""
        return self.by_pfn.get(pfn)

    def child(self, spte: int) -> ShadowPage | None:
        """The table a non-leaf SPTE points to (None if it is not a live page table)."""
        return self.by_pfn.get(S.spte_to_pfn(spte))

    def walk(self, root: ShadowPage, min_level: int, start: int,
             report: bool = True) -> "TdpIter":
        """The walker (``TdpIter``) over this store from ``root`` (any table) at ``start``."""
        return TdpIter(self, root, min_level, start, report)

    def free(self, sp: ShadowPage, who=None) -> None:
        """Free an SP's page: poison its entries (late walkers see garbage), free the PFN."""
        if sp.freed:
            self.host.report("double_free", who, pfn=sp.pfn, owner=f"{self.name}:pt sp#{sp.id}")
            return
        sp.freed = True
        self._poison(sp)
        del self.by_pfn[sp.pfn]
        self.mem.free(sp.pfn, who)
        self.freed += 1
        self.live -= 1

    # ---- settling ------------------------------------------------------------------------

    # Every entry operation first settles what it touches (``engine.settle``), then, under
    # the settle checker, asserts that nothing it touches is still pending (``_check``):
    # the two are separate statements so that a settle missing from an operation raises.

    def _check(self, sp: ShadowPage, lo: int | None, hi: int | None, read: bool) -> None:
        self.engine.assert_settled(sp, lo, hi, read)

    def _settled(self, sp: ShadowPage, lo: int, hi: int, read: bool) -> None:
        """Settle, then check, entries [lo, hi) of ``sp`` (DenseStore inlines the two in
        its entry operations: they are the exact mode's hottest path)."""
        if sp.bulks:
            self.engine.settle(sp, lo, hi, read=read)
        if self.checking:
            self._check(sp, lo, hi, read)

    def claim(self, sp: ShadowPage, lo: int, hi: int) -> None:
        """Settle every bulk that depends on entries [lo, hi) of ``sp`` before a bulk that
        may write them is declared on them (it will write them lazily, through the store)."""
        if sp.bulks:
            self.engine.settle(sp, lo, hi, read=False)
        if self.checking:
            self._check(sp, lo, hi, False)

    def settle_all(self, sp: ShadowPage) -> None:
        """Settle every bulk that depends on ``sp`` (before it is unlinked and torn down)."""
        if sp.bulks:
            self.engine.settle(sp)
        if self.checking:
            self._check(sp, None, None, False)

    # ---- the interface a layout implements -----------------------------------------------
    # Entry indices are within [0, 512); ``idx`` arguments are a slice or an index array
    # whose entries all lie within the [lo, hi) given beside it (what the operation settles).

    @abstractmethod
    def _init_entries(self, sp: ShadowPage) -> None:
        """Give a new table 512 empty entries (SPTE 0, generation 0)."""

    @abstractmethod
    def _poison(self, sp: ShadowPage) -> None:
        """A freed table reads as POISON everywhere."""

    @abstractmethod
    def read(self, sp: ShadowPage, i: int) -> int:
        """The SPTE at ``sp[i]`` (a plain load: READ_ONCE)."""

    @abstractmethod
    def read_for_update(self, sp: ShadowPage, i: int) -> int:
        """The SPTE at ``sp[i]`` read by an update of it (a cmpxchg or an xchg): settles
        as a writer."""

    @abstractmethod
    def gen(self, sp: ShadowPage, i: int) -> int:
        """Generation of the host page the leaf at ``sp[i]`` mapped when installed."""

    @abstractmethod
    def write(self, sp: ShadowPage, i: int, spte: int, gen: int | None = None) -> None:
        """Store ``spte`` at ``sp[i]`` (and its generation, unless None: kept)."""

    @abstractmethod
    def entries(self, sp: ShadowPage, lo: int = 0, hi: int = S.SPTE_ENTRIES) -> np.ndarray:
        """A copy of the SPTEs of ``sp[lo:hi]``."""

    @abstractmethod
    def entries_at(self, sp: ShadowPage, idx: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """The SPTEs at indices ``idx`` (all within [lo, hi)) of ``sp``."""

    @abstractmethod
    def gens_at(self, sp: ShadowPage, idx, lo: int, hi: int) -> np.ndarray:
        """A copy of the generations at ``idx`` (a slice or an index array, all within
        [lo, hi)) of ``sp``."""

    @abstractmethod
    def write_many(self, sp: ShadowPage, lo: int, hi: int, idx, sptes: np.ndarray,
                   gens: np.ndarray | int) -> None:
        """Store ``sptes`` (and ``gens``) at ``idx`` (a slice or an index array), all within
        [lo, hi) of ``sp``."""

    @abstractmethod
    def set_bits(self, sp: ShadowPage, idx: np.ndarray, lo: int, hi: int, bits: int) -> None:
        """OR ``bits`` into the SPTEs at ``idx`` (within [lo, hi)): A/D assists in bulk."""

    @abstractmethod
    def clear_bits(self, sp: ShadowPage, idx: np.ndarray, lo: int, hi: int, bits: int) -> None:
        """AND out ``bits`` of the SPTEs at ``idx`` (within [lo, hi))."""

    @abstractmethod
    def freeze_all(self, sp: ShadowPage, unless_frozen: bool
                   ) -> tuple[np.ndarray, np.ndarray] | None:
        """xchg every entry of ``sp`` with REMOVED (handle_removed_pt's loop, done at once);
        returns the old SPTEs and the generations (the latter valid until the entries are
        written again).  ``unless_frozen``: if an entry is already REMOVED (another thread
        froze it and owns it), change nothing and return None: the caller waits."""

    def count_present(self, sp: ShadowPage, lo: int = 0, hi: int = S.SPTE_ENTRIES) -> int:
        """Present entries (REMOVED excluded) among ``sp[lo:hi]``."""
        ents = self.entries(sp, lo, hi)
        return int((S.present_mask(ents) & (ents != _REMOVED)).sum())


class DenseStore(PageTableStore):
    """Every table as a NumPy ``uint64[512]`` of SPTEs plus ``uint32[512]`` generations."""

    def _init_entries(self, sp: ShadowPage) -> None:
        sp._spt = np.zeros(S.SPTE_ENTRIES, dtype=np.uint64)
        sp._gens = np.zeros(S.SPTE_ENTRIES, dtype=np.uint32)

    def _poison(self, sp: ShadowPage) -> None:
        sp._spt.fill(POISON)

    # ---- entries -------------------------------------------------------------------------

    def read(self, sp: ShadowPage, i: int) -> int:
        if sp.bulks:
            self.engine.settle(sp, i, i + 1, read=True)
        if self.checking:
            self._check(sp, i, i + 1, True)
        return int(sp._spt[i])

    def read_for_update(self, sp: ShadowPage, i: int) -> int:
        if sp.bulks:
            self.engine.settle(sp, i, i + 1, read=False)
        if self.checking:
            self._check(sp, i, i + 1, False)
        return int(sp._spt[i])

    def gen(self, sp: ShadowPage, i: int) -> int:
        if sp.bulks:
            self.engine.settle(sp, i, i + 1, read=True)
        if self.checking:
            self._check(sp, i, i + 1, True)
        return int(sp._gens[i])

    def write(self, sp: ShadowPage, i: int, spte: int, gen: int | None = None) -> None:
        if sp.bulks:
            self.engine.settle(sp, i, i + 1, read=False)
        if self.checking:
            self._check(sp, i, i + 1, False)
        sp._spt[i] = spte
        if gen is not None:
            sp._gens[i] = gen

    def entries(self, sp: ShadowPage, lo: int = 0, hi: int = S.SPTE_ENTRIES) -> np.ndarray:
        if sp.bulks:
            self.engine.settle(sp, lo, hi, read=True)
        if self.checking:
            self._check(sp, lo, hi, True)
        return sp._spt[lo:hi].copy()

    def entries_at(self, sp: ShadowPage, idx: np.ndarray, lo: int, hi: int) -> np.ndarray:
        if sp.bulks:
            self.engine.settle(sp, lo, hi, read=True)
        if self.checking:
            self._check(sp, lo, hi, True)
        return sp._spt[idx]

    def gens_at(self, sp: ShadowPage, idx, lo: int, hi: int) -> np.ndarray:
        if sp.bulks:
            self.engine.settle(sp, lo, hi, read=True)
        if self.checking:
            self._check(sp, lo, hi, True)
        return sp._gens[idx].copy()

    def write_many(self, sp: ShadowPage, lo: int, hi: int, idx, sptes: np.ndarray,
                   gens: np.ndarray | int) -> None:
        if sp.bulks:
            self.engine.settle(sp, lo, hi, read=False)
        if self.checking:
            self._check(sp, lo, hi, False)
        sp._spt[idx] = sptes
        sp._gens[idx] = gens

    def set_bits(self, sp: ShadowPage, idx: np.ndarray, lo: int, hi: int, bits: int) -> None:
        if sp.bulks:
            self.engine.settle(sp, lo, hi, read=False)
        if self.checking:
            self._check(sp, lo, hi, False)
        sp._spt[idx] |= U64(bits)

    def clear_bits(self, sp: ShadowPage, idx: np.ndarray, lo: int, hi: int, bits: int) -> None:
        if sp.bulks:
            self.engine.settle(sp, lo, hi, read=False)
        if self.checking:
            self._check(sp, lo, hi, False)
        sp._spt[idx] &= ~U64(bits)

    def freeze_all(self, sp: ShadowPage, unless_frozen: bool
                   ) -> tuple[np.ndarray, np.ndarray] | None:
        if sp.bulks:
            self.engine.settle(sp, 0, S.SPTE_ENTRIES, read=False)
        if self.checking:
            self._check(sp, 0, S.SPTE_ENTRIES, False)
        return _freeze_arrays(sp._spt, sp._gens, unless_frozen)


@dataclass(frozen=True)
class TableBatch:
    """Leaf tables unlinked together from a run (``CompactStore.detach_kids``): ids
    ``id0 ..``, PFNs ``pfn0 + k * dpfn``, each unlinked at ``unlink_t[k]``, under ``root``.
    What their RCU callback frees and what the oracles check then."""

    id0: int
    n: int
    pfn0: int
    dpfn: int
    unlink_t: np.ndarray
    root: ShadowPage
    level: int = 1


class KidRun(Resource):
    """Leaf tables kept as one record by ``CompactStore``: the children of ``parent``
    entries [lo, hi), each full (512 present 4 KiB leaves of consecutive host pages).

    The child of entry ``lo + k`` is the SP with id ``id0 + k`` at PFN ``pfn0 + k * dpfn``
    (dpfn is +1 or -1: pages taken in a row from the allocator), generation ``pgen``, whose
    entry j is ``base0 + k * dbase + j * STEP`` with generation ``lgen``.  While linked,
    the run sits in ``parent._kids``; once its tables are unlinked (``detach_kids``) it is
    a detached run: entries REMOVED, unlink time of each table in ``unlink_t``, waiting for
    its RCU callback.  As a Resource it stands for its tables: a bulk that tears them down
    declares it, and making an SP of one of them (``lookup``) settles that bulk first."""

    __slots__ = ("parent", "lo", "hi", "id0", "pfn0", "dpfn", "pgen", "base0", "dbase",
                 "lgen", "role", "unlink_t", "rest")

    def __init__(self, parent, lo, hi, id0, pfn0, dpfn, pgen, base0, dbase, lgen, role,
                 unlink_t=None):
        super().__init__()
        self.parent, self.lo, self.hi, self.id0 = parent, lo, hi, id0
        self.pfn0, self.dpfn, self.pgen = pfn0, dpfn, pgen
        self.base0, self.dbase, self.lgen, self.role = base0, dbase, lgen, role
        #: None while linked; then the unlink time of each table (np.int64 array)
        self.unlink_t: np.ndarray | None = unlink_t
        #: the run that took over the tables after those ``detach_kids`` took from it
        self.rest: KidRun | None = None

    @property
    def n(self) -> int:
        return self.hi - self.lo

    def pfn_range(self) -> tuple[int, int]:
        """[first, last + 1) of the tables' PFNs."""
        last = self.pfn0 + (self.n - 1) * self.dpfn
        return min(self.pfn0, last), max(self.pfn0, last) + 1

    def part(self, k0: int, k1: int, unlink_t=None) -> "KidRun":
        """Tables k0 .. k1 - 1 of this run, as a run of their own."""
        return KidRun(self.parent, self.lo + k0, self.lo + k1, self.id0 + k0,
                      self.pfn0 + k0 * self.dpfn, self.dpfn, self.pgen,
                      self.base0 + k0 * self.dbase, self.dbase, self.lgen, self.role,
                      unlink_t)

    def __repr__(self) -> str:
        state = "linked" if self.unlink_t is None else "detached"
        return f"<kids sp#{self.parent.id}[{self.lo}:{self.hi}] {state}>"


class CompactStore(PageTableStore):
    """Leaf tables as one affine run over a constant background; other tables dense.

    A 4 KiB-level table the selftests build holds consecutive host pages with equal flags
    and one generation: ``(lo, hi, base, step, gen, bg)`` says entry i in [lo, hi) is
    ``base + (i - lo) * step`` with generation ``gen``, and every other entry is ``bg``
    with generation 0 (``step`` 0 for a constant run).  An empty table is ``bg`` 0 with no
    run; freezing it or freeing it keeps the run's generations under a REMOVED or POISON
    background.  An operation the form cannot express (a single A/D update, a zapped page
    in the middle) turns the table dense (``_spt`` / ``_gens`` arrays), for good.  Level-2
    tables take the same form (a row of links to tables at consecutive PFNs, which is what
    populate builds); levels 3 and up are always dense.  Every read answers exactly what ``DenseStore`` would.

    Memory per compact table: the header and one tuple instead of 6 KiB of arrays.

    Runs of tables: full leaf tables that ``alloc_tables`` links in a row, with PFNs taken
    in a row and leaves continuing from one table to the next, have no SP at all: a
    ``KidRun`` record in their parent (``_kids``) stands for them, and ``_virt`` maps each
    of their PFNs to (parent index, run).  ``lookup`` of such a PFN makes the SP, exactly
    as ``DenseStore`` holds it (id, PFN, generation, entries; unlinked and frozen for a
    detached run), and takes it out of its run.  Tearing a run down (``detach_kids``) and
    freeing it (``free_kids``) cost per run, not per table."""

    STEP = _STEP                       # consecutive 4 KiB host pages

    def __init__(self, host: "Host", name: str = "kvm"):
        super().__init__(host, name)
        #: PFN -> (index in the parent, KidRun) of every table kept in a run
        self._virt = ShardedRunMap(-1, None)

    def _init_entries(self, sp: ShadowPage) -> None:
        sp._kids = None
        if sp.level <= 2:
            sp._spt = None
            sp._gens = (0, 0, 0, 0, 0, 0)     # the compact form (see the class doc)
        else:
            sp._spt = np.zeros(S.SPTE_ENTRIES, dtype=np.uint64)
            sp._gens = np.zeros(S.SPTE_ENTRIES, dtype=np.uint32)

    # ---- runs of tables ------------------------------------------------------------------

    def alloc_tables(self, parent: ShadowPage, idx: list[int], role: int,
                     full=None) -> list[int]:
        full = as_leaves(full)
        if parent.level != 2 or not full:
            return super().alloc_tables(parent, idx, role, full)
        n = len(idx)
        one = self._one_run(parent, idx, role, full)
        if one is not None:
            return one
        pfns = self.mem.alloc_many(n, f"{self.name}:pt")
        pgens = self.mem.gens_of(pfns).astype(np.int64)
        id0 = self._count_new(n)
        ia = np.asarray(idx, dtype=np.int64)
        row = np.full(n, -1, dtype=np.int64)
        row[np.searchsorted(ia, np.asarray(full.idx, dtype=np.int64))] = \
            np.arange(len(full.idx))
        # a full table can join a run if its 512 leaves are one run of consecutive pages
        first, fgen, one_run = full.affine()
        ok = row >= 0
        ok[ok] = one_run[row[ok]]
        base = np.zeros(n, dtype=np.uint64)
        lgen = np.zeros(n, dtype=np.int64)
        base[ok], lgen[ok] = first[row[ok]], fgen[row[ok]]
        # runs: tables k-1, k in one run if both can, at entries, PFNs (+-1) and
        # generations in a row; a change of PFN or leaf step starts a new run too
        dp = np.diff(pfns)
        db = np.diff(base)                  # uint64: wraps, compared for equality only
        pair = ok[1:] & ok[:-1] & (np.diff(ia) == 1) & (np.abs(dp) == 1) & \
            (np.diff(pgens) == 0) & (np.diff(lgen) == 0)
        cut = ~pair
        cut[1:] |= pair[:-1] & ((dp[1:] != dp[:-1]) | (db[1:] != db[:-1]))
        starts = [0, *(np.flatnonzero(cut) + 1).tolist(), n]
        pl, gl, bl = pfns.tolist(), pgens.tolist(), base.tolist()
        for s0, s1 in zip(starts, starts[1:]):
            if ok[s0]:
                m = s1 - s0
                kr = KidRun(parent, idx[s0], idx[s0] + m, id0 + s0, pl[s0],
                            pl[s0 + 1] - pl[s0] if m > 1 else 1, gl[s0], bl[s0],
                            bl[s0 + 1] - bl[s0] if m > 1 else 0, int(lgen[s0]), role)
                self._add_kids(kr)
                continue
            for k in range(s0, s1):             # (one table: a cut on each side)
                sp = ShadowPage(id0 + k, parent.gfn_of(idx[k]), role, pl[k], gl[k],
                                (parent, idx[k]))
                self._init_entries(sp)
                self.by_pfn[pl[k]] = sp
                if row[k] >= 0:
                    self.write_many(sp, 0, S.SPTE_ENTRIES, slice(0, S.SPTE_ENTRIES),
                                    *full.row(int(row[k])))
        # the parent's entries, a stretch of consecutive ones at a time
        ents = U64(S.make_nonleaf_spte(0)) | (pfns.astype(np.uint64) << U64(S.PFN_SHIFT))
        brk = [0, *(np.flatnonzero(np.diff(ia) != 1) + 1).tolist(), n]
        for s0, s1 in zip(brk, brk[1:]):
            self.write_many(parent, idx[s0], idx[s1 - 1] + 1, slice(idx[s0], idx[s1 - 1] + 1),
                            ents[s0:s1], 0)
        return pl

    def _count_new(self, n: int) -> int:
        """Account n new tables; returns the first's id."""
        id0 = self._next_id
        self._next_id += n
        self.allocated += n
        self.live += n
        self.peak = max(self.peak, self.live)
        return id0

    def _one_run(self, parent: ShadowPage, idx: list[int], role: int, full
                 ) -> "list[int] | range | None":
        """``alloc_tables`` at a cost per run of PFNs rather than per table, when every
        table is full, at entries in a row, with leaves in closed form continuing from one
        table to the next, and the allocator hands out runs of one generation each: the
        runs ``alloc_tables`` would make then.  None (nothing done) otherwise."""
        n = len(idx)
        if not isinstance(full, AffineLeaves) or full.idx0 != idx[0] or full.n != n or \
                idx[-1] - idx[0] != n - 1:
            return None
        got = self.mem.alloc_runs(n, f"{self.name}:pt")
        if got is None:
            return None
        # the runs alloc_tables makes: the allocator's, joined where one goes on in the
        # other's direction (its next page, +-1) with the same generation
        joined: list[list[int]] = []            # [first, step, count, generation]
        for p0, d, c in got:
            g = self.mem.gen_of(p0)
            if joined:
                a = joined[-1]
                gap = p0 - (a[0] + a[1] * (a[2] - 1))
                if abs(gap) == 1 and (a[2] == 1 or a[1] == gap) and \
                        (c == 1 or d == gap) and a[3] == g:
                    a[1], a[2] = gap, a[2] + c
                    continue
            joined.append([p0, d if c > 1 else 1, c, g])
        id0 = self._count_new(n)
        k = 0
        for p0, d, c, g in joined:
            self._add_kids(KidRun(parent, idx[0] + k, idx[0] + k + c, id0 + k, p0, d, g,
                                  full.first0 + k * full.dfirst, full.dfirst, full.gen, role))
            k += c
        if len(joined) == 1:                    # (a range reads like the list)
            p0, d = joined[0][:2]
            pfns = range(p0, p0 + d * n, d)
            at = p0 + d * np.arange(n, dtype=np.int64)
        else:
            pfns = [p for p0, d, c, _ in joined for p in range(p0, p0 + d * c, d)]
            at = np.asarray(pfns, dtype=np.int64)
        ents = U64(S.make_nonleaf_spte(0)) | (at.astype(np.uint64) << U64(S.PFN_SHIFT))
        self.write_many(parent, idx[0], idx[0] + n, slice(idx[0], idx[0] + n), ents, 0)
        return pfns

    def _add_kids(self, kr: KidRun) -> None:
        """Link a new run into its parent's list (ordered by entry) and into ``_virt``."""
        parent = kr.parent
        if parent._kids is None:
            parent._kids = []
        kids = parent._kids
        at = next((j for j, o in enumerate(kids) if o.lo > kr.lo), len(kids))
        kids.insert(at, kr)
        self._tag(kr)

    def _tag(self, kr: KidRun) -> None:
        """Point ``_virt`` at ``kr`` for its PFNs."""
        a, b = kr.pfn_range()
        if kr.dpfn > 0:
            self._virt.assign(a, b, kr.lo, 1, kr)
        else:
            self._virt.assign(a, b, kr.hi - 1, -1, kr)

    def _kid_run_at(self, parent: ShadowPage, i: int) -> KidRun | None:
        for kr in parent._kids or ():
            if kr.lo <= i < kr.hi:
                return kr
        return None

    def run_child(self, parent: ShadowPage, i: int) -> bool:
        if parent._kids is None:
            return False
        kr = self._kid_run_at(parent, i)
        if kr is not None and kr.bulks:     # being torn down: settle, then look again
            self.engine.settle(kr)
            kr = self._kid_run_at(parent, i)
        if kr is not None and self.checking:
            self.engine.assert_settled(kr, None, None, True)
        return kr is not None

    def _run_piece(self, parent: ShadowPage, idx: list[int], at: int
                   ) -> tuple[KidRun, int] | None:
        i = idx[at]
        kr = self._kid_run_at(parent, i)
        if kr is None:
            return None
        # linked runs hold full, plain tables: the piece goes on while idx does, in a row
        # (idx ascends, so idx[at + d] == i + d says the d entries between are all there)
        lo, hi = 1, min(kr.hi - i, len(idx) - at)
        while lo < hi:                          # the largest c <= hi with idx in a row
            mid = (lo + hi + 1) // 2
            if idx[at + mid - 1] == i + mid - 1:
                lo = mid
            else:
                hi = mid - 1
        c = lo
        if kr.lo != i:                          # start the piece at i: split the run there
            kr = self._split_run(kr, i)
        return kr, c

    def lookup(self, pfn: int) -> ShadowPage | None:
        sp = self.by_pfn.get(pfn)
        if sp is None and not self._virt.empty():
            i, kr = self._virt.get(pfn)
            if kr is not None:
                if kr.bulks:                # a teardown of the run: settle it first
                    self.engine.settle(kr)
                    i, kr = self._virt.get(pfn)
                if self.checking:
                    self.engine.assert_settled(kr, None, None, False)
                sp = self._materialize(kr, i)
        return sp

    def child(self, spte: int) -> ShadowPage | None:
        return self.lookup(S.spte_to_pfn(spte))

    def _materialize(self, kr: KidRun, i: int) -> ShadowPage:
        """The SP of table ``kr.lo + k`` (entry i of the parent), taken out of its run."""
        k = i - kr.lo
        pfn = kr.pfn0 + k * kr.dpfn
        sp = ShadowPage(kr.id0 + k, kr.parent.gfn_of(i), kr.role, pfn, kr.pgen,
                        (kr.parent, i))
        self._init_entries(sp)
        if kr.unlink_t is None:
            sp._gens = (0, S.SPTE_ENTRIES, kr.base0 + k * kr.dbase, self.STEP, kr.lgen, 0)
        else:
            sp._gens = (0, S.SPTE_ENTRIES, S.REMOVED_SPTE, 0, kr.lgen, S.REMOVED_SPTE)
            sp.unlinked = True
            sp.unlink_t = int(kr.unlink_t[k])
        self.by_pfn[pfn] = sp
        # what is left of the run: tables [0, k) stay in kr, [k + 1, n) form a new run
        n = kr.n
        right = kr.part(k + 1, n, None if kr.unlink_t is None else kr.unlink_t[k + 1:]) \
            if k + 1 < n else None
        kr.hi = kr.lo + k
        if kr.unlink_t is not None:
            kr.unlink_t = kr.unlink_t[:k]
        self._virt.assign(pfn, pfn + 1, -1)
        if right is not None:
            self._tag(right)
        if kr.unlink_t is None:         # a linked run: its parent's list changes
            kids = kr.parent._kids
            at = kids.index(kr)
            kids[at:at + 1] = [r for r in (kr, right) if r is not None and r.n]
        return sp

    def _split_run(self, kr: KidRun, i: int) -> KidRun:
        """Split the linked run ``kr`` before entry i; returns the part from i on."""
        right = kr.part(i - kr.lo, kr.n)
        kr.hi = i
        kids = kr.parent._kids
        kids.insert(kids.index(kr) + 1, right)
        self._tag(right)
        return right

    def detach_kids(self, kr: KidRun, k: int, times: np.ndarray) -> "TableBatch":
        """handle_removed_pt of the first ``k`` tables of the linked run ``kr``, at once:
        they are unlinked (at ``times``) and frozen (REMOVED): a detached run until
        ``free_kids``.  Returns what they were (for the RCU callback and the oracles); the
        tables after them stay linked, as the run ``rest_of(kr)``."""
        assert kr.unlink_t is None and 0 < k <= kr.n and kr.parent.freed is False
        if kr.bulks:
            self.engine.settle(kr)
        if self.checking:
            self.engine.assert_settled(kr, None, None, False)
        # kr itself becomes the detached run (its PFNs keep pointing at it); the tables
        # after the first k, if any, move to a new linked run
        kids = kr.parent._kids
        at = kids.index(kr)
        if k == kr.n:
            del kids[at]
        else:
            rest = kr.part(k, kr.n)
            kids[at] = rest
            self._tag(rest)
            kr.rest = rest
            kr.hi = kr.lo + k
        kr.unlink_t = np.asarray(times, dtype=np.int64)
        return TableBatch(kr.id0, k, kr.pfn0, kr.dpfn, kr.unlink_t, kr.parent.root)

    @staticmethod
    def rest_of(kr: KidRun) -> KidRun:
        """The run holding the tables of ``kr`` that ``detach_kids`` left linked."""
        return kr.rest

    def free_kids(self, batch: "TableBatch", who=None) -> None:
        """Free the tables of a detached run (its RCU callback), in table order, as that
        many ``free`` calls would; tables made SPs since (``lookup``) are freed as SPs."""
        n = batch.n
        last = batch.pfn0 + batch.dpfn * (n - 1)
        a, b = min(batch.pfn0, last), max(batch.pfn0, last) + 1
        made = [(lo, hi) for lo, hi, v, _, _ in self._virt.runs(a, b) if v < 0]
        for p in (p for lo, hi in made for p in range(lo, hi)):   # SPs made of some
            sp = self.by_pfn.pop(p)
            sp.freed = True
            self._poison(sp)
        self._virt.assign(a, b, -1)
        self.mem.free_run(batch.pfn0, n, who, batch.dpfn)
        self.freed += n
        self.live -= n

    def kid_pages(self, kr: KidRun, m: int) -> list[tuple[int, int, int]]:
        """The host pages the leaves of the first ``m`` tables of ``kr`` map, in order, as
        ranges (first PFN, count, generation): one range when each table's leaves continue
        the last's, else one per table."""
        first = S.spte_to_pfn(kr.base0)
        if kr.dbase == S.SPTE_ENTRIES * self.STEP:
            return [(first, m * S.SPTE_ENTRIES, kr.lgen)]
        return [(S.spte_to_pfn(kr.base0 + k * kr.dbase), S.SPTE_ENTRIES, kr.lgen)
                for k in range(m)]

    def _dense(self, sp: ShadowPage) -> None:
        """Expand a compact table into arrays (from now on it stays dense)."""
        lo, hi, base, step, gen, bg = sp._gens
        spt = np.full(S.SPTE_ENTRIES, bg, dtype=np.uint64)
        gens = np.zeros(S.SPTE_ENTRIES, dtype=np.uint32)
        if hi > lo:
            spt[lo:hi] = U64(base) + np.arange(hi - lo, dtype=np.uint64) * U64(step)
            gens[lo:hi] = gen
        sp._spt, sp._gens = spt, gens

    def _poison(self, sp: ShadowPage) -> None:
        if sp._spt is None:
            lo, hi, base, step, gen, bg = sp._gens
            sp._gens = (lo, hi, POISON, 0, gen, POISON)
        else:
            sp._spt.fill(POISON)

    # ---- reads ---------------------------------------------------------------------------

    def _span(self, sp: ShadowPage, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """SPTEs and generations of entries [lo, hi) of a compact table, as arrays."""
        rlo, rhi, base, step, gen, bg = sp._gens
        spt = np.full(hi - lo, bg, dtype=np.uint64)
        gens = np.zeros(hi - lo, dtype=np.uint32)
        a, b = max(lo, rlo), min(hi, rhi)
        if a < b:
            spt[a - lo:b - lo] = U64(base + (a - rlo) * step) + \
                np.arange(b - a, dtype=np.uint64) * U64(step)
            gens[a - lo:b - lo] = gen
        return spt, gens

    def _entry(self, sp: ShadowPage, i: int) -> tuple[int, int]:
        rlo, rhi, base, step, gen, bg = sp._gens
        if rlo <= i < rhi:
            return base + (i - rlo) * step, gen
        return bg, 0

    def read(self, sp: ShadowPage, i: int) -> int:
        self._settled(sp, i, i + 1, True)
        return int(sp._spt[i]) if sp._spt is not None else self._entry(sp, i)[0]

    def read_for_update(self, sp: ShadowPage, i: int) -> int:
        self._settled(sp, i, i + 1, False)
        return int(sp._spt[i]) if sp._spt is not None else self._entry(sp, i)[0]

    def gen(self, sp: ShadowPage, i: int) -> int:
        self._settled(sp, i, i + 1, True)
        return int(sp._gens[i]) if sp._spt is not None else self._entry(sp, i)[1]

    def entries(self, sp: ShadowPage, lo: int = 0, hi: int = S.SPTE_ENTRIES) -> np.ndarray:
        self._settled(sp, lo, hi, True)
        return sp._spt[lo:hi].copy() if sp._spt is not None else self._span(sp, lo, hi)[0]

    def entries_at(self, sp: ShadowPage, idx: np.ndarray, lo: int, hi: int) -> np.ndarray:
        self._settled(sp, lo, hi, True)
        if sp._spt is not None:
            return sp._spt[idx]
        return self._span(sp, 0, S.SPTE_ENTRIES)[0][idx]

    def gens_at(self, sp: ShadowPage, idx, lo: int, hi: int) -> np.ndarray:
        self._settled(sp, lo, hi, True)
        if sp._spt is not None:
            return sp._gens[idx].copy()
        return self._span(sp, 0, S.SPTE_ENTRIES)[1][idx]

    # ---- writes --------------------------------------------------------------------------

    def write(self, sp: ShadowPage, i: int, spte: int, gen: int | None = None) -> None:
        self._settled(sp, i, i + 1, False)
        if sp._spt is None:
            old_spte, old_gen = self._entry(sp, i)
            g = old_gen if gen is None else gen
            if (spte, g) == (old_spte, old_gen):
                return
            if self._extend(sp, i, i + 1, spte, g):
                return
            self._dense(sp)
        sp._spt[i] = spte
        if gen is not None:
            sp._gens[i] = gen

    def _extend(self, sp: ShadowPage, a: int, b: int, first: int, gen: int) -> bool:
        """Entries [a, b) become ``first``, ``first + step``, ... with generation ``gen``:
        True if the compact form can say so (a new run on an empty background, or one
        that continues the run at either end)."""
        rlo, rhi, base, step, rgen, bg = sp._gens
        st = self.STEP
        if bg != 0 or first == 0:
            return False
        if rhi == rlo:
            sp._gens = (a, b, first, st, gen, 0)
            return True
        if step != st or gen != rgen:
            return False
        if a == rhi and first == base + (rhi - rlo) * st:
            sp._gens = (rlo, b, base, st, gen, 0)
            return True
        if b == rlo and first + (b - a) * st == base:
            sp._gens = (a, rhi, first, st, gen, 0)
            return True
        return False

    def write_many(self, sp: ShadowPage, lo: int, hi: int, idx, sptes: np.ndarray,
                   gens: np.ndarray | int) -> None:
        self._settled(sp, lo, hi, False)
        if sp._spt is None and self._write_compact(sp, idx, sptes, gens):
            return
        if sp._spt is None:
            self._dense(sp)
        sp._spt[idx] = sptes
        sp._gens[idx] = gens

    def _write_compact(self, sp: ShadowPage, idx, sptes, gens) -> bool:
        if not isinstance(idx, slice):
            return False
        a, b, stride = idx.indices(S.SPTE_ENTRIES)
        if stride != 1 or b <= a:
            return b <= a and stride == 1          # an empty write changes nothing
        n = b - a
        if not isinstance(sptes, np.ndarray) or sptes.shape != (n,):
            sptes = np.broadcast_to(np.asarray(sptes, dtype=np.uint64), (n,))
        if isinstance(gens, np.ndarray) and gens.ndim:
            g0 = int(gens[0])
            if n > 1 and (gens != g0).any():
                return False
        else:
            g0 = int(gens)
        first = int(sptes[0])
        rlo, rhi, base, step, rgen, bg = sp._gens
        if first == 0 and g0 == 0 and not sptes.any():
            # zeroing: the compact form survives if it clears the whole run (or nothing)
            if bg != 0:
                return False
            if b <= rlo or a >= rhi:
                return True
            if a <= rlo and rhi <= b:
                sp._gens = (0, 0, 0, 0, 0, 0)
                return True
            return False
        if n > 1 and ((sptes[1:] - sptes[:-1]) != U64(self.STEP)).any():
            return False
        return self._extend(sp, a, b, first, g0)

    def _bits_compact(self, sp: ShadowPage, idx: np.ndarray, new_base: int) -> bool:
        """OR/AND of flag bits (never PFN bits) at ``idx`` (sorted, distinct) as the
        compact form: True if it changes nothing there, or changes exactly the whole run
        (its entries then all become ``new_base + k * step``)."""
        rlo, rhi, base, step, gen, bg = sp._gens
        if not len(idx):
            return True
        inside = int(idx[0]) >= rlo and int(idx[-1]) < rhi
        if inside and new_base == base:
            return True
        if inside and len(idx) == rhi - rlo:
            sp._gens = (rlo, rhi, new_base, step, gen, bg)
            return True
        return False

    def set_bits(self, sp: ShadowPage, idx: np.ndarray, lo: int, hi: int, bits: int) -> None:
        self._settled(sp, lo, hi, False)
        if sp._spt is None:
            if not bits & S.PFN_MASK and self._bits_compact(sp, idx, sp._gens[2] | bits):
                return
            self._dense(sp)
        sp._spt[idx] |= U64(bits)

    def clear_bits(self, sp: ShadowPage, idx: np.ndarray, lo: int, hi: int, bits: int) -> None:
        self._settled(sp, lo, hi, False)
        if sp._spt is None:
            if not bits & S.PFN_MASK and self._bits_compact(sp, idx, sp._gens[2] & ~bits):
                return
            self._dense(sp)
        sp._spt[idx] &= ~U64(bits)

    def freeze_all(self, sp: ShadowPage, unless_frozen: bool
                   ) -> tuple[np.ndarray, np.ndarray] | None:
        self._settled(sp, 0, S.SPTE_ENTRIES, False)
        if sp._spt is not None:
            return _freeze_arrays(sp._spt, sp._gens, unless_frozen)
        old, gens = self._span(sp, 0, S.SPTE_ENTRIES)
        if unless_frozen and (old == _REMOVED).any():
            return None
        rlo, rhi, base, step, gen, bg = sp._gens
        sp._gens = (rlo, rhi, S.REMOVED_SPTE, 0, gen, S.REMOVED_SPTE)
        return old, gens


#: the layouts a run can choose (``--storage``)
STORES: dict[str, type[PageTableStore]] = {"dense": DenseStore, "compressed": CompactStore}
