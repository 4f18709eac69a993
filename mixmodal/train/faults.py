"""Fault injection for the kill -9 soak (benchmarks/soak.py): `point(name)` kills the process with
SIGKILL at its k-th visit when MIXMODAL_KILL_AT="name:k" is set, so a test can die exactly inside a
checkpoint write or an index add (MIXMODAL_KILL_RANK=r in addition: only torchrun's rank r). Without the
variable it is one dictionary lookup."""

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
    rank = os.environ.get("MIXMODAL_KILL_RANK")  # under torchrun: only this rank dies (RANK is torchrun's)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _visits[name] = _visits.get(name, 0) + 1
    if _visits[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)


POINTS = ("checkpoint:weights", "checkpoint:optimizer", "checkpoint:manifest", "checkpoint:renamed",
          "metrics:line",
          # the memory bank's transaction (retrieval/bank.py, transaction.py): a batch appended to the store;
          # every new file written, before the commit; commit.json written; each file moved into place; a
          # build's folder complete, before its swap into place
          "index:store", "index:prepared", "index:committed", "index:replaced", "index:build")
__all__ = ["POINTS", "point"]
