"""Fault injection for the kill -9 soak (benchmarks/soak.py): `point(name)` kills the process with
SIGKILL at its k-th visit when MIXMODAL_KILL_AT="name:k" is set, so a test can die exactly inside a
checkpoint write or an index add. Without the variable it is one dictionary lookup."""

from __future__ import annotations

import os
import signal

_visits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("MIXMODAL_KILL_AT")
    if not spec:
        return
    where, _, count = spec.rpartition(":")
    if where != name:
        return
    _visits[name] = _visits.get(name, 0) + 1
    if _visits[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


POINTS = ("checkpoint:weights", "checkpoint:optimizer", "checkpoint:manifest", "checkpoint:renamed",
          "metrics:line", "index:add")
__all__ = ["POINTS", "point"]
