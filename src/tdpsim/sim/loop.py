"""One loop, two granularities: ``exact`` runs an event per iteration, ``fast`` runs bulks.

A loop the kernel runs iteration by iteration is described once:

* ``costs``: the duration of each iteration (an int for all, or a sequence), each >= 1 ns;
* ``apply(i, j)``: perform the effects of iterations i..j-1;
* ``stop()``: the check the kernel makes before each iteration (yield? contention?);
* ``deadline()``: the earliest time ``stop()`` can turn true *by the passage of time alone*
  (need_resched's timeslice or watchdog kick); anything else that can turn it true must be
  one of ``resources`` and settle them first (see ``Engine.settle``).

In ``exact`` mode the loop checks, applies and yields one iteration at a time.  In ``fast``
mode it checks, then yields one ``Bulk`` of every iteration that starts before the deadline;
an event touching a resource truncates the bulk at exactly the iteration where ``exact``
mode would have been interrupted, and the loop goes on from there.  The result (iterations
done, state, time) is the same in both modes for the same schedule.
"""

from __future__ import annotations

from typing import Callable, Generator, Sequence

import numpy as np

from .engine import Bulk, Engine, Resource
from .steps import Costs, Run

NEVER = 1 << 62


def run_loop(engine: Engine, n: int, costs: int | Sequence[int] | np.ndarray,
             apply: Callable[[int, int], None], stop: Callable[[], bool] | None = None,
             deadline: Callable[[], int] | None = None,
             resources: Sequence[Resource] = ()) -> Generator:
    """Run up to n iterations; returns how many ran before ``stop()`` was true."""
    uniform = isinstance(costs, int)
    if not uniform:
        costs = np.asarray(costs, dtype=np.int64)
        if len(costs) != n:
            raise ValueError("costs must have one entry per iteration")
    i = 0
    if not engine.fast:
        while i < n:
            if stop is not None and stop():
                return i
            apply(i, i + 1)
            yield costs if uniform else int(costs[i])
            i += 1
        return i
    plan = Run(n, costs) if uniform else Costs(costs)
    while i < n:
        if stop is not None and stop():
            return i
        room = (deadline() if deadline is not None else NEVER) - engine.now
        # iterations whose start is before the deadline (the first starts now, room > 0)
        m = plan.started_before(plan.start_of(i) + room) - i
        if m <= 1:
            apply(i, i + 1)
            yield costs if uniform else int(costs[i])
            i += 1
            continue
        start = i
        k = yield Bulk(Run(m, costs) if uniform else costs[i:i + m],
                       lambda k, s=start: apply(s, s + k), resources)
        i += k
    return i
