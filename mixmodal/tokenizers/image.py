"""Image tokenizers on disk: a directory of `config.yaml` + `model.safetensors`.

    config.yaml        kind: vq | vae, then the fields of VQConfig / VAEConfig
    model.safetensors  the state dict (safetensors: loading never runs code)

The same `kind` + fields mapping is the format of the model presets in
configs/tokenizers/models/, so `build_image_tokenizer_config(preset, overrides)` reads
both. Loading checks every tensor against the config and names each mismatch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch

from mixmodal.config import ConfigError, build_config, load_yaml, save_config, to_dict
from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
KINDS = {"vq": (VQConfig, VQTokenizer), "vae": (VAEConfig, VAETokenizer)}

ImageTokenizer = Union[VQTokenizer, VAETokenizer]
ImageTokenizerConfig = Union[VQConfig, VAEConfig]


def build_image_tokenizer_config(preset: str | os.PathLike | dict, overrides: Sequence[str] = ()) -> ImageTokenizerConfig:
    """A `kind: vq|vae` + fields mapping (or YAML file) <- key=value overrides -> VQConfig | VAEConfig."""
    data = dict(preset) if isinstance(preset, dict) else load_yaml(preset)
    where = "" if isinstance(preset, dict) else f"{preset}: "
    kind = data.pop("kind", None)
    if kind not in KINDS:
        raise ConfigError(f"{where}kind: expected one of {', '.join(KINDS)} (the image tokenizer type), got {kind!r}")
    return build_config(KINDS[kind][0], data, overrides)


def build_image_tokenizer(config: ImageTokenizerConfig) -> ImageTokenizer:
    """A freshly initialised tokenizer for `config`."""
    for config_cls, model_cls in KINDS.values():
        if type(config) is config_cls:
            return model_cls(config)
    raise TypeError(f"expected a VQConfig or VAEConfig, got {type(config).__name__}")


def image_tokenizer_config_dict(config: ImageTokenizerConfig) -> dict:
    kind = next(k for k, (config_cls, _) in KINDS.items() if type(config) is config_cls)
    return {"kind": kind, **to_dict(config)}


def save_image_tokenizer(model: ImageTokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `config.yaml` and `model.safetensors` into `out_dir`; each file is written to a
    temporary name and renamed, weights first, so a crash leaves the old pair or a new
    weights file that load_image_tokenizer rejects by name, never a torn file."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "kind": model.kind})
    os.replace(tmp, out / WEIGHTS_FILE)
    save_config(image_tokenizer_config_dict(model.config), out, CONFIG_FILE)
    return out


def load_image_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageTokenizer:
    """Load a tokenizer directory written by `save_image_tokenizer` (or `mixmodal convert`), in eval mode."""
    from mixmodal.weights import read_weights

    folder = Path(path)
    hint = ("train one with `mixmodal train` (configs/tokenizers/) or convert one with "
            "`mixmodal convert diffusers-vae|chameleon-vqgan SRC OUT`")
    if not folder.is_dir():
        raise FileNotFoundError(f"image tokenizer {folder} is not a directory; {hint}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: an image tokenizer directory holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE}; {hint}")
    config = build_image_tokenizer_config(folder / CONFIG_FILE)
    model = build_image_tokenizer(config)
    state = read_weights(folder / WEIGHTS_FILE, fix=f"re-save or re-copy the tokenizer; {hint}")
    check_state_dict(model, state, folder / WEIGHTS_FILE)
    model.load_state_dict(state)
    return model.to(device).eval()


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str | os.PathLike) -> None:
    """Raise ValueError listing every missing, unexpected and wrongly shaped tensor."""
    expected = model.state_dict()
    problems = []
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            problems.append(f"  {name}: checkpoint has shape {tuple(tensor.shape)}, "
                            f"the config expects {tuple(expected[name].shape)}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}"
                        + (" ..." if len(unexpected) > 20 else ""))
    if problems:
        raise ValueError(f"{origin} does not match its config ({type(model).__name__}):\n" + "\n".join(problems)
                         + f"\n(were {CONFIG_FILE} and {WEIGHTS_FILE} written by different runs?)")
