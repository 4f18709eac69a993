"""Files of weights: reading a safetensors file, every loader's one way in: memory-mapped, and a damaged or
foreign file is one line naming it and what to do, never a library traceback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 4 MiB blocks (checkpoint manifests, the FID Inception weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class WeightsFileError(ValueError):
    """A weights file that cannot be read; the message names it and the fix."""


def read_weights(path: str | Path, fix: str = "re-save it, or resume or export from an earlier checkpoint"
                 ) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (memory-mapped: nothing is copied until used)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path} is missing; {fix}")
    size = path.stat().st_size
    if size == 0:
        raise WeightsFileError(f"{path} is empty (0 bytes): the save was cut short; {fix}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsFileError(f"{path} is not a readable safetensors file ({size} bytes; {e}): it is truncated or "
                               f"not weights; {fix}") from None


__all__ = ["WeightsFileError", "file_sha256", "read_weights"]
