"""The TDP MMU core (arch/x86/kvm/mmu/tdp_mmu.c): roots, SPTE updates, zapping, yielding.

Function names are the kernel's; each docstring says what it models and any deliberate
difference.  Where 5.17 and 5.18 differ the code consults ``self.policy`` (see policy.py).
All functions that may block or take simulated time are generators (``yield from``).

Model-wide simplifications:
* ``tdp_mmu_pages_lock`` is taken instantaneously (no contention modelled).
* ``handle_removed_pt`` processes a table in one step (vectorised over its 512 entries) and
  then charges its cost; other tasks cannot observe a half-processed table.
* A table's entries carry, beside the SPTE, the generation of the host page a leaf maps
  (kept by the page-table store), so an A/D write-back to a page freed since is caught.
* Entries are read and written only through the store (``self.pt``, store.py), which
  settles fast-mode bulks itself.  Fast mode plugs accelerators of named loops into
  ``self.accel`` (tdpsim.fast); this module does not know them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Generator

import numpy as np

from ..host.workqueue import WorkItem
from . import spte as S
from .page import ROLE_INVALID, ShadowPage, make_role
from .policy import Policy
from .store import STORES, as_leaves
from .tdp_iter import TdpIter

if TYPE_CHECKING:
    from ..host.sched import Thread
    from ..kvm.vm import Kvm

U64 = np.uint64
_PAGE_STATS = {1: "pages_4k", 2: "pages_2m", 3: "pages_1g"}


class TdpMmu:
    """The TDP MMU state of one VM (the ``kvm->arch`` TDP fields)."""

    def __init__(self, kvm: "Kvm", policy: Policy, storage: str = "dense"):
        self.kvm = kvm
        self.host = kvm.host
        self.engine = kvm.engine
        self.costs = kvm.costs
        self.policy = policy
        #: the page-table store: the only owner of SPTE storage
        self.pt = STORES[storage](kvm.host, kvm.name)
        #: fast-mode accelerators (``kvm.accel``) of the leaf walks: "tdp_mmu_zap_leafs",
        #: "wrprot_gfn_range", "clear_dirty_gfn_range", each called at a 4 KiB entry right
        #: after the yield check passed, ``(th, it, end) -> (entries done, changed)``; and
        #: of handle_removed_pt's loop over a table's children: "handle_removed_kids",
        #: ``(th, sp, old entries, child indices, pos, shared) -> children done``
        self.accel = kvm.accel
        #: kvm->arch.tdp_mmu_roots, newest first (valid and invalid)
        self.roots: list[ShadowPage] = []
        #: kvm->arch.tdp_mmu_pages: how many non-root tables are linked (the kernel keeps a
        #: list only to WARN at teardown if it is not empty)
        self.nr_pages = 0
        #: kvm->arch.lpage_disallowed_mmu_pages (NX recovery list), oldest first
        self.lpage_disallowed: OrderedDict[int, ShadowPage] = OrderedDict()
        #: tdp_mmu_zap_wq: "kvm", UNBOUND | MEM_RECLAIM | CPU_INTENSIVE
        self.zap_wq = kvm.host.workqueue(f"{kvm.name}:kvm")
        # tdp_mmu_max_gfn_host: the host's physical address width bounds every walk
        self.max_gfn_host = 1 << (kvm.maxphyaddr - S.PAGE_SHIFT)
        # kvm_mmu_get_tdp_level: 5-level only if MAXPHYADDR needs it
        self.root_level = 5 if kvm.maxphyaddr > 48 else 4
        #: entries frozen with REMOVED by tdp_mmu_zap_spte_atomic: (sp id, index) -> task
        self.frozen: dict[tuple[int, int], str] = {}
        self.roots_freed = 0
        self.root_zaps: list[dict] = []     # who zapped which root, when, how long
        #: model-only work counters: leaf SPTEs installed and zapped (any level), for the
        #: "simulated SPTE operations per wall second" figure
        self.leaves_installed = 0
        self.leaves_zapped = 0

    # ---- reporting ------------------------------------------------------------------------

    def warn(self, name: str, th: "Thread | None", **details) -> None:
        """A kernel WARN_ON(_ONCE) fired: reported as a finding by the check layer."""
        self.host.report("warn", th, warn=name, **details)

    # ---- roots ----------------------------------------------------------------------------

    def kvm_tdp_mmu_get_root(self, root: ShadowPage) -> bool:
        """kvm_tdp_mmu_get_root: refcount_inc_not_zero."""
        if root.tdp_mmu_root_count == 0:
            return False
        root.tdp_mmu_root_count += 1
        return True

    def kvm_tdp_mmu_get_vcpu_root_hpa(self, vcpu, th: "Thread") -> ShadowPage:
        """kvm_tdp_mmu_get_vcpu_root_hpa (mmu_lock held for write): reuse a root whose role
        matches (an invalid root never matches), else allocate one with refcount 1."""
        role = make_role(self.root_level, 0, vcpu.cr0_wp)
        for root in self.roots:
            if root.role == role and self.kvm_tdp_mmu_get_root(root):
                return root
        root = self.pt.alloc(0, role, None)
        root.tdp_mmu_root_count = 1
        root.work = WorkItem(self.tdp_mmu_zap_root_work, f"zap_root#{root.id}", data=root)
        self.roots.insert(0, root)
        self.kvm.observe("root_alloc", root=root, t=self.engine.now)
        return root

    def kvm_tdp_mmu_put_root(self, th: "Thread", root: ShadowPage, shared: bool) -> Generator:
        """kvm_tdp_mmu_put_root.

        5.18: on the last reference, ``xchg`` the invalid bit into the role: a valid
        ("defunct") root gets its count back to 1 and a zap work item (the caller is not
        blocked); an already invalid root is unlinked and freed after a grace period."""
        if root.tdp_mmu_root_count <= 0:
            self.host.report("refcount_underflow", th, root=root.id,
                             count=root.tdp_mmu_root_count)
            return
        root.tdp_mmu_root_count -= 1
        if root.tdp_mmu_root_count:
            return
        if not self.policy.async_defunct_zap:
            # 5.17: unlink (unreachable by every iterator, notifiers included), then tear
            # the whole root down here, in the caller's context and lock mode, no yield
            self._unlink_root(th, root)
            t0 = self.engine.now
            doing, th.doing = th.doing, "kvm_tdp_mmu_put_root > zap_gfn_range"
            yield from self.zap_gfn_range(th, root, 0, 1 << 62, can_yield=False, flush=False,
                                          shared=shared)
            th.doing = doing
            root.zapped_by = th.name
            self.root_zaps.append({"root": root.id, "task": th.name, "start": t0,
                                   "ns": self.engine.now - t0, "shared": shared})
            self.host.rcu.call_rcu(lambda: self._free_sp_rcu(root))
            return
        was_invalid = bool(root.role & ROLE_INVALID)   # xchg on role.word
        root.role |= ROLE_INVALID
        if not was_invalid:
            self.kvm.observe("root_invalidated", root=root, t=self.engine.now, task=th.name)
            root.tdp_mmu_root_count = 1
            self.tdp_mmu_schedule_zap_root(root)
            return
        self._free_root(th, root)
        return
        yield

    def _free_root(self, th: "Thread", root: ShadowPage) -> None:
        """list_del_rcu + call_rcu(tdp_mmu_free_sp_rcu_callback)."""
        if self._unlink_root(th, root):
            self.host.rcu.call_rcu(lambda: self._free_sp_rcu(root))

    def _unlink_root(self, th: "Thread", root: ShadowPage) -> bool:
        """list_del_rcu of a root (under tdp_mmu_pages_lock)."""
        if root not in self.roots:
            self.host.report("double_free", th, pfn=root.pfn, owner=f"root#{root.id}")
            return False
        self.roots.remove(root)
        root.unlinked = True
        root.unlink_t = self.engine.now
        self.kvm.observe("root_unlinked", root=root, t=self.engine.now)
        return True

    def _free_sp_rcu(self, sp: ShadowPage) -> None:
        """tdp_mmu_free_sp_rcu_callback."""
        if sp.is_root:
            self.roots_freed += 1
        self.kvm.observe("sp_freed", sp=sp, t=self.engine.now)
        self.pt.free(sp)

    def tdp_mmu_schedule_zap_root(self, root: ShadowPage) -> None:
        """tdp_mmu_schedule_zap_root: the work item owns the one reference it was given."""
        if not self.zap_wq.queue_work(root.work):
            self.warn("queue_work_pending", None, root=root.id)

    def tdp_mmu_zap_root_work(self, th: "Thread", item: WorkItem) -> Generator:
        """tdp_mmu_zap_root_work: read-lock, zap the root (yielding), put the reference."""
        root: ShadowPage = item.data
        kvm = self.kvm
        yield from kvm.mmu_lock.read_lock(th)
        yield from self.tdp_mmu_zap_root(th, root, shared=True)
        yield from self.kvm_tdp_mmu_put_root(th, root, shared=True)
        kvm.mmu_lock.read_unlock(th)

    def kvm_tdp_mmu_invalidate_all_roots(self, th: "Thread") -> None:
        """kvm_tdp_mmu_invalidate_all_roots (mmu_lock held for write), 5.18: every root not
        yet invalid gets a reference, the invalid bit and a queued zap work item."""
        for root in list(self.roots):
            if root.invalid and self.policy.skip_invalid_on_invalidate:
                continue
            if not self.kvm_tdp_mmu_get_root(root):
                self.warn("invalidate_root_refcount_zero", th, root=root.id)
                continue
            root.role |= ROLE_INVALID
            self.kvm.observe("root_invalidated", root=root, t=self.engine.now, task=th.name)
            if self.policy.async_invalidated_zap:
                self.tdp_mmu_schedule_zap_root(root)
            # 5.17: the reference is a gift to kvm_tdp_mmu_zap_invalidated_roots

    def kvm_tdp_mmu_zap_invalidated_roots(self, th: "Thread") -> Generator:
        """kvm_tdp_mmu_zap_invalidated_roots.

        5.18: flush the zap workqueue.  5.17: take mmu_lock for read and, for every invalid
        root with a non-zero count (assumed to carry a gifted reference), zap it with
        ``zap_gfn_range`` (yielding between top-level entries, each torn down by freeze,
        recursive teardown with a flush per table, flush, zero) and put the gift."""
        if self.policy.async_invalidated_zap:
            yield from self.zap_wq.flush(th)
            return
        kvm = self.kvm
        rcu = self.host.rcu
        yield from kvm.mmu_lock.read_lock(th)
        flush = False
        rcu.read_lock(th)
        done: set[int] = set()
        while True:
            root = next((r for r in self.roots if r.invalid and r.tdp_mmu_root_count
                         and r.id not in done), None)
            if root is None:
                break
            done.add(root.id)
            rcu.read_unlock(th)
            doing, th.doing = th.doing, "kvm_tdp_mmu_zap_invalidated_roots"
            t0 = self.engine.now
            flush = yield from self.zap_gfn_range(th, root, 0, 1 << 62, can_yield=True,
                                                  flush=flush, shared=True)
            self.root_zaps.append({"root": root.id, "task": th.name, "start": t0,
                                   "ns": self.engine.now - t0, "shared": True})
            th.doing = doing
            yield from self.kvm_tdp_mmu_put_root(th, root, shared=True)
            rcu.read_lock(th)
        rcu.read_unlock(th)
        kvm.mmu_lock.read_unlock(th)
        if flush:
            yield from kvm.flush_remote_tlbs(th)

    def tdp_mmu_next_root(self, th: "Thread", prev: ShadowPage | None, as_id: int,
                          shared: bool, only_valid: bool) -> Generator:
        """tdp_mmu_next_root: the next root (with a reference) after ``prev``; puts ``prev``.

        5.18: a caller holding mmu_lock for read must only walk valid roots."""
        if shared and not only_valid and self.policy.readers_skip_invalid_roots:
            self.warn("reader_walks_invalid_roots", th)   # 5.18 asserts the lock mode
        roots = self.roots
        start = roots.index(prev) + 1 if prev is not None and prev in roots else 0
        nxt = None
        for root in roots[start:]:
            if root.as_id != as_id or (only_valid and root.invalid):
                continue
            if self.kvm_tdp_mmu_get_root(root):
                nxt = root
                break
        if nxt is not None and shared and nxt.invalid and self.policy.readers_skip_invalid_roots:
            self.kvm.observe("reader_ref_invalid_root", root=nxt, task=th.name,
                             t=self.engine.now)
        if prev is not None:
            yield from self.kvm_tdp_mmu_put_root(th, prev, shared)
        return nxt

    def walk_roots(self, th: "Thread", as_id: int, shared: bool, only_valid: bool, body):
        """for_each_(valid_)tdp_mmu_root_yield_safe: ``body(root)`` is a generator run with
        a reference held on ``root``; returns nothing."""
        root = yield from self.tdp_mmu_next_root(th, None, as_id, shared, only_valid)
        while root is not None:
            yield from body(root)
            root = yield from self.tdp_mmu_next_root(th, root, as_id, shared, only_valid)

    def for_each_tdp_mmu_root(self, th: "Thread", as_id: int) -> list[ShadowPage]:
        """for_each_tdp_mmu_root: 5.18 asserts mmu_lock is held for write; no references."""
        if self.kvm.mmu_lock.held_by(th) != "write":
            self.warn("for_each_tdp_mmu_root_without_write_lock", th)
        return [r for r in self.roots if r.as_id == as_id]

    # ---- SPTE updates ------------------------------------------------------------------------

    def tdp_mmu_set_spte_atomic(self, th: "Thread", it: TdpIter, new: int,
                                gen: int | None = None) -> Generator:
        """tdp_mmu_set_spte_atomic: cmpxchg under mmu_lock read.  On a lost race refreshes
        ``it.old_spte`` and returns False; on success runs the change bookkeeping."""
        sp, i = it.sp, it.index
        pt = self.pt
        if it.yielded or S.is_removed_spte(it.old_spte):
            if self.policy.removed_spte_checks:
                self.warn("set_spte_atomic_on_removed_or_yielded", th, gfn=it.gfn,
                          level=it.level)
            return False        # 5.17: -EBUSY silently (a caller may retry forever)
        cur = pt.read_for_update(sp, i)
        if cur != it.old_spte:
            it.old_spte = cur
            return False
        if self.frozen:
            self._check_frozen(th, sp, i)
        if sp.root.invalid and S.is_shadow_present_pte(new) and not S.is_shadow_present_pte(cur):
            self.host.report("invalid_root_gains_spte", th, root=sp.root.id, gfn=it.gfn)
        old, old_gen = cur, pt.gen(sp, i)
        # a frozen entry keeps the generation of the page its old value mapped
        pt.write(sp, i, new, gen if gen is not None else
                 (old_gen if new == S.REMOVED_SPTE else 0))
        yield from self.__handle_changed_spte(th, it.as_id, it.gfn, old, new, it.level, True,
                                              old_gen)
        self.handle_changed_spte_acc_track(th, old, new, it.level, old_gen)
        return True

    def tdp_mmu_zap_spte_atomic(self, th: "Thread", it: TdpIter) -> Generator:
        """tdp_mmu_zap_spte_atomic: freeze with REMOVED, flush the range, then write 0, so
        no new translation can be installed before the old one is flushed."""
        ok = yield from self.tdp_mmu_set_spte_atomic(th, it, S.REMOVED_SPTE)
        if not ok:
            return False
        key = (it.sp.id, it.index)
        self.frozen[key] = th.name
        yield from self.kvm.flush_remote_tlbs_with_address(th, it.gfn,
                                                           S.pages_per_hpage(it.level))
        del self.frozen[key]
        self.pt.write(it.sp, it.index, 0)    # only the freezer writes the final value
        return True

    def _check_frozen(self, th: "Thread", sp: ShadowPage, index: int) -> None:
        """A REMOVED SPTE is written only by the thread that froze it."""
        owner = self.frozen.get((sp.id, index))
        if owner is not None and owner != th.name:
            self.host.report("removed_written_by_non_owner", th, sp=sp.id, index=index,
                             freezer=owner)

    def __tdp_mmu_set_spte(self, th: "Thread", as_id: int, sp: ShadowPage, index: int,
                           old: int, new: int, gfn: int, level: int, record_acc_track=True,
                           record_dirty_log=True, gen: int = 0) -> Generator:
        """__tdp_mmu_set_spte (mmu_lock held for write; raw values so NX recovery can zap
        through ``sp->ptep``).  5.18 WARNs if the old or the new value is REMOVED."""
        if S.is_removed_spte(old) or (self.policy.removed_spte_checks and
                                      S.is_removed_spte(new)):
            self.warn("set_spte_removed_in_nonatomic_path", th, gfn=gfn, level=level)
        if self.frozen:
            self._check_frozen(th, sp, index)
        if sp.root.invalid and S.is_shadow_present_pte(new) and not S.is_shadow_present_pte(old):
            self.host.report("invalid_root_gains_spte", th, root=sp.root.id, gfn=gfn)
        old_gen = self.pt.gen(sp, index)
        self.pt.write(sp, index, new, gen)
        yield from self.__handle_changed_spte(th, as_id, gfn, old, new, level, False, old_gen)
        if record_acc_track:
            self.handle_changed_spte_acc_track(th, old, new, level, old_gen)
        if record_dirty_log:
            self.handle_changed_spte_dirty_log(as_id, gfn, old, new, level)

    def tdp_mmu_set_spte(self, th: "Thread", it: TdpIter, new: int, gen: int = 0,
                         record_acc_track=True, record_dirty_log=True) -> Generator:
        """tdp_mmu_set_spte (+ _no_acc_track / _no_dirty_log variants by flag)."""
        if self.policy.removed_spte_checks and it.yielded:
            self.warn("set_spte_after_yield", th, gfn=it.gfn)
        yield from self.__tdp_mmu_set_spte(th, it.as_id, it.sp, it.index, it.old_spte, new,
                                           it.gfn, it.level, record_acc_track,
                                           record_dirty_log, gen)

    # ---- change bookkeeping ------------------------------------------------------------

    # ---- batch operations (the fast-path accelerators' way to change TDP MMU state) -----------

    def install_tables(self, parent: ShadowPage, idx: list[int], role: int,
                       full=None) -> list[int]:
        """Allocate a table for each empty entry ``idx`` of ``parent`` (ascending) and link
        it, as a fault's tdp_mmu_link_sp does when its cmpxchg wins; ``full`` (store.py's
        ``LeafRows`` / ``AffineLeaves``): those tables get all 512 4 KiB leaves at once,
        as ``install_leaves`` would.  Returns the tables' PFNs."""
        full = as_leaves(full)
        pfns = self.pt.alloc_tables(parent, idx, role, full)
        self.nr_pages += len(idx)
        if full:
            self._update_page_stats(S.PG_LEVEL_4K, S.SPTE_ENTRIES * full.n)
        return pfns

    def unlink_children(self, th: "Thread", pieces: list, k: int, times: np.ndarray,
                        shared: bool, queue: int | None = None) -> list:
        """handle_removed_pt of the first ``k`` children in ``pieces`` (plain full leaf
        tables of a removed table, as ``PageTableStore.removable_children`` gives them),
        child j at ``times[j]``: unlink, freeze, zap its 512 leaves (statistics), and
        call_rcu(free) for the first ``queue`` of them (all by default).  The caller has
        checked that their leaves' pages are live (no write-back to report) and that an
        RCU grace period is running (when a callback is queued does not matter then); it
        does any flush per table.  The callbacks are queued as one batch: nothing can come
        between them.  Returns the frees not queued, for ``free_children``."""
        pt = self.pt
        kvm = self.kvm
        queue = k if queue is None else queue
        done, frees, later = 0, [], []
        for piece in pieces:
            if done == k:
                break
            dst = frees if done < queue else later
            if isinstance(piece, ShadowPage):
                sp, t = piece, int(times[done])
                pt.settle_all(sp)
                sp.unlinked = True
                sp.unlink_t = t
                if kvm.observers:
                    kvm.observe("sp_unlinked", sp=sp, t=t, task=th.name)
                pt.freeze_all(sp, unless_frozen=shared)
                dst.append(sp)
                done += 1
                continue
            run, c = piece
            c = min(c, k - done)
            while c:                        # (in two parts if it straddles ``queue``)
                part = queue - done if done < queue < done + c else c
                batch = pt.detach_kids(run, part, times[done:done + part])
                if kvm.observers:
                    kvm.observe("sps_unlinked", tables=batch, t=int(times[done]),
                                task=th.name)
                (frees if done < queue else later).append(batch)
                done += part
                c -= part
                if c:
                    run = pt.rest_of(run)
        self.nr_pages -= k
        self._update_page_stats(S.PG_LEVEL_4K, -S.SPTE_ENTRIES * k)
        self.free_children(frees, queue)
        return later

    def free_children(self, frees: list, n: int) -> None:
        """call_rcu(free) for the ``n`` tables of ``frees`` (SPs and batches of a run, in
        order), queued back to back."""
        if not n:
            return

        def free_all() -> None:
            for f in frees:
                if isinstance(f, ShadowPage):
                    self._free_sp_rcu(f)
                else:
                    self._free_kids_rcu(f)
        self.host.rcu.call_rcu(free_all, n)

    def _free_kids_rcu(self, batch) -> None:
        """tdp_mmu_free_sp_rcu_callback for each table of a batch, in order."""
        self.kvm.observe("sps_freed", tables=batch, t=self.engine.now)
        self.pt.free_kids(batch)

    def install_leaves(self, sp: ShadowPage, lo: int, hi: int, idx, sptes: np.ndarray,
                       gens: np.ndarray) -> None:
        """Install 4 KiB leaves at ``idx`` (within [lo, hi)) of ``sp``, all empty before: what
        tdp_mmu_map_handle_target_level does for each, with its statistics."""
        self.pt.write_many(sp, lo, hi, idx, sptes, gens)
        self._update_page_stats(S.PG_LEVEL_4K, len(sptes))

    def zap_leaves(self, th: "Thread", sp: ShadowPage, lo: int, hi: int,
                   idx: np.ndarray) -> None:
        """Zap the present 4 KiB leaves at ``idx`` (within [lo, hi)) of ``sp`` under
        mmu_lock held for write: what tdp_mmu_set_spte(.., 0) does for each, in order
        (statistics, then the dirty and the accessed write-back of each leaf)."""
        pt = self.pt
        old = pt.entries_at(sp, idx, lo, hi)
        gens = pt.gens_at(sp, idx, lo, hi)
        pt.write_many(sp, lo, hi, idx, U64(0), 0)
        self._update_page_stats(S.PG_LEVEL_4K, -len(idx))
        mem = self.host.memory
        live = mem.live_mask(S.pfns_of(old), gens)
        if live.all():
            return
        for e in np.flatnonzero(~live).tolist():
            pfn, gen, spte = S.spte_to_pfn(int(old[e])), int(gens[e]), int(old[e])
            if spte & S.SHADOW_DIRTY:
                mem.write_back(pfn, gen, th, "dirty")
            if spte & S.SHADOW_ACCESSED:
                mem.write_back(pfn, gen, th, "accessed")

    def _update_page_stats(self, level: int, delta: int) -> None:
        """kvm_update_page_stats: leaves mapped per level, and the model's work counters."""
        key = _PAGE_STATS.get(level)
        if key:
            self.kvm.stat[key] += delta
            if delta > 0:
                self.leaves_installed += delta
            else:
                self.leaves_zapped -= delta

    def __handle_changed_spte(self, th: "Thread", as_id: int, gfn: int, old: int, new: int,
                              level: int, shared: bool, old_gen: int) -> Generator:
        """__handle_changed_spte: stats, dirty write-back, and removal of a child table."""
        was_present = S.is_shadow_present_pte(old)
        is_present = S.is_shadow_present_pte(new)
        was_leaf = was_present and S.is_last_spte(old, level)
        is_leaf = is_present and S.is_last_spte(new, level)
        pfn_changed = S.spte_to_pfn(old) != S.spte_to_pfn(new)
        if gfn % S.pages_per_hpage(level) or not 1 <= level <= 5:
            self.warn("bad_level_or_gfn", th, gfn=gfn, level=level)
        if was_leaf and is_leaf and pfn_changed:
            self.warn("present_leaf_pfn_changed", th, gfn=gfn, level=level)   # BUG() in KVM
        if old == new:
            return
        if not was_present and not is_present:
            if not S.is_removed_spte(new) and not S.is_removed_spte(old):
                self.warn("nonpresent_to_nonpresent", th, gfn=gfn, old=old, new=new)
            return
        if is_leaf != was_leaf:
            self._update_page_stats(level, 1 if is_leaf else -1)
        if was_leaf and S.is_dirty_spte(old) and (not is_leaf or not S.is_dirty_spte(new)
                                                   or pfn_changed):
            self.host.memory.write_back(S.spte_to_pfn(old), old_gen, th, "dirty")
        if was_present and not was_leaf and (not is_present or is_leaf or pfn_changed):
            if is_present and not is_leaf:
                self.warn("nonleaf_pfn_changed", th, gfn=gfn, level=level)
            child = self.pt.child(old)
            if child is None:
                self.host.report("use_after_free", th, pfn=S.spte_to_pfn(old),
                                 what="handle_removed_pt of a freed table", reused=False,
                                 now_owner=None)
                return
            yield from self.handle_removed_pt(th, child, shared)

    def handle_changed_spte_acc_track(self, th, old: int, new: int, level: int,
                                      old_gen: int) -> None:
        """handle_changed_spte_acc_track: kvm_set_pfn_accessed when an accessed leaf goes."""
        if not S.is_shadow_present_pte(old) or not S.is_last_spte(old, level):
            return
        if not S.is_accessed_spte(old):
            return
        if (not S.is_shadow_present_pte(new) or not S.is_accessed_spte(new)
                or S.spte_to_pfn(old) != S.spte_to_pfn(new)):
            self.host.memory.write_back(S.spte_to_pfn(old), old_gen, th, "accessed")

    def handle_changed_spte_dirty_log(self, as_id: int, gfn: int, old: int, new: int,
                                      level: int) -> None:
        """handle_changed_spte_dirty_log: a 4K leaf becoming writable marks the gfn dirty."""
        if level > 1 or not S.is_shadow_present_pte(new) or not S.is_writable_pte(new):
            return
        if S.is_writable_pte(old) and S.spte_to_pfn(old) == S.spte_to_pfn(new):
            return
        slot = self.kvm.memslots[as_id].find(gfn)
        if slot is not None and slot.dirty_bitmap is not None:
            slot.dirty_bitmap[gfn - slot.base_gfn] = True

    def handle_removed_pt(self, th: "Thread", sp: ShadowPage, shared: bool) -> Generator:
        """handle_removed_pt (handle_removed_tdp_mmu_page in 5.17).

        Unlink ``sp``, freeze every entry with REMOVED (xchg in shared mode, waiting out a
        concurrent freezer), process each old value (write-backs, recursion into children),
        5.17: flush the range; 5.18: leave the flush to the caller; then call_rcu(free)."""
        kvm = self.kvm
        pt = self.pt
        pt.settle_all(sp)
        self.nr_pages -= 1
        if sp.lpage_disallowed:
            self.unaccount_huge_nx_page(sp)
        sp.unlinked = True
        sp.unlink_t = self.engine.now
        if kvm.observers:
            kvm.observe("sp_unlinked", sp=sp, t=self.engine.now, task=th.name)
        # shared: xchg(entry, REMOVED) until the old value is not REMOVED: another thread
        # that froze an entry owns it until it writes the final value
        while (frozen := pt.freeze_all(sp, unless_frozen=shared)) is None:
            yield 20            # poll the frozen entry (cpu_relax loop)
        old, gens = frozen
        present = S.present_mask(old)
        level = sp.level
        # at level 1 every present entry is a leaf
        leaves = present if level == 1 else S.leaf_mask(old, level)
        nleaves = int(np.count_nonzero(leaves))
        cost = (S.SPTE_ENTRIES - int(np.count_nonzero(present))) * self.costs.spte_visit
        if nleaves:
            self._update_page_stats(level, -nleaves)
            self._write_back_many(th, old[leaves], gens[leaves])
            cost += nleaves * self.costs.spte_zap_4k
        if level > 1:
            kids = self.accel.get("handle_removed_kids")
            idx = np.flatnonzero(present & ~leaves).tolist()
            pos = 0
            while pos < len(idx):
                if kids is not None:
                    k = yield from kids(th, sp, old, idx, pos, shared)
                    if k:
                        pos += k
                        continue
                i = idx[pos]
                pos += 1
                child = pt.child(int(old[i]))
                if child is None:
                    self.host.report("use_after_free", th, pfn=S.spte_to_pfn(int(old[i])),
                                     what="handle_removed_pt of a freed table", reused=False,
                                     now_owner=None)
                    continue
                yield from self.handle_removed_pt(th, child, shared)
        if not self.policy.deferred_flush:
            yield from kvm.flush_remote_tlbs_with_address(th, sp.gfn, sp.span())
        self.host.rcu.call_rcu(lambda: self._free_sp_rcu(sp))
        if cost:
            yield cost

    def _write_back_many(self, th, sptes: np.ndarray, gens: np.ndarray) -> None:
        """kvm_set_pfn_dirty / kvm_set_pfn_accessed for many zapped leaves at once."""
        mem = self.host.memory
        wb = (sptes & U64(S.SHADOW_DIRTY | S.SHADOW_ACCESSED)) != 0
        if wb.all():
            pfns, g = S.pfns_of(sptes), gens
        elif not wb.any():
            return
        else:
            pfns, g = S.pfns_of(sptes[wb]), gens[wb]
        live = mem.live_mask(pfns, g)
        if not live.all():
            for p, gg in zip(pfns[~live].tolist(), g[~live].tolist()):
                mem.write_back(p, gg, th, "dirty/accessed")

    # ---- yielding ------------------------------------------------------------------------

    def tdp_mmu_iter_cond_resched(self, th: "Thread", it: TdpIter, flush: bool,
                                  shared: bool) -> Generator:
        """tdp_mmu_iter_cond_resched: yield mmu_lock (and RCU) on need_resched or lock
        contention, after forward progress.  5.18 flushes before dropping RCU."""
        kvm = self.kvm
        host = self.host
        if it.yielded:
            self.warn("cond_resched_already_yielded", th)
        if it.next_last_level_gfn == it.yielded_gfn:
            return False
        if not (host.sched.need_resched(th) or kvm.mmu_lock.needbreak()):
            return False
        if self.policy.flush_before_rcu_unlock:
            if flush:
                yield from kvm.flush_remote_tlbs(th)
            host.rcu.read_unlock(th)
        else:
            host.rcu.read_unlock(th)
            if flush:
                yield from kvm.flush_remote_tlbs(th)
        yield from self.cond_resched_rwlock(th, shared)
        host.rcu.read_lock(th)
        if it.gfn > it.next_last_level_gfn:
            self.warn("cond_resched_gfn_past_next", th)
        it.yielded = True
        kvm.observe("yield", task=th.name, gfn=it.next_last_level_gfn, it_id=it.serial,
                    t=self.engine.now)
        return True

    def cond_resched_rwlock(self, th: "Thread", shared: bool) -> Generator:
        """cond_resched_rwlock_read/_write: unlock; schedule if need_resched (else one
        cpu_relax); lock again, queueing behind any waiter."""
        lock = self.kvm.mmu_lock
        mode = "read" if shared else "write"
        lock.unlock(th, mode)
        if self.host.sched.need_resched(th):
            yield from self.host.sched.cond_resched(th)
        else:
            yield 1
        yield from lock.lock(th, mode)

    # ---- zapping ---------------------------------------------------------------------------

    def tdp_mmu_zap_root(self, th: "Thread", root: ShadowPage, shared: bool) -> Generator:
        """tdp_mmu_zap_root (5.18): two passes, 1 GiB then the top level, under one RCU
        section, yielding (with no flush: the root is unreachable by the guest)."""
        if root.tdp_mmu_root_count == 0:
            self.warn("zap_root_refcount_zero", th, root=root.id)
        t0 = self.engine.now
        rcu = self.host.rcu
        rcu.read_lock(th)
        doing, th.doing = th.doing, "tdp_mmu_zap_root"
        if self.policy.two_pass_root_zap:
            yield from self.__tdp_mmu_zap_root(th, root, shared, S.PG_LEVEL_1G)
        yield from self.__tdp_mmu_zap_root(th, root, shared, root.level)
        th.doing = doing
        rcu.read_unlock(th)
        root.zapped_by = th.name
        self.root_zaps.append({"root": root.id, "task": th.name, "start": t0,
                               "ns": self.engine.now - t0, "shared": shared})

    def __tdp_mmu_zap_root(self, th: "Thread", root: ShadowPage, shared: bool,
                           zap_level: int) -> Generator:
        """__tdp_mmu_zap_root: zap every present entry at ``zap_level`` (tables recurse)."""
        it = TdpIter(self.pt, root, zap_level, 0)
        end = self.max_gfn_host
        visit = self.costs.spte_visit
        while it.valid and it.gfn < end:
            if (yield from self.tdp_mmu_iter_cond_resched(th, it, False, shared)):
                it.next()
                continue
            if not S.is_shadow_present_pte(it.old_spte):
                yield visit
                it.next()
                continue
            if it.level > zap_level:
                it.next()
                continue
            if not shared:
                yield from self.tdp_mmu_set_spte(th, it, 0)
            else:
                while not (yield from self.tdp_mmu_set_spte_atomic(th, it, 0)):
                    if not S.is_shadow_present_pte(it.old_spte):
                        break
            yield visit
            it.next()

    def tdp_mmu_zap_leafs(self, th: "Thread", root: ShadowPage, start: int, end: int,
                          can_yield: bool, flush: bool) -> Generator:
        """tdp_mmu_zap_leafs (mmu_lock held for write): zap leaf SPTEs in [start, end),
        yielding (flushing first) if allowed.  Returns the pending flush."""
        end = min(end, self.max_gfn_host)
        rcu = self.host.rcu
        rcu.read_lock(th)
        it = TdpIter(self.pt, root, S.PG_LEVEL_4K, start)
        zap = self.costs.spte_zap_4k
        visit = self.costs.spte_visit
        accel = self.accel.get("tdp_mmu_zap_leafs") if can_yield else None
        while it.valid and it.gfn < end:
            if can_yield and (yield from self.tdp_mmu_iter_cond_resched(th, it, flush, False)):
                flush = False
                it.next()
                continue
            if accel is not None:
                k, changed = yield from accel(th, it, end)
                if k:
                    flush |= changed
                    it.next()
                    continue
            if not S.is_shadow_present_pte(it.old_spte) or \
                    not S.is_last_spte(it.old_spte, it.level):
                yield visit
                it.next()
                continue
            yield from self.tdp_mmu_set_spte(th, it, 0)
            flush = True
            yield visit + zap
            it.next()
        rcu.read_unlock(th)
        return flush

    def zap_gfn_range(self, th: "Thread", root: ShadowPage, start: int, end: int,
                      can_yield: bool, flush: bool, shared: bool) -> Generator:
        """zap_gfn_range (5.17): one zapper for everything.  Zapping the whole address
        space walks the top level only (each entry torn down recursively in one step);
        otherwise leaves and tables fully inside the range are zapped.  Shared mode zaps by
        freeze, flush, zero (so it never reports a pending flush); exclusive mode writes 0
        and reports one.  Returns the pending flush."""
        end = min(end, self.max_gfn_host)
        zap_all = start == 0 and end >= self.max_gfn_host
        min_level = root.level if zap_all else S.PG_LEVEL_4K
        rcu = self.host.rcu
        rcu.read_lock(th)
        it = TdpIter(self.pt, root, min_level, start)
        visit, zap = self.costs.spte_visit, self.costs.spte_zap_4k
        absent = self.accel.get("zap_gfn_range_absent")
        while it.valid and it.gfn < end:
            if can_yield and (yield from self.tdp_mmu_iter_cond_resched(th, it, flush, shared)):
                flush = False
                it.next()
                continue
            old = it.old_spte
            if not S.is_shadow_present_pte(old):
                if absent is None or not (yield from absent(th, it, end, can_yield)):
                    yield visit
                it.next()
                continue
            span = S.pages_per_hpage(it.level)
            if not zap_all and not S.is_last_spte(old, it.level) and \
                    (it.gfn < start or it.gfn + span > end):
                it.next()           # only partly inside: descend
                continue
            if not shared:
                yield from self.tdp_mmu_set_spte(th, it, 0)
                flush = True
            elif not (yield from self.tdp_mmu_zap_spte_atomic(th, it)):
                continue            # lost the race: retry with the fresh value
            yield visit + (zap if S.is_last_spte(old, it.level) else 0)
            it.next()
        rcu.read_unlock(th)
        return flush

    def kvm_tdp_mmu_zap_leafs(self, th: "Thread", as_id: int, start: int, end: int,
                              can_yield: bool, flush: bool) -> Generator:
        """kvm_tdp_mmu_zap_leafs: every root of the address space (valid and invalid), the
        pending flush threaded through all of them (the 5.18-rc fix)."""
        state = {"flush": flush}
        leaf_only = self.policy.leaf_only_range_zap

        def body(root):
            if leaf_only:
                state["flush"] = yield from self.tdp_mmu_zap_leafs(th, root, start, end,
                                                                  can_yield, state["flush"])
            else:   # 5.17 __kvm_tdp_mmu_zap_gfn_range: leaves and covered tables
                state["flush"] = yield from self.zap_gfn_range(th, root, start, end, can_yield,
                                                              state["flush"], False)

        yield from self.walk_roots(th, as_id, False, False, body)
        return state["flush"]

    def kvm_tdp_mmu_zap_sp(self, th: "Thread", sp: ShadowPage) -> Generator:
        """kvm_tdp_mmu_zap_sp (5.18): zap exactly ``sp`` through its parent entry.
        mmu_lock held for write, caller holds RCU.  Returns True (flush needed)."""
        if not self.policy.precise_nx_zap:
            # 5.17: a non-yielding range zap of the SP's range, in every root
            start = sp.gfn
            end = sp.gfn + S.pages_per_hpage(sp.level + 1)
            flush = False
            for root in self.for_each_tdp_mmu_root(th, sp.as_id):
                flush = yield from self.zap_gfn_range(th, root, start, end, False, flush,
                                                      False)
            return flush
        if sp.ptep is None:
            self.warn("zap_sp_on_root", th, sp=sp.id)
            return False
        parent, index = sp.ptep
        old = self.pt.read_for_update(parent, index)
        if not S.is_shadow_present_pte(old):
            self.warn("zap_sp_parent_not_present", th, sp=sp.id)
            return False
        yield from self.__tdp_mmu_set_spte(th, sp.as_id, parent, index, old, 0, sp.gfn,
                                           sp.level + 1)
        return True

    def kvm_tdp_mmu_zap_all(self, th: "Thread") -> Generator:
        """kvm_tdp_mmu_zap_all (mmu_lock held for write): zap every root, valid or invalid
        (also those a worker is zapping); 5.18 does no flush (the VM is dying)."""
        if not self.policy.zap_all_no_flush:
            # 5.17: range zap of everything per root (top-level entries, yielding with the
            # flush done first), then a final flush if anything was zapped
            flush = False
            for as_id in (0, 1):
                state = {"flush": False}

                def body(root):
                    state["flush"] = yield from self.zap_gfn_range(
                        th, root, 0, 1 << 62, True, state["flush"], False)
                yield from self.walk_roots(th, as_id, False, False, body)
                flush |= state["flush"]
            if flush:
                yield from self.kvm.flush_remote_tlbs(th)
            return
        for as_id in (0, 1):
            def body(root):
                yield from self.tdp_mmu_zap_root(th, root, shared=False)
            yield from self.walk_roots(th, as_id, False, False, body)

    def kvm_mmu_uninit_tdp_mmu(self, th: "Thread") -> Generator:
        """kvm_mmu_uninit_tdp_mmu: flush and destroy the workqueue, WARN if roots or pages
        are left, then rcu_barrier (workers queue RCU callbacks)."""
        yield from self.zap_wq.flush(th)
        yield from self.zap_wq.destroy(th)
        if self.roots:
            self.warn("uninit_roots_left", th, roots=[r.id for r in self.roots])
        if self.nr_pages:
            self.warn("uninit_pages_left", th, pages=self.nr_pages)
        yield from self.host.rcu.rcu_barrier(th)

    # ---- NX huge pages accounting ------------------------------------------------------------

    def account_huge_nx_page(self, sp: ShadowPage) -> None:
        """account_huge_nx_page: the SP replaced a huge page the NX mitigation forbade."""
        if sp.lpage_disallowed:
            return
        sp.lpage_disallowed = True
        self.lpage_disallowed[sp.id] = sp
        self.kvm.stat["nx_lpage_splits"] += 1

    def unaccount_huge_nx_page(self, sp: ShadowPage) -> None:
        sp.lpage_disallowed = False
        self.lpage_disallowed.pop(sp.id, None)
        self.kvm.stat["nx_lpage_splits"] -= 1
