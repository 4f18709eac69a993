"""BankError and the fixes its messages name, shared by the memory bank's modules (bank.py,
store.py, index.py, embed.py), which all raise it; `mixmodal.retrieval.bank` exports it."""

from __future__ import annotations

import os

DISAGREE = "the index and its store disagree (files damaged, or copied from different versions of the bank)"


class BankError(ValueError):
    """A memory bank that cannot be used as asked; the message names the file and the fix."""


def build_hint(path: str | os.PathLike) -> str:
    return f"`mixmodal index build SOURCE --encoder DIR --out {path}`"


def rebuild_hint(path: str | os.PathLike) -> str:
    return f"rebuild with {build_hint(path)}"


__all__ = ["DISAGREE", "BankError", "build_hint", "rebuild_hint"]
