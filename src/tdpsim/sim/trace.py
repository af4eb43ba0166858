"""The event trace: an ordered list of records with a stable schema (docs/trace.md).

A record is ``(t, ev, task, fields)``: simulated time in ns, an event name, the name of the
task it concerns (or None) and a dict of extra fields.  Serialised as JSON Lines with sorted
keys, so the same run gives the same bytes.  ``limit`` keeps only the newest records (a ring
buffer) for long runs where only the excerpt before a finding is wanted.
"""

from __future__ import annotations

import json
from collections import deque
from typing import IO, Iterable

SCHEMA_VERSION = 1


class Trace:
    __slots__ = ("records", "header")

    def __init__(self, limit: int | None = None, header: dict | None = None):
        self.records: deque | list = deque(maxlen=limit) if limit else []
        self.header = {"ev": "header", "schema": SCHEMA_VERSION, **(header or {})}

    def emit(self, t: int, ev: str, task: str | None = None, **fields) -> None:
        self.records.append((t, ev, task, fields))

    def __len__(self) -> int:
        return len(self.records)

    def excerpt(self, n: int = 20) -> list[dict]:
        """The last ``n`` records as dicts (for findings)."""
        recs = list(self.records)[-n:]
        return [record_dict(r) for r in recs]

    def lines(self) -> Iterable[str]:
        yield json.dumps(self.header, sort_keys=True, separators=(",", ":"))
        for r in self.records:
            yield json.dumps(record_dict(r), sort_keys=True, separators=(",", ":"))

    def dump(self, fp: IO[str]) -> None:
        for line in self.lines():
            fp.write(line)
            fp.write("\n")

    def dumps(self) -> str:
        return "".join(line + "\n" for line in self.lines())


def record_dict(r: tuple) -> dict:
    t, ev, task, fields = r
    d = {"t": t, "ev": ev, "task": task}
    d.update(fields)
    return d
