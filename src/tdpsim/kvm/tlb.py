"""A vCPU's TLB and paging-structure cache (PSC), and the hardware EPT walker.

* TLB: gfn -> (pfn, host page generation, writable, dirty, fill time).  A write through an
  entry whose dirty bit is clear walks again to set D, as the CPU does.
* PSC: the PDE cache, gfn >> 9 -> PFN of the 4 KiB table, so a walk can start at the
  last level.  Stale PSC entries are why a removed page table must not be freed before a
  flush: a walk through one reads whatever page now lives at that PFN.  (Upper-level
  paging-structure caches are not modelled; the PDE cache is the one that points at the
  tables zaps free most.)
* Capacity: LRU with ``capacity`` TLB entries and ``psc_capacity`` entries per level;
  ``None`` is unbounded (for checking: nothing is ever evicted, so every stale entry stays
  usable until a flush).
* The whole cache is dropped on a flush (KVM_REQ_TLB_FLUSH) and on root load (the local
  flush of the current context; entries of other roots could not be used anyway).

The walker reads SPTEs from memory, sets Accessed (and Dirty on a write) in the leaf SPTE
(EPT A/D assist), and reports an EPT violation when the entry is not present or not
writable for a write.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from ..mmu import spte as S

if TYPE_CHECKING:
    from ..mmu.page import ShadowPage
    from ..mmu.store import PageTableStore


class TlbEntry:
    __slots__ = ("pfn", "gen", "writable", "dirty", "fill_t", "level", "executable")

    def __init__(self, pfn, gen, writable, dirty, fill_t, level, executable=True):
        self.pfn = pfn
        self.gen = gen
        self.writable = writable
        self.dirty = dirty
        self.fill_t = fill_t
        self.level = level
        self.executable = executable


class Tlb:
    def __init__(self, capacity: int | None = 1536, psc_capacity: int | None = 32):
        self.capacity = capacity
        self.psc_capacity = psc_capacity
        self._entries: OrderedDict[int, TlbEntry] = OrderedDict()
        #: fills recorded by ``fill_many`` but not yet turned into entries (see there)
        self._pending: tuple | None = None
        self.psc: dict[int, OrderedDict[int, int]] = {}
        self.flushes = 0
        self.last_flush_t = 0
        self.hits = 0
        self.misses = 0

    @property
    def entries(self) -> "OrderedDict[int, TlbEntry]":
        """gfn -> entry, least recently used first."""
        if self._pending is not None:
            self._materialize()
        return self._entries

    def flush(self, now: int = 0) -> None:
        self._entries.clear()
        self._pending = None
        self.psc.clear()
        self.flushes += 1
        self.last_flush_t = now

    def lookup(self, gfn: int) -> TlbEntry | None:
        if self._pending is not None:
            if not (self._pending[0] == gfn).any():
                return None                     # a miss changes nothing
            self._materialize()
        e = self._entries.get(gfn)
        if e is not None:
            self._entries.move_to_end(gfn)
        return e

    def count_misses(self, n: int) -> None:
        """``n`` accesses that missed the TLB (and walked)."""
        self.misses += n

    def gfns_in(self, lo: int, hi: int) -> list[int]:
        """The gfns in [lo, hi) that have an entry (without touching the LRU order)."""
        if self._pending is not None:           # then the entries are the pending ones
            g = self._pending[0]
            return g[(g >= lo) & (g < hi)].tolist()
        ents = self._entries
        if hi - lo < len(ents):
            return [g for g in range(lo, hi) if g in ents]
        return sorted(g for g in ents if lo <= g < hi)

    def fill(self, gfn: int, e: TlbEntry) -> None:
        ents = self.entries
        ents[gfn] = e
        ents.move_to_end(gfn)
        if self.capacity is not None and len(ents) > self.capacity:
            ents.popitem(last=False)

    def fill_many(self, gfns, pfns, gens, times, writable: bool, dirty: bool,
                  level: int = 1, executable: bool = True) -> None:
        """``fill`` for each of these distinct gfns in order (NumPy arrays of equal length).

        While the TLB holds only such fills, they are kept as arrays (the newest
        ``capacity`` of them, which is what LRU leaves when the gfns are distinct) and made
        into entries only when the TLB is next read: a vCPU populating memory refills its
        TLB at every bulk, and most of those TLBs are never read."""
        cap = self.capacity
        if cap is not None:                     # older fills of these are evicted anyway
            gfns, pfns, gens, times = gfns[-cap:], pfns[-cap:], gens[-cap:], times[-cap:]
        n = len(gfns)
        if not n:
            return
        flags = np.array([(writable, dirty, level, executable)], dtype=np.int64)
        new = (gfns, pfns, gens, times, np.repeat(flags, n, axis=0))
        if self._entries:
            if cap is None or n < cap:
                self._fill_each(*new)
                return
            self._entries.clear()               # all of them are evicted
        elif self._pending is not None:
            old = self._pending
            if np.isin(gfns, old[0]).any():     # a refill: LRU order is not a concatenation
                self._materialize()
                self._fill_each(*new)
                return
            new = tuple(np.concatenate((o, x)) for o, x in zip(old, new))
        if cap is not None:
            new = tuple(x[-cap:] for x in new)
        self._pending = tuple(x.copy() for x in new)

    def _fill_each(self, gfns, pfns, gens, times, flags) -> None:
        for g, p, gg, t, (w, d, lv, x) in zip(gfns.tolist(), pfns.tolist(), gens.tolist(),
                                              times.tolist(), flags.tolist()):
            self.fill(g, TlbEntry(p, gg, bool(w), bool(d), t, lv, bool(x)))

    def _materialize(self) -> None:
        pend, self._pending = self._pending, None
        self._fill_each(*pend)

    def psc_lookup(self, level: int, gfn: int) -> int | None:
        d = self.psc.get(level)
        if d is None:
            return None
        return d.get(gfn >> ((level - 1) * S.LEVEL_BITS))

    def psc_fill_new(self, level: int, gfns: np.ndarray, pfns: list[int]) -> None:
        """Walks through distinct regions in order: each fills the cache (``psc_fill``)
        unless its region is cached at its turn (a hit refreshes nothing).  Costs per
        region already cached, not per walk: only those can hit, and one of them is still
        cached at its turn iff fewer of the entries older than it have been evicted."""
        d = self.psc.setdefault(level, OrderedDict())
        keys = (np.asarray(gfns, dtype=np.int64) >> ((level - 1) * S.LEVEL_BITS)).tolist()
        cap = self.psc_capacity
        if cap is not None and len(keys) >= cap and not any(k in d for k in keys):
            # all miss and fill: the newest cap of them are what stays
            d.clear()
            d.update(zip(keys[-cap:], pfns[-cap:]))
            return
        old = {k: r for r, k in enumerate(d)}           # rank in LRU order, oldest 0
        m = len(old)
        hits = set()
        for j, k in enumerate(keys):
            r = old.get(k)
            if r is None:
                continue
            inserted = j - len(hits)                    # walks before this one that filled
            evicted = 0 if cap is None else max(0, m + inserted - cap)
            if evicted <= r:
                hits.add(j)
        new = [(k, p) for j, (k, p) in enumerate(zip(keys, pfns)) if j not in hits]
        for k, p in new[-cap:] if cap is not None else new:
            d[k] = p
            d.move_to_end(k)
        if cap is not None:
            while len(d) > cap:
                d.popitem(last=False)

    def psc_fill(self, level: int, gfn: int, pfn: int) -> None:
        d = self.psc.setdefault(level, OrderedDict())
        key = gfn >> ((level - 1) * S.LEVEL_BITS)
        d[key] = pfn
        d.move_to_end(key)
        if self.psc_capacity is not None and len(d) > self.psc_capacity:
            d.popitem(last=False)


class WalkResult:
    """Outcome of a hardware walk: ``ok`` with the translation, or an EPT violation."""
    __slots__ = ("ok", "pfn", "gen", "level", "writable", "executable", "freed_table")

    def __init__(self, ok, pfn=0, gen=0, level=1, writable=False, freed_table=None,
                 executable=True):
        self.ok = ok
        self.pfn = pfn
        self.gen = gen
        self.level = level
        self.writable = writable
        self.executable = executable
        self.freed_table = freed_table   # (pfn, where) if the walk read a freed table


def hw_walk(pt: "PageTableStore", root: "ShadowPage", tlb: Tlb, gfn: int, write: bool,
            exe: bool = False) -> WalkResult:
    """The CPU's EPT walk for ``gfn``, starting at the cached PDE if there is one.

    On success sets A (and D for a write) in the leaf SPTE and fills the PDE cache (the
    caller fills the TLB).  It walks with the store's walker (``pt.walk``), which settles
    fast-mode bulks before each read and write."""
    pfn = tlb.psc_lookup(2, gfn)
    if pfn is not None:
        start = pt.lookup(pfn)
        if start is None or start.freed:
            return WalkResult(False, freed_table=(pfn, "PDE cache"))
    else:
        start = root
    it = pt.walk(start, 1, gfn, report=False)
    while True:
        spte, level = it.old_spte, it.level
        if not S.is_shadow_present_pte(spte):
            return WalkResult(False)
        if S.is_last_spte(spte, level):
            if (write and not spte & S.EPT_W) or (exe and not spte & S.EPT_X):
                return WalkResult(False)
            new = spte | S.SHADOW_ACCESSED | (S.SHADOW_DIRTY if write else 0)
            if new != spte:
                pt.write(it.sp, it.index, new)   # A/D assist
            base = S.spte_to_pfn(spte)
            off = gfn & (S.pages_per_hpage(level) - 1)
            return WalkResult(True, base + off, pt.gen(it.sp, it.index), level,
                              bool(spte & S.EPT_W), executable=bool(spte & S.EPT_X))
        child_pfn = S.spte_to_pfn(spte)
        if not it.try_step_down():
            return WalkResult(False, freed_table=(child_pfn, f"L{level} entry"))
        if level == 2:
            tlb.psc_fill(2, gfn, child_pfn)
