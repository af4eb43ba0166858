"""``struct completion``: a one-shot event threads can wait for (complete_all / wait)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generator

if TYPE_CHECKING:
    from .host import Host
    from .sched import Thread


class Completion:
    def __init__(self, host: "Host"):
        self.host = host
        self.done = False
        self._waiters: list["Thread"] = []

    def complete_all(self) -> None:
        """complete_all: wake every waiter; later waits return at once."""
        self.done = True
        for th in self._waiters:
            self.host.sched.wake(th)
        self._waiters.clear()

    def wait(self, th: "Thread") -> Generator:
        """wait_for_completion: sleep until completed."""
        if not self.done:
            self._waiters.append(th)
            yield from self.host.sched.block(th)
