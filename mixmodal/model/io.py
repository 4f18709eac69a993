"""Early-fusion models on disk: a directory of `config.yaml` + `model.safetensors`.

    config.yaml        the fields of ModelConfig (transformer, image, ...), as `to_dict` writes them
    model.safetensors  the FusionModel state dict (safetensors: loading never runs code); a
                       parameter shared with another (lm_head tied to embed_tokens) is stored
                       once, under the name that owns it

Converters (interop/hf_chameleon.py) may add files beside these (vocab_map.json,
image_tokenizer/); this module reads and writes only the two above. Loading checks every
tensor against the config and names the file and each mismatch.

    manifest.json      sizes and SHA-256s of every file in the folder (weights.py), written last by
                       whoever finishes the folder (save_model_dir here; training and converters after
                       their extra files). Loading checks it first, by weights.py's rule: sizes always,
                       hashes of files up to 64 MiB always, of larger weights when loading fails or on
                       `verify_folder`; a folder without one loads unchecked.

A LoRA run (model/lora.py) leaves adapter.safetensors + adapter_config.yaml beside the base
weights; `read_model_state` (every reader's way in) returns the weights with the adapter merged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mixmodal.config import ConfigError, build_config, load_yaml, save_config, to_dict
from mixmodal.model.fusion import FusionModel, ModelConfig
from mixmodal.weights import WeightsFileError, checked_folder, write_manifest
from mixmodal.weights import read_weights as _read_weights

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
FIX = "copy the model folder again from where it came from"


class ModelDirError(ValueError):
    """A model directory that cannot be read; the message names the file and what is wrong."""


def save_model_dir(model: FusionModel, out: str | os.PathLike, *, manifest: bool = True) -> Path:
    """Write `model`'s config and weights into `out` (created if needed); returns `out`."""
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    for alias in tied_aliases(model):
        state.pop(alias)
    return write_model_dir(model.config, state, out, manifest=manifest)


def write_model_dir(config: ModelConfig, state: dict[str, torch.Tensor], out: str | os.PathLike,
                    metadata: dict[str, str] | None = None, *, manifest: bool = True) -> Path:
    """Write `config` and the tensors `state` as they are (dtype kept), weights first, each to a
    temporary name and renamed, so a crash leaves the old pair or a weights file that
    `load_model_dir` rejects by name, never a torn file. Converters call this directly
    with a checked state dict, so a large checkpoint is never held twice in memory.
    `manifest`: end with manifest.json (of every file in `out`); a writer that adds files after
    this passes False and calls weights.write_manifest itself once the folder is complete (an
    earlier manifest stays until then, so a folder rewritten only in part fails it)."""
    from safetensors.torch import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    tensors = {name: t.contiguous().cpu() for name, t in state.items()}
    save_file(tensors, str(tmp), metadata={"format": "pt", "kind": "fusion", **(metadata or {})})
    os.replace(tmp, folder / WEIGHTS_FILE)
    save_config(to_dict(config), folder, CONFIG_FILE)
    if manifest:
        write_manifest(folder)
    return folder


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model directory (or of a config.yaml)."""
    path = Path(path)
    config_path = path / CONFIG_FILE if path.is_dir() else path
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}; "
                                f"{FIX}")
    try:
        return build_config(ModelConfig, load_yaml(config_path))
    except ConfigError as e:
        raise ConfigError(f"{e}; {FIX}" if str(config_path) in str(e) else f"{config_path}: {e}; {FIX}") from None


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, *, merge_adapter: bool = True, verify: bool = True) -> FusionModel:
    """Load a directory written by `save_model_dir` (or `mixmodal convert hf-chameleon`), in eval mode.

    The model is built on the meta device (no random init, no memory) and takes the stored
    tensors as its parameters (`assign`): safetensors maps the file, so a checkpoint already in
    `dtype` is never copied, and peak memory is about the weights' bytes once. `dtype` None is
    float32 (a bf16 checkpoint is upcast); torch.bfloat16 keeps a bf16 checkpoint as it is.
    A LoRA adapter beside the weights is merged into them (`merge_adapter=False`: the base alone).
    The folder's manifest.json is checked first (`verify=False`: the caller already did)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model directory {folder} does not exist (or is not a directory)")
    if not verify:
        return _load_model_dir(folder, device, dtype, merge_adapter)
    with checked_folder(folder, FIX):
        return _load_model_dir(folder, device, dtype, merge_adapter)


def _load_model_dir(folder: Path, device, dtype, merge_adapter: bool) -> FusionModel:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: a model directory holds {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE}; {FIX}")
    config = read_model_config(folder)
    with torch.device("meta"):
        model = FusionModel(config)
    state = read_model_state(folder, merge_adapter=merge_adapter, verify=False)
    check_model_state(model, state, folder / WEIGHTS_FILE)
    dtype = dtype or torch.float32
    state = {k: v if v.dtype == dtype or not v.is_floating_point() else v.to(dtype) for k, v in state.items()}
    aliases = tied_aliases(model)
    model.load_state_dict(state, strict=False, assign=True)
    for alias, owner in aliases.items():  # one Parameter under both names again
        _set_parameter(model, alias, model.get_parameter(owner))
    for module in model.modules():  # buffers that are computed, not stored (rotary frequencies)
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"loading {folder}: {', '.join(left[:5])} were never given values; this is a bug in mixmodal")
    return model.to(device).eval()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model folder's weights (memory-mapped); a damaged or foreign file is a ModelDirError naming it."""
    try:
        return _read_weights(path)
    except WeightsFileError as e:
        raise ModelDirError(str(e)) from None


def read_model_state(folder: str | os.PathLike, *, merge_adapter: bool = True,
                     verify: bool = True) -> dict[str, torch.Tensor]:
    """A model folder's weights (memory-mapped), with its LoRA adapter (adapter.safetensors, model/lora.py)
    merged in when it has one; a damaged file or an adapter that does not fit is a ModelDirError naming it.
    The folder's manifest.json is checked first (`verify=False`: the caller already did)."""
    folder = Path(folder)
    if not verify:
        return _read_model_state(folder, merge_adapter)
    with checked_folder(folder, FIX):
        return _read_model_state(folder, merge_adapter)


def _read_model_state(folder: Path, merge_adapter: bool) -> dict[str, torch.Tensor]:
    state = read_weights(folder / WEIGHTS_FILE)
    if not merge_adapter:
        return state
    from mixmodal.model import lora  # here, not at the top: lora.py builds on this module (a cycle)

    try:
        adapter = lora.read_adapter(folder)
        if adapter is None:
            return state
        return lora.merge_adapter(state, adapter[0], adapter[1], str(folder / lora.ADAPTER_FILE))
    except (ValueError, WeightsFileError) as e:
        raise ModelDirError(str(e)) from None


def _set_parameter(model: nn.Module, dotted: str, param: nn.Parameter) -> None:
    owner, _, name = dotted.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, name, param)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: owner} for every parameter that appears under a second name (tied embeddings)."""
    owners: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in owners:
            aliases[name] = owners[id(param)]
        else:
            owners[id(param)] = name
    return aliases


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a weights file must hold for `model` (tied aliases excluded).
    Works on a model built on the meta device, so a converter can check a large checkpoint
    without allocating the model."""
    aliases = tied_aliases(model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in aliases}


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str | os.PathLike,
                      hint: str = f"were {CONFIG_FILE} and the weights written by different runs? {FIX}") -> None:
    """Raise ModelDirError listing every missing, unexpected and wrongly shaped tensor of `state`, in one
    line ending with `hint` (what to do)."""
    expected = expected_shapes(model)
    problems = [f"{name}: the file has shape {tuple(t.shape)}, the config expects {expected[name]}"
                for name, t in state.items() if name in expected and tuple(t.shape) != expected[name]]
    problems += [f"{name}: the file holds {t.dtype}, not floating-point weights"
                 for name, t in state.items() if name in expected and not t.is_floating_point()]
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    for label, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            problems.append(f"{label} tensors ({len(names)}): {', '.join(names[:20])}" + (" ..." if len(names) > 20 else ""))
    if problems:  # one line: the CLI prints it as the whole error
        raise ModelDirError(f"{origin} does not match its config ({CONFIG_FILE}): " + "; ".join(problems)
                            + f" ({hint})")


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ModelDirError", "check_model_state", "expected_shapes", "load_model_dir",
           "read_model_config", "read_model_state", "read_weights", "save_model_dir", "tied_aliases", "write_model_dir"]


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> FusionModel:
    """`mixmodal.load_model`: a model directory, or a run directory of `mixmodal train` (its
    `model/`). Returns the FusionModel in eval mode; `model(input_ids).logits` is [B, T, V]."""
    folder = Path(path)
    if not (folder / WEIGHTS_FILE).is_file() and (folder / "model" / WEIGHTS_FILE).is_file():
        folder = folder / "model"
    return load_model_dir(folder, device)
