"""Fast-mode accelerators: named kernel loops run in bulk, with the loops' own results.

Each accelerator plans a stretch of one kernel loop (up to the point where the loop's own
checks, need_resched or a lock's contention, could change its course), yields it as one
``Bulk`` whose effects are applied lazily through the owners' batch operations, and
declares the resources it depends on so that any other event touching them settles it
first (``Engine.settle``).  The semantic modules (``mmu``, ``kvm``, ``check``) import
nothing from here: they offer hooks (``kvm.accel``, by kernel loop name) that ``install``
fills when a run's granularity is "fast", and run every iteration themselves otherwise.

Accelerated loops:

* ``vcpu_run``: the vCPU run loop while the guest touches memory (populate.py);
* ``tdp_mmu_zap_leafs``, ``wrprot_gfn_range``, ``clear_dirty_gfn_range``: the rest of a
  4 KiB table of a leaf walk (leaf_walk.py);
* ``handle_removed_kids``: handle_removed_pt's loop over the children of a removed table,
  for children a compressed store keeps as a run (teardown.py).

How to add one: docs/design-notes.md, "how to add a fast path".
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from . import leaf_walk, teardown
from .populate import Populate

if TYPE_CHECKING:
    from ..kvm.vm import Kvm


def install(kvm: "Kvm") -> None:
    """Install every accelerator on a VM whose engine runs at the fast granularity."""
    if not kvm.engine.fast:
        raise ValueError("accelerators need the fast granularity")
    kvm.accel["vcpu_run"] = Populate(kvm).run_bulk
    for loop in leaf_walk.LOOPS:
        kvm.accel[loop] = leaf_walk.make(kvm.arch.tdp, loop)
    kvm.accel["handle_removed_kids"] = teardown.make(kvm.arch.tdp)
    kvm.accel["zap_gfn_range_absent"] = partial(leaf_walk.absent_bulk, kvm.arch.tdp)
