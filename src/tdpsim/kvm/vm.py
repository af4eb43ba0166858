"""The VM (``struct kvm``): memslots, mmu_lock, mmu_notifier glue, requests, remote flush.

Generic KVM behaviour from virt/kvm/kvm_main.c (5.17/5.18; notes in
docs/kernel-notes/host-primitives.md s7-8):

* mmu_notifier hooks go through ``__kvm_handle_hva_range``: for every memslot overlapping
  the hva range, take ``mmu_lock`` for write *lazily* (only if some slot overlaps), run the
  ``on_lock`` step once, call the arch handler per slot and OR the results; if the hook is
  flagged ``flush_on_ret`` and the result is true, flush remote TLBs before unlocking.
* ``invalidate_range_start`` increments ``mmu_notifier_count`` and widens the in-progress
  range; ``invalidate_range_end`` bumps ``mmu_notifier_seq`` and decrements the count.  A
  fault that saw an older seq, or whose hva falls in the in-progress range, retries.
* ``kvm_make_all_cpus_request`` sets the request on every vCPU and IPIs the ones in guest
  mode, then waits until those have left guest mode (not until they have acted on it).
* ``kvm_flush_remote_tlbs`` counts ``remote_tlb_flush_requests`` on every call and
  ``remote_tlb_flush`` when an IPI was sent.

The architecture-specific MMU (``self.arch``, set by ``tdpsim.mmu.create_vm``) implements
the hooks this module calls; this layer knows nothing of which MMU policy runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Generator

from ..host.mm import Mm, MmuNotifierOps, NotifierRange, PAGE
from ..sim.engine import PARK
from .memslot import (KVM_MEM_LOG_DIRTY_PAGES, KVM_USER_MEM_SLOTS, Memslot, Memslots,
                      check_region)

if TYPE_CHECKING:
    from ..host.host import Host
    from ..host.sched import Thread
    from .vcpu import Vcpu

# requests (arch/x86/include/asm/kvm_host.h names)
KVM_REQ_TLB_FLUSH = "KVM_REQ_TLB_FLUSH"
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"   # 5.18
KVM_REQ_MMU_RELOAD = "KVM_REQ_MMU_RELOAD"                             # 5.17

OUTSIDE_GUEST_MODE, IN_GUEST_MODE, EXITING_GUEST_MODE = "outside", "in_guest", "exiting"

#: VM-wide statistics that 5.17/5.18 KVM has (x86's kvm_vm_stats_desc), under their names
VM_STATS = ("remote_tlb_flush", "remote_tlb_flush_requests", "pages_4k", "pages_2m",
            "pages_1g", "nx_lpage_splits", "mmu_shadow_zapped", "mmu_pte_write",
            "mmu_recycled", "mmu_cache_miss", "mmu_unsync", "max_mmu_page_hash_collisions")


class Kvm:
    def __init__(self, host: "Host", mm: Mm, name: str = "vm", maxphyaddr: int = 46):
        if not 36 <= maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr: expected 36..52, got {maxphyaddr}")
        self.host = host
        self.engine = host.engine
        self.costs = host.costs
        self.mm = mm
        self.name = name
        self.maxphyaddr = maxphyaddr
        self.max_gfn = 1 << (maxphyaddr - 12)
        self.memslots = [Memslots(), Memslots()]
        self.vcpus: list["Vcpu"] = []
        self.mmu_lock = host.rwlock(f"{name}:mmu_lock")
        self.stat = {k: 0 for k in VM_STATS}
        #: IPIs sent by make_all_cpus_request (the model's count: not a KVM statistic)
        self.ipis = 0
        self.mmu_notifier_seq = 0
        self.mmu_notifier_count = 0
        self.mmu_notifier_range_start = 0
        self.mmu_notifier_range_end = 0
        self.arch = None
        #: fast-mode accelerators of kernel loops, by the loop's name; installed by
        #: tdpsim.fast when the run's granularity is "fast" (empty in exact mode), each
        #: runs stretches of its loop in bulk with the loop's own results
        self.accel: dict[str, Callable] = {}
        #: observers (the check layer): fn(kind, **fields)
        self.observers: list[Callable] = []
        self.notifier = KvmMmuNotifier(self)
        mm.register_notifier(self.notifier)
        self.dead = False

    def observe(self, kind: str, **fields) -> None:
        for fn in self.observers:
            fn(kind, **fields)

    # ---- memslots (KVM_SET_USER_MEMORY_REGION) -------------------------------------------

    def set_user_memory_region(self, th: "Thread", slot_id: int, flags: int, gpa: int,
                               size: int, hva: int, as_id: int = 0) -> Generator:
        """Create, delete (size 0), move or change the flags of a memslot."""
        if as_id not in (0, 1):
            raise ValueError(f"slot: address space must be 0 or 1, got {as_id}")
        if gpa % PAGE or size % PAGE or hva % PAGE:
            raise ValueError("guest_phys_addr, memory_size and userspace_addr must be "
                             "4 KiB aligned")
        base, npages = gpa // PAGE, size // PAGE
        check_region(slot_id, flags, base, npages, self.mm, hva, self.max_gfn)
        slots = self.memslots[as_id]
        if slots.bulks:
            self.engine.settle(slots)
        if self.engine.check_settle:
            self.engine.assert_settled(slots, None, None, False)
        old = slots.by_id.get(slot_id)
        if npages == 0:
            if old is None:
                raise ValueError(f"slot: {slot_id} does not exist")
            # delete: mark the slot invalid (faults on it retry), let the arch code drop
            # every SPTE of it, then remove it
            old.invalid = True
            yield from self.arch.flush_shadow_memslot(th, old)
            if slots.bulks:
                self.engine.settle(slots)
            if self.engine.check_settle:
                self.engine.assert_settled(slots, None, None, False)
            slots.remove(slot_id)
            self.observe("memslot_deleted", slot=old, t=self.engine.now)
            return
        if old is None:
            if len(slots) >= KVM_USER_MEM_SLOTS:
                raise ValueError(f"slot: at most {KVM_USER_MEM_SLOTS} memslots")
            if slots.overlapping(base, npages) is not None:
                raise ValueError("guest_phys_addr: overlaps an existing memslot")
            vma = self.mm.find_vma(hva)
            hp = vma.memfd.huge_pages if vma.memfd is not None else 1
            slot = Memslot(slot_id, base, npages, hva, flags, as_id, hp)
            if flags & KVM_MEM_LOG_DIRTY_PAGES:
                slot.dirty_bitmap = _bitmap(npages)
            slots.add(slot)
            return
        if (old.npages != npages or old.userspace_addr != hva):
            raise ValueError("memory_size/userspace_addr: an existing slot can only move "
                             "or change flags")
        if old.base_gfn != base:      # move: like delete + create for the MMU
            if slots.overlapping(base, npages, skip=slot_id) is not None:
                raise ValueError("guest_phys_addr: overlaps an existing memslot")
            old.invalid = True
            yield from self.arch.flush_shadow_memslot(th, old)
            if slots.bulks:
                self.engine.settle(slots)
            if self.engine.check_settle:
                self.engine.assert_settled(slots, None, None, False)
            # the old range is gone (the oracles check it is unmapped), then the slot moves
            self.observe("memslot_deleted", slot=old, t=self.engine.now)
            old.base_gfn = base
            old.invalid = False
            slots._reindex()
        if old.flags != flags:
            old_flags = old.flags
            old.flags = flags
            if flags & KVM_MEM_LOG_DIRTY_PAGES and old.dirty_bitmap is None:
                old.dirty_bitmap = _bitmap(npages)
            yield from self.arch.slot_apply_flags(th, old, old_flags, flags)

    # ---- requests and remote TLB flush ----------------------------------------------------

    def request_cost(self) -> int:
        """What kvm_make_all_cpus_request spends setting the request on every vCPU."""
        return max(1, self.costs.tlb_flush_request * len(self.vcpus))

    def make_all_cpus_request(self, th: "Thread", req: str, wait: bool = True) -> Generator:
        """kvm_make_all_cpus_request: returns True if any vCPU was IPI'd.  ``wait``: the
        request has KVM_REQUEST_WAIT (TLB flushes, freeing obsolete roots)."""
        costs = self.costs
        kicked = []
        for v in self.vcpus:
            if v.bulks:
                self.engine.settle(v)
            if self.engine.check_settle:
                self.engine.assert_settled(v, None, None, False)
            v.requests.add(req)
            # kvm_request_needs_ipi: a waiting request kicks every vCPU not outside guest
            # mode (one already EXITING may still be reading the page tables), others only
            # those in guest mode
            if v.mode == IN_GUEST_MODE or (wait and v.mode == EXITING_GUEST_MODE):
                v.mode = EXITING_GUEST_MODE
                kicked.append(v)
        yield self.request_cost()
        if not kicked:
            return False
        self.ipis += len(kicked)
        yield costs.ipi_round + costs.ipi_per_vcpu * len(kicked)
        if wait:
            # wait (spinning, interrupts on) until every kicked vCPU has left guest mode
            pending = [v for v in kicked if v.mode == EXITING_GUEST_MODE]
            if pending:
                waiter = _Waiter(th, len(pending))
                for v in pending:
                    v.exit_waiters.append(waiter)
                doing, th.doing = th.doing, f"waiting for {len(pending)} vCPUs to exit"
                yield PARK
                th.doing = doing
        return True

    def flush_remote_tlbs(self, th: "Thread") -> Generator:
        """kvm_flush_remote_tlbs."""
        self.stat["remote_tlb_flush_requests"] += 1
        ipi = yield from self.make_all_cpus_request(th, KVM_REQ_TLB_FLUSH)
        if ipi:
            self.stat["remote_tlb_flush"] += 1
        self.observe("remote_flush", t=self.engine.now, task=th.name)

    def account_idle_flushes(self, th: "Thread", n: int, done_times) -> None:
        """``n`` kvm_flush_remote_tlbs calls made while every vCPU is outside guest mode (a fast-mode
        bulk of them): each counts a request and sets KVM_REQ_TLB_FLUSH on every vCPU
        (nobody to kick or wait for); those that have returned, at ``done_times``, are
        observed as one batch.  The caller has settled the vCPUs and declares them."""
        if not n:
            return
        self.stat["remote_tlb_flush_requests"] += n
        for v in self.vcpus:
            v.requests.add(KVM_REQ_TLB_FLUSH)
        if len(done_times):
            self.observe("remote_flushes", times=done_times, task=th.name)

    def flush_remote_tlbs_with_address(self, th: "Thread", gfn: int, npages: int) -> Generator:
        """Without Hyper-V enlightenments a range flush is a full flush."""
        yield from self.flush_remote_tlbs(th)

    # ---- mmu_notifier bookkeeping (kvm_inc/dec_notifier_count) -----------------------------

    def mmu_notifier_retry_hva(self, seq: int, hva: int) -> bool:
        """True if a fault that read ``seq`` must retry for ``hva``."""
        if self.mmu_notifier_count and \
                self.mmu_notifier_range_start <= hva < self.mmu_notifier_range_end:
            return True
        return self.mmu_notifier_seq != seq

    def kvm_inc_notifier_count(self, start: int, end: int) -> None:
        """kvm_inc_notifier_count: one more invalidation in progress; the range faults must
        retry on is the smallest covering every one in progress (hva-based; 5.17/5.18's
        kvm_zap_gfn_range passes gfns into it all the same)."""
        self.mmu_notifier_count += 1
        if self.mmu_notifier_count == 1:
            self.mmu_notifier_range_start, self.mmu_notifier_range_end = start, end
        else:
            self.mmu_notifier_range_start = min(self.mmu_notifier_range_start, start)
            self.mmu_notifier_range_end = max(self.mmu_notifier_range_end, end)

    def kvm_dec_notifier_count(self, start: int, end: int) -> None:
        """kvm_dec_notifier_count: the invalidation is done; mmu_notifier_seq moves on."""
        self.mmu_notifier_seq += 1
        self.mmu_notifier_count -= 1


class _Waiter:
    """A thread spinning until ``count`` vCPUs have left guest mode."""
    __slots__ = ("th", "count")

    def __init__(self, th, count):
        self.th = th
        self.count = count

    def vcpu_exited(self, engine) -> None:
        self.count -= 1
        if self.count == 0:
            engine.wake(self.th)


def _bitmap(npages: int):
    import numpy as np
    return np.zeros(npages, dtype=bool)


class KvmMmuNotifier(MmuNotifierOps):
    """The generic mmu_notifier hooks of virt/kvm/kvm_main.c."""

    def __init__(self, kvm: Kvm):
        self.kvm = kvm

    def _handle_hva_range(self, th, start: int, end: int, handler, on_lock=None,
                          flush_on_ret: bool = False, may_block: bool = False,
                          extra=None) -> Generator:
        """__kvm_handle_hva_range: returns the OR of the handler results."""
        kvm = self.kvm
        locked = False
        ret = False
        for as_id in (0, 1):
            for slot, g0, g1 in kvm.memslots[as_id].by_hva(start, end):
                if not locked:
                    locked = True
                    yield from kvm.mmu_lock.write_lock(th)
                    if on_lock is not None:
                        on_lock(start, end)
                rng = GfnRange(slot, g0, g1, may_block, extra)
                r = yield from handler(th, rng)
                ret |= bool(r)
        if locked:
            if flush_on_ret and ret:
                yield from kvm.flush_remote_tlbs(th)
            kvm.mmu_lock.write_unlock(th)
        return ret

    def _inc_count(self, start: int, end: int) -> None:
        self.kvm.kvm_inc_notifier_count(start, end)

    def _dec_count(self, start: int, end: int) -> None:
        self.kvm.kvm_dec_notifier_count(start, end)

    def invalidate_range_start(self, th, rng: NotifierRange) -> Generator:
        arch = self.kvm.arch
        yield from self._handle_hva_range(th, rng.start, rng.end, arch.unmap_gfn_range,
                                          self._inc_count, flush_on_ret=True,
                                          may_block=rng.may_block)
        self.kvm.observe("invalidate_start", start=rng.start, end=rng.end,
                         t=self.kvm.engine.now)

    def invalidate_range_end(self, th, rng: NotifierRange) -> Generator:
        yield from self._handle_hva_range(th, rng.start, rng.end, _noop_handler,
                                          self._dec_count)
        self.kvm.observe("invalidate_end", start=rng.start, end=rng.end, t=self.kvm.engine.now)

    def change_pte(self, th, address, pfn, gen, writable) -> Generator:
        kvm = self.kvm
        # KVM ignores change_pte unless an invalidation is in progress (it always is for
        # KSM, whose start has already zapped the page); kept for the flush accounting
        if not kvm.mmu_notifier_count:
            return
        yield from self._handle_hva_range(th, address, address + PAGE, kvm.arch.set_spte_gfn,
                                          flush_on_ret=True, extra=(pfn, gen, writable))

    def clear_flush_young(self, th, start, end) -> Generator:
        return (yield from self._handle_hva_range(th, start, end, self.kvm.arch.age_gfn,
                                                  flush_on_ret=True))

    def clear_young(self, th, start, end) -> Generator:
        return (yield from self._handle_hva_range(th, start, end, self.kvm.arch.age_gfn))

    def test_young(self, th, address) -> Generator:
        return (yield from self._handle_hva_range(th, address, address + PAGE,
                                                  self.kvm.arch.test_age_gfn))

    def release(self, th) -> Generator:
        """kvm_mmu_notifier_release -> kvm_arch_flush_shadow_all."""
        yield from self.kvm.arch.flush_shadow_all(th)
        self.kvm.observe("release", t=self.kvm.engine.now)


def _noop_handler(th, rng) -> Generator:
    return False
    yield


class GfnRange:
    """``struct kvm_gfn_range``."""
    __slots__ = ("slot", "start", "end", "may_block", "extra")

    def __init__(self, slot: Memslot, start: int, end: int, may_block: bool, extra=None):
        self.slot = slot
        self.start = start
        self.end = end
        self.may_block = may_block
        self.extra = extra
