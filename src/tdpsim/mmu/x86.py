"""The x86 MMU glue around the TDP MMU (arch/x86/kvm/mmu/mmu.c): root load and unload,
fast zap, zap all, kvm_zap_gfn_range, memslot flag changes, the notifier entry points.

``X86Mmu`` is the ``kvm.arch`` object the generic layer calls (see kvm/vm.py and
kvm/vcpu.py).  Only the TDP MMU is modelled (tdp_mmu=Y, no shadow paging), so the legacy
MMU's parts of these functions (rmaps, obsolete-page lists) are absent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

from ..kvm.vm import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, Kvm
from . import spte as S
from . import tdp_ops
from .policy import Policy
from .tdp_fault import kvm_tdp_mmu_map
from .tdp_mmu import TdpMmu

#: past every user address: kvm_zap_gfn_range's retry range in the model
HVA_END = 1 << 62

if TYPE_CHECKING:
    from ..host.sched import Thread
    from ..kvm.vcpu import Fault, Vcpu


class X86Mmu:
    def __init__(self, kvm: Kvm, policy: Policy, storage: str = "dense"):
        self.kvm = kvm
        self.policy = policy
        self.tdp = TdpMmu(kvm, policy, storage)
        self.pt = self.tdp.pt
        self.mmu_valid_gen = 0
        self.eager_page_split = True
        #: the NX huge page mitigation (module parameter nx_huge_pages)
        self.nx_huge_pages = False
        self.nx_huge_pages_recovery_ratio = 60
        self.nx_huge_pages_recovery_period_ms = 0
        self.nx_recovery_thread = None

    # ---- roots (called from the vCPU run loop) ----------------------------------------------

    def mmu_load(self, vcpu: "Vcpu", th: "Thread") -> Generator:
        """kvm_mmu_load: allocate or reuse a root under mmu_lock (write), then the local
        flush of the current context (nothing cached for it may be used)."""
        kvm = self.kvm
        t0 = kvm.engine.now
        yield from kvm.mmu_lock.write_lock(th)
        root = self.tdp.kvm_tdp_mmu_get_vcpu_root_hpa(vcpu, th)
        kvm.mmu_lock.write_unlock(th)
        vcpu.root = root
        vcpu.tlb.flush(kvm.engine.now)
        vcpu.account(root_loads=1)
        yield kvm.costs.root_load
        kvm.observe("root_load", vcpu=vcpu, root=root, t=kvm.engine.now,
                    wait_ns=kvm.engine.now - t0)

    def kvm_mmu_free_roots(self, vcpu: "Vcpu", th: "Thread") -> Generator:
        """kvm_mmu_free_roots (mmu_lock write): put the vCPU's root reference."""
        kvm = self.kvm
        root = vcpu.root
        if root is None:
            return
        t0 = kvm.engine.now
        yield from kvm.mmu_lock.write_lock(th)
        vcpu.root = None
        yield from self.tdp.kvm_tdp_mmu_put_root(th, root, shared=False)
        kvm.mmu_lock.write_unlock(th)
        kvm.observe("root_put", vcpu=vcpu, root=root, t0=t0, t=kvm.engine.now)

    def mmu_unload(self, vcpu: "Vcpu", th: "Thread") -> Generator:
        """kvm_mmu_unload."""
        yield from self.kvm_mmu_free_roots(vcpu, th)

    def free_obsolete_roots(self, vcpu: "Vcpu", th: "Thread") -> Generator:
        """kvm_mmu_free_obsolete_roots (5.18): free the root only if it is obsolete."""
        if vcpu.root is not None and self.is_obsolete_root(vcpu.root):
            yield from self.kvm_mmu_free_roots(vcpu, th)

    def reset_context(self, vcpu: "Vcpu", th: "Thread") -> Generator:
        """kvm_mmu_reset_context (e.g. CR0.WP toggled by KVM_SET_SREGS): unload."""
        yield from self.mmu_unload(vcpu, th)

    def is_obsolete_root(self, root) -> bool:
        """is_obsolete_sp for a TDP MMU root: invalid."""
        return root.invalid

    # ---- faults ----------------------------------------------------------------------------

    def tdp_map(self, vcpu: "Vcpu", th: "Thread", fault: "Fault") -> Generator:
        return (yield from kvm_tdp_mmu_map(self.tdp, vcpu, th, fault, self.nx_huge_pages))

    # ---- zapping ---------------------------------------------------------------------------

    def kvm_mmu_zap_all_fast(self, th: "Thread") -> Generator:
        """kvm_mmu_zap_all_fast (5.18): under mmu_lock (write) invalidate the roots and make
        every vCPU drop obsolete roots; then, unlocked, wait for every invalid root to be
        zapped (flush the zap workqueue) before returning."""
        kvm = self.kvm
        yield from kvm.mmu_lock.write_lock(th)
        self.mmu_valid_gen += 1
        self.tdp.kvm_tdp_mmu_invalidate_all_roots(th)
        yield from kvm.make_all_cpus_request(th, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
        kvm.mmu_lock.write_unlock(th)
        yield from self.tdp.kvm_tdp_mmu_zap_invalidated_roots(th)
        kvm.observe("zap_all_fast_done", t=kvm.engine.now, task=th.name)

    def kvm_mmu_zap_all(self, th: "Thread") -> Generator:
        """kvm_mmu_zap_all: under mmu_lock (write) zap every root; no flush in 5.18."""
        kvm = self.kvm
        yield from kvm.mmu_lock.write_lock(th)
        yield from self.tdp.kvm_tdp_mmu_zap_all(th)
        kvm.mmu_lock.write_unlock(th)

    def kvm_zap_gfn_range(self, th: "Thread", start: int, end: int) -> Generator:
        """kvm_zap_gfn_range (MTRR, CR0.CD, APICv...): notifier count bumped, leaf zap in
        both address spaces with the flush threaded through, one range flush.

        Deliberate difference: 5.17/5.18 put the gfns into the hva-based retry range, so a
        fault during one of the zap's yields does not retry and may leave a leaf in the
        range; the model makes every fault retry meanwhile (the whole hva space), which the
        kvm_zap_gfn_range oracle (no leaf left in the range) relies on."""
        kvm = self.kvm
        yield from kvm.mmu_lock.write_lock(th)
        kvm.kvm_inc_notifier_count(0, HVA_END)
        flush = False
        for as_id in (0, 1):
            flush = yield from self.tdp.kvm_tdp_mmu_zap_leafs(th, as_id, start, end, True,
                                                              flush)
        if flush:
            yield from kvm.flush_remote_tlbs_with_address(th, start, end - start)
        kvm.kvm_dec_notifier_count(0, HVA_END)
        kvm.mmu_lock.write_unlock(th)
        kvm.observe("zap_gfn_range_done", start=start, end=end, t=kvm.engine.now)

    # ---- generic-layer hooks ------------------------------------------------------------------

    def flush_shadow_memslot(self, th: "Thread", slot) -> Generator:
        """kvm_arch_flush_shadow_memslot -> kvm_mmu_invalidate_zap_pages_in_memslot."""
        yield from self.kvm_mmu_zap_all_fast(th)

    def flush_shadow_all(self, th: "Thread") -> Generator:
        """kvm_arch_flush_shadow_all (notifier release, VM destruction)."""
        yield from self.kvm_mmu_zap_all(th)

    def unmap_gfn_range(self, th: "Thread", rng) -> Generator:
        """kvm_unmap_gfn_range."""
        return (yield from tdp_ops.kvm_tdp_mmu_unmap_gfn_range(self.tdp, th, rng, False))

    def set_spte_gfn(self, th: "Thread", rng) -> Generator:
        """kvm_set_spte_gfn: 5.18 returns the flush to the generic code."""
        return (yield from tdp_ops.kvm_tdp_mmu_set_spte_gfn(self.tdp, th, rng))

    def age_gfn(self, th: "Thread", rng) -> Generator:
        return (yield from tdp_ops.kvm_tdp_mmu_age_gfn_range(self.tdp, th, rng))

    def test_age_gfn(self, th: "Thread", rng) -> Generator:
        return (yield from tdp_ops.kvm_tdp_mmu_test_age_gfn(self.tdp, th, rng))

    def slot_apply_flags(self, th: "Thread", slot, old_flags: int, new_flags: int) -> Generator:
        """kvm_mmu_slot_apply_flags (no PML): enabling dirty logging eagerly splits huge
        pages (read lock) then write-protects the slot and flushes; disabling leaves the
        small SPTEs (collapsing is not modelled)."""
        from ..kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
        kvm = self.kvm
        enabling = bool(new_flags & KVM_MEM_LOG_DIRTY_PAGES) and \
            not old_flags & KVM_MEM_LOG_DIRTY_PAGES
        if not enabling:
            return
        yield from kvm.mmu_lock.read_lock(th)
        if self.eager_page_split:
            yield from tdp_ops.kvm_tdp_mmu_try_split_huge_pages(
                self.tdp, th, slot, slot.base_gfn, slot.end_gfn, S.PG_LEVEL_4K, True)
        changed = yield from tdp_ops.kvm_tdp_mmu_wrprot_slot(self.tdp, th, slot,
                                                             S.PG_LEVEL_4K)
        kvm.mmu_lock.read_unlock(th)
        if changed:
            yield from kvm.flush_remote_tlbs(th)   # kvm_arch_flush_remote_tlbs_memslot

    # ---- NX huge page recovery ------------------------------------------------------------

    def nx_recovery_period_ns(self) -> int | None:
        """get_nx_lpage_recovery_timeout: the period, or 3600 s / ratio when it is 0."""
        if self.nx_huge_pages_recovery_period_ms:
            return self.nx_huge_pages_recovery_period_ms * 1_000_000
        ratio = self.nx_huge_pages_recovery_ratio
        if not ratio:
            return None
        return 3_600_000 // min(ratio, 3600) * 1_000_000

    def start_nx_recovery(self) -> None:
        """kvm_mmu_post_init_vm: start the per-VM recovery kthread (a daemon)."""
        self.nx_recovery_thread = self.kvm.host.spawn(self.kvm_nx_lpage_recovery_worker,
                                                      f"kvm-nx-lpage-recovery/{self.kvm.name}",
                                                      kind="daemon")

    def kvm_nx_lpage_recovery_worker(self, th: "Thread") -> Generator:
        """kvm_nx_lpage_recovery_worker: sleep one period, recover, repeat until the VM dies."""
        while not self.kvm.dead:
            period = self.nx_recovery_period_ns()
            if period is None:
                return
            yield from self.kvm.host.sched.sleep(th, period)
            if self.kvm.dead:
                return
            if self.nx_huge_pages:
                yield from self.kvm_recover_nx_lpages(th)

    def kvm_recover_nx_lpages(self, th: "Thread") -> Generator:
        """kvm_recover_nx_lpages (5.18): zap ceil(splits / ratio) SPs from the head of the NX
        list, each precisely through its parent entry, holding RCU across the loop so the
        flush done at a yield (or at the end) comes before the SPs can be freed."""
        kvm, tdp, host = self.kvm, self.tdp, self.kvm.host
        rcu = host.rcu
        splits = kvm.stat["nx_lpage_splits"]          # read before taking the locks
        ratio = self.nx_huge_pages_recovery_ratio
        doing, th.doing = th.doing, "kvm_recover_nx_lpages"
        yield from kvm.mmu_lock.write_lock(th)
        hold_rcu = self.policy.precise_nx_zap      # 5.18 holds RCU across the loop
        if hold_rcu:
            rcu.read_lock(th)
        to_zap = -(-splits // ratio) if ratio else 0
        flush = False
        for _ in range(to_zap):
            if not tdp.lpage_disallowed:
                break
            sp = next(iter(tdp.lpage_disallowed.values()))
            if not sp.lpage_disallowed:
                tdp.warn("nx_list_sp_not_disallowed", th, sp=sp.id)
            flush |= yield from tdp.kvm_tdp_mmu_zap_sp(th, sp)
            if sp.lpage_disallowed:
                tdp.warn("nx_sp_still_disallowed_after_zap", th, sp=sp.id)
            if host.sched.need_resched(th) or kvm.mmu_lock.needbreak():
                if flush:
                    yield from kvm.flush_remote_tlbs(th)
                if hold_rcu:
                    rcu.read_unlock(th)
                yield from tdp.cond_resched_rwlock(th, shared=False)
                flush = False
                if hold_rcu:
                    rcu.read_lock(th)
        if flush:
            yield from kvm.flush_remote_tlbs(th)
        if hold_rcu:
            rcu.read_unlock(th)
        kvm.mmu_lock.write_unlock(th)
        th.doing = doing
        kvm.observe("nx_recovery", t=kvm.engine.now, zapped=to_zap)

    def destroy(self, th: "Thread") -> Generator:
        """kvm_arch_destroy_vm: every vCPU unloads its MMU (kvm_destroy_vcpus ->
        kvm_mmu_destroy -> kvm_mmu_unload), then kvm_mmu_uninit_vm ->
        kvm_mmu_uninit_tdp_mmu."""
        for v in self.kvm.vcpus:
            yield from self.kvm_mmu_free_roots(v, th)
        yield from self.tdp.kvm_mmu_uninit_tdp_mmu(th)
        self.kvm.dead = True


def create_vm(host, mm, policy: Policy, name: str = "vm", maxphyaddr: int = 46,
              storage: str = "dense") -> Kvm:
    """KVM_CREATE_VM with the TDP MMU; ``storage`` names the page-table layout (store.py,
    ``STORES``)."""
    kvm = Kvm(host, mm, name, maxphyaddr)
    kvm.arch = X86Mmu(kvm, policy, storage)
    return kvm
