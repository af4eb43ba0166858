"""Helpers shared by the VM-level test modules (scenario building blocks that other
helpers call, so plain functions rather than fixtures)."""

from tdpsim.host.completion import Completion


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
