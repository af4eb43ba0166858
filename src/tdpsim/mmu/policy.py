"""Policies: one named knob per behavioural change of the series (spec Appendix A).

The MMU code consults ``kvm.arch.policy.<knob>`` at each point where 5.17 and 5.18 differ,
so a kernel is a set of knob values and a single change can be switched on its own.
Presets: ``5.18`` (every knob on) and ``5.17`` (every knob off).  docs/knobs.md lists each
knob with the commits it models and its conformance test.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Policy:
    #: handle_removed_pt does no remote flush; callers flush (bb95dfb9e2df)
    deferred_flush: bool = True
    #: the yield helper flushes before rcu_read_unlock
    flush_before_rcu_unlock: bool = True
    #: tdp_mmu_zap_root zaps at 1 GiB first, then the top level (1b6043e8e584)
    two_pass_root_zap: bool = True
    #: the last put of a valid root marks it invalid, keeps a reference and queues a worker
    #: (8351779ce65f, efd995dae5eb); the zap may yield
    async_defunct_zap: bool = True
    #: invalidated roots are zapped by per-root workers; zap_invalidated_roots flushes the
    #: workqueue (22b94c4b63eb)
    async_invalidated_zap: bool = True
    #: mmu_lock readers never take references to invalid roots (v4 07)
    readers_skip_invalid_roots: bool = True
    #: eager page splitting walks valid roots only (v4 06)
    eager_split_valid_only: bool = True
    #: range zaps (kvm_zap_gfn_range, notifier unmap) zap leaves only and carry the pending
    #: flush across roots
    leaf_only_range_zap: bool = True
    #: NX recovery zaps exactly the one SP through its ptep, holding RCU across the loop
    precise_nx_zap: bool = True
    #: kvm_tdp_mmu_zap_all does no remote flush (v3 14)
    zap_all_no_flush: bool = True
    #: change_pte returns "flush needed" to the generic code, which batches it (v3 08)
    batched_change_pte_flush: bool = True
    #: the read-only notifier walkers take RCU per root (v3 09)
    rcu_per_root_notifier: bool = True
    #: the REMOVED checks and WARNs (v4 12, 25, 26)
    removed_spte_checks: bool = True
    #: invalidate_all_roots skips already-invalid roots (Paolo's fix-up)
    skip_invalid_on_invalidate: bool = True

    @classmethod
    def knobs(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def with_knobs(self, **changes: bool) -> "Policy":
        for k in changes:
            if k not in self.knobs():
                raise ValueError(f"unknown knob {k!r}; expected one of {', '.join(self.knobs())}")
        return replace(self, **changes)


PRESETS = {"5.18": Policy(), "5.17": Policy(**{k: False for k in Policy.knobs()})}


def preset(name: str) -> Policy:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"kernel: expected one of {', '.join(PRESETS)}, got {name!r}") from None


def label(policy: Policy) -> str:
    """The preset's name, or the nearest preset followed by the knobs that differ from it
    (``5.18 async_defunct_zap=off``)."""
    best = None
    for name, base in PRESETS.items():
        diff = [f"{f.name}={'on' if getattr(policy, f.name) else 'off'}"
                for f in fields(Policy) if getattr(base, f.name) != getattr(policy, f.name)]
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    name, diff = best
    return " ".join([name, *diff])
