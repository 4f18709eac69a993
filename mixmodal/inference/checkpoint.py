"""Compatibility: the model folder's layout and settings moved to model/bundle.py (issue 21); the names that
lived here are re-exported, and `load_checkpoint` is `Engine.from_pretrained` with the image tokenizer
optional. New code imports mixmodal.model.bundle (`load_bundle`) or uses `Engine.from_pretrained`.

The dependency runs one way (this module -> engine -> model/bundle); nothing imports this module back."""

from __future__ import annotations

from pathlib import Path

import torch

from mixmodal.inference.engine import Engine
from mixmodal.model.bundle import (GENERATION_FILE, IMAGE_TOKENIZER_DIR, TEXT_TOKENIZER_DIR, CheckpointError,
                                   ModelSettings, load_text_tokenizer, model_folder, read_chat_template,
                                   read_generation_settings, read_model_settings, read_retrieval_settings,
                                   write_generation_settings)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    require_image_tokenizer: bool = True, compile: bool = False) -> Engine:
    """An Engine for a run or model folder (`Engine.from_pretrained`). Without an image tokenizer the engine can
    only write text; `require_image_tokenizer` makes that an error naming the missing folder. `compile`:
    decoding through compiled blocks (inference/compiled.py)."""
    return Engine.from_pretrained(path, device=device, dtype=dtype, require_image_tokenizer=require_image_tokenizer,
                                  compile=compile)


__all__ = ["CheckpointError", "GENERATION_FILE", "IMAGE_TOKENIZER_DIR", "ModelSettings", "TEXT_TOKENIZER_DIR",
           "load_checkpoint", "load_text_tokenizer", "model_folder", "read_chat_template", "read_generation_settings",
           "read_model_settings", "read_retrieval_settings", "write_generation_settings"]
