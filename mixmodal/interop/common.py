"""What every converter shares: reading tensors safely, checking them, writing the result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mixmodal.weights import WeightsFileError, read_weights

from mixmodal.tokenizers.image import check_state_dict, load_image_tokenizer, save_image_tokenizer


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and what is wrong."""


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; ConversionError naming the file (and `what` it should be) otherwise."""
    if not path.is_file():
        raise ConversionError(f"{path} not found: {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


HF_INDEX = "model.safetensors.index.json"
HF_WEIGHTS = "model.safetensors"


def read_hf_state(src: Path, model_class: str) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers folder (model.safetensors or a sharded index), in its stored
    dtype. safetensors only: pickled weights (pytorch_model.bin) are never unpickled; the error
    tells the user to re-save with `model_class`.save_pretrained."""
    index = src / HF_INDEX
    if index.is_file():
        weight_map = read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
    elif (src / HF_WEIGHTS).is_file():
        files = [HF_WEIGHTS]
    else:
        found = sorted(p.name for p in src.glob("*.bin")) or sorted(p.name for p in src.glob("*.pt*"))
        hint = (f" (found {', '.join(found[:3])}: pickled weights are never unpickled, since loading them can run "
                f"arbitrary code; re-save the model with {model_class}.save_pretrained, which writes safetensors)"
                if found else "")
        raise ConversionError(f"{src}: no {HF_WEIGHTS} or {HF_INDEX}{hint}")
    state = {}
    for name in files:
        if not (src / name).is_file():
            raise ConversionError(f"{src / name} is listed in {HF_INDEX} but missing")
        state.update(_read(src / name))
    return state


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in _read(Path(path)).items()}


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_weights(path, fix="re-download or re-save the source folder")
    except WeightsFileError as e:
        raise ConversionError(str(e)) from None


def finish_conversion(model, state: dict[str, torch.Tensor], origin: str | os.PathLike, out: str | os.PathLike,
                      remake: str | None = None):
    """Load `state` into `model` (every tensor accounted for, buffers kept at their
    initial values), write the tokenizer directory (its manifest's `remake`: the command that
    converts it again) and return it loaded back from disk."""
    full = dict(state)
    for name, buffer in model.named_buffers():  # bookkeeping buffers (dead-code counters) start fresh
        full.setdefault(name, buffer)
    try:
        check_state_dict(model, full, origin)
    except ValueError as e:
        raise ConversionError(str(e).replace("(were config.yaml and model.safetensors written by different runs?)",
                                             "(is the source config the one these weights were trained with?)")) from None
    model.load_state_dict(full)
    save_image_tokenizer(model, out, remake=remake)
    return load_image_tokenizer(Path(out))
