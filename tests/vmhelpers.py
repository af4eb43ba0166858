"""Helpers shared by the VM-level test modules (scenario building blocks that other
helpers call, so plain functions rather than fixtures)."""

from tdpsim.host.completion import Completion
from tdpsim.mmu.spte import pages_per_hpage
from tdpsim.mmu.tdp_iter import TdpIter


def one_shot(h) -> Completion:
    """A one-shot event (``struct completion``) on ``h``'s host."""
    return Completion(h.host)


def driver(h, fn, after=None, name="driver"):
    """Run ``fn(th)`` in a kernel thread once ``after`` (a one-shot event) is set."""
    def body(th):
        if after is not None:
            yield from after.wait(th)
        yield from fn(th)
    return h.spawn(body, name)


def quiesce(th, h):
    """Keep the run alive until queued zap work and RCU callbacks have all run."""
    yield from h.tdp.zap_wq.flush(th)
    yield from h.host.rcu.rcu_barrier(th)


def linked_tables(h) -> list:
    """Every non-root table linked under a root of ``h`` (what kvm->arch.tdp_mmu_pages
    lists), by id; a walk, so tables a compressed store keeps as runs become SPs."""
    out = {}
    for root in h.tdp.roots:
        it = TdpIter(h.tdp.pt, root, 1, 0, report=False)
        end = pages_per_hpage(root.level + 1)
        while it.valid and it.gfn < end:
            if it.sp is not root:
                out[it.sp.id] = it.sp
            it.next()
    return [out[k] for k in sorted(out)]
