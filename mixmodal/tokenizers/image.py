"""Image tokenizers on disk: a directory of `config.yaml` + `model.safetensors`.

    config.yaml        kind: vq | vae | pca | kmeans, then the fields of its config (VQConfig, VAEConfig,
                       PCAConfig, KMeansConfig)
    model.safetensors  the state dict (safetensors: loading never runs code)
    manifest.json      their sizes and SHA-256s, written last (weights.py; checked at every load)

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
from mixmodal.tokenizers.patch import KMeansConfig, KMeansTokenizer, PCAConfig, PCATokenizer
from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer
from mixmodal.weights import checked_folder, read_weights, write_manifest

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
# trained: vq, vae (train/image_tokenizer.py); computed in closed form: pca, kmeans (tokenizers/patch.py)
KINDS = {"vq": (VQConfig, VQTokenizer), "vae": (VAEConfig, VAETokenizer),
         "pca": (PCAConfig, PCATokenizer), "kmeans": (KMeansConfig, KMeansTokenizer)}

ImageTokenizer = Union[VQTokenizer, VAETokenizer, PCATokenizer, KMeansTokenizer]
ImageTokenizerConfig = Union[VQConfig, VAEConfig, PCAConfig, KMeansConfig]


def build_image_tokenizer_config(preset: str | os.PathLike | dict, overrides: Sequence[str] = ()) -> ImageTokenizerConfig:
    """A `kind:` + fields mapping (or YAML file) <- key=value overrides -> the kind's config."""
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
    raise TypeError(f"expected one of {', '.join(c.__name__ for c, _ in KINDS.values())}, got {type(config).__name__}")


def tokenizer_device(tokenizer: torch.nn.Module) -> torch.device:
    """Where a tokenizer's weights live (its parameters, or its buffers: the patch tokenizers have no parameters)."""
    for tensor in (*tokenizer.parameters(), *tokenizer.buffers()):
        return tensor.device
    return torch.device("cpu")


def image_tokenizer_config_dict(config: ImageTokenizerConfig) -> dict:
    kind = next(k for k, (config_cls, _) in KINDS.items() if type(config) is config_cls)
    return {"kind": kind, **to_dict(config)}


def save_image_tokenizer(model: ImageTokenizer, out_dir: str | os.PathLike, *, remake: str | None = None) -> Path:
    """Write `config.yaml` and `model.safetensors` into `out_dir`, then manifest.json (their sizes and
    SHA-256s; `remake`: how to write the folder again, for the loader's error). Each file is written to a
    temporary name and renamed, weights first, so a crash leaves the old pair or a new weights file that
    load_image_tokenizer rejects by name (an earlier manifest no longer fits it), never a torn file."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "kind": model.kind})
    os.replace(tmp, out / WEIGHTS_FILE)
    save_config(image_tokenizer_config_dict(model.config), out, CONFIG_FILE)
    write_manifest(out, [CONFIG_FILE, WEIGHTS_FILE], remake=remake)
    return out


def load_image_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                         verify: bool = True) -> ImageTokenizer:
    """Load a tokenizer directory written by `save_image_tokenizer` (or `mixmodal convert`), in eval mode.
    Its manifest.json, when it has one, is checked first (weights.py's rule; `verify=False`: the caller
    checked a manifest that lists its files, e.g. the model folder's, model/bundle.py)."""
    from contextlib import nullcontext

    folder = Path(path)
    hint = ("train one with `mixmodal train` (configs/tokenizers/) or convert one with "
            "`mixmodal convert diffusers-vae|chameleon-vqgan SRC OUT`")
    if not folder.is_dir():
        raise FileNotFoundError(f"image tokenizer {folder} is not a directory; {hint}")
    fix = f"re-save or re-copy the tokenizer folder; {hint}"
    with checked_folder(folder, "re-save or re-copy the tokenizer folder") if verify else nullcontext():
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: an image tokenizer directory holds "
                                        f"{CONFIG_FILE} and {WEIGHTS_FILE}; {hint}")
        try:
            config = build_image_tokenizer_config(folder / CONFIG_FILE)
        except ConfigError as e:
            raise ConfigError(f"{e}; {fix}" if str(folder / CONFIG_FILE) in str(e)
                              else f"{folder / CONFIG_FILE}: {e}; {fix}") from None
        model = build_image_tokenizer(config)
        state = read_weights(folder / WEIGHTS_FILE, fix=fix)
        try:
            check_state_dict(model, state, folder / WEIGHTS_FILE)
        except ValueError as e:
            raise ValueError(f"{e}; re-save or re-copy the tokenizer folder") from None
        model.load_state_dict(state)
    return model.to(device).eval()


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str | os.PathLike) -> None:
    """Raise ValueError listing every missing, unexpected, wrongly shaped and wrongly typed tensor (one line)."""
    expected = model.state_dict()
    problems = []
    for name, tensor in state.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            problems.append(f"{name}: checkpoint has shape {tuple(tensor.shape)}, "
                            f"the config expects {tuple(expected[name].shape)}")
        elif name in expected and tensor.is_floating_point() != expected[name].is_floating_point():
            problems.append(f"{name}: checkpoint holds {tensor.dtype}, the model {expected[name].dtype}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}"
                        + (" ..." if len(unexpected) > 20 else ""))
    if problems:  # one line: the CLI prints it as the whole error
        raise ValueError(f"{origin} does not match its config ({type(model).__name__}): " + "; ".join(problems)
                         + f" (were {CONFIG_FILE} and {WEIGHTS_FILE} written by different runs?)")
