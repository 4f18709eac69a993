"""What generation needs from a checkpoint, read in one place.

`mixmodal train` (task fusion) writes RUN/model/:

    config.yaml, model.safetensors   the model (model/io.py)
    text_tokenizer/                  the BPE the model was trained with
    image_tokenizer/                 the VQ (token mode) or KL-VAE (latent mode)
    generation.yaml                  max_length (the trained data.pipeline.seq_len) and, in
                                     latent mode, the diffusion schedule (kind, steps, ...), and
                                     for a retrieval-augmented run its memory bank and k

A run directory or its model/ folder are both accepted. A checkpoint written before
generation.yaml existed falls back to the run's config.yaml for the same two facts.

A converted Chameleon (`mixmodal convert hf-chameleon`) also holds vocab_map.json; its
text_tokenizer/tokenizer.json is Chameleon's own, loaded through the adapter
(interop/chameleon_tokenizer.py), and its generation.yaml says whether it may start
images (`image_generation`, false for base Chameleon; absent means true) and how its
images become pixels (`image_preprocessing: chameleon`, Meta's pipeline; absent means
mixmodal's, tokenizers/pixels.py). Its image_tokenizer/ is the VQGAN: encoder only when
converted from transformers alone, encoder and decoder from Meta's vqgan.ckpt.

Generation and training read a folder through the same two functions: `load_text_tokenizer`
(Chameleon's tokenizer through the adapter when a vocab_map.json sits beside text_tokenizer/,
mixmodal's BPE otherwise) and `read_model_settings` (generation.yaml). A fine-tuning run
(`init_from`) therefore encodes its data as the engine encodes prompts, and writes RUN/model
in the same form (train/fusion.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mixmodal.config import build_config, load_yaml, save_config
from mixmodal.objectives.diffusion import DiffusionConfig

GENERATION_FILE = "generation.yaml"
TEXT_TOKENIZER_DIR = "text_tokenizer"
IMAGE_TOKENIZER_DIR = "image_tokenizer"


class CheckpointError(ValueError):
    """A checkpoint that cannot be generated from; the message names the path and the fix."""


def write_generation_settings(model_dir: str | Path, *, max_length: int | None, diffusion: DiffusionConfig | None,
                              retrieval: dict | None = None, image_generation: bool | None = None,
                              chat_template: str | None = None, image_preprocessing: str | None = None) -> Path:
    settings: dict = {"max_length": max_length}
    if image_preprocessing is not None:
        settings["image_preprocessing"] = image_preprocessing
    if chat_template is not None:
        settings["chat_template"] = chat_template
    if image_generation is not None:
        settings["image_generation"] = bool(image_generation)
    if diffusion is not None:
        from mixmodal.config import to_dict

        settings["diffusion"] = to_dict(diffusion)
    if retrieval is not None:
        settings["retrieval"] = dict(retrieval)
    return save_config(settings, model_dir, GENERATION_FILE)


def read_retrieval_settings(model_dir: str | Path) -> dict | None:
    """The memory bank (index, encoder, k) a retrieval-augmented model was trained with, or None."""
    path = model_folder(model_dir) / GENERATION_FILE
    return (load_yaml(path) or {}).get("retrieval") if path.is_file() else None


def _setting(path: Path, data: dict, key: str, default, allowed: tuple, hint: str):
    """generation.yaml's `key` (the default when absent), checked against `allowed`."""
    value = data.get(key, default)
    if not any(type(value) is type(a) and value == a for a in allowed):  # typed: 1 is not true
        raise CheckpointError(f"{path}: {key} must be {hint}; got {value!r}")
    return value


def _generation_yaml(model_dir: Path) -> tuple[Path, dict]:
    path = Path(model_dir) / GENERATION_FILE
    return path, (load_yaml(path) or {}) if path.is_file() else {}


def _image_generation(path: Path, data: dict) -> bool:
    """Whether the model may start images (default true; false for a base Chameleon)."""
    return _setting(path, data, "image_generation", True, (True, False), "true or false")


def _image_preprocessing(path: Path, data: dict) -> str:
    """How images become tokenizer input and pixels come back (tokenizers/pixels.py; default mixmodal's)."""
    from mixmodal.tokenizers.pixels import PIXEL_CONVENTIONS

    return _setting(path, data, "image_preprocessing", "mixmodal", tuple(PIXEL_CONVENTIONS),
                    f"one of {', '.join(PIXEL_CONVENTIONS)} (or absent: mixmodal)")


def _chat_template(path: Path, data: dict) -> str | None:
    """The conversation template (data/chat.py): None for a model never tuned on conversations."""
    from mixmodal.data.chat import TEMPLATES

    return _setting(path, data, "chat_template", None, (None, *TEMPLATES), f"one of {', '.join(TEMPLATES)} (or absent)")


def read_chat_template(model_dir: Path) -> str | None:
    """generation.yaml's chat_template (data/chat.py): None for a model never tuned on conversations."""
    return _chat_template(*_generation_yaml(model_dir))


def read_generation_settings(model_dir: Path) -> tuple[int | None, DiffusionConfig | None]:
    """(max_length, diffusion config) from generation.yaml, else from the run's config.yaml."""
    for path, get in ((model_dir / GENERATION_FILE, lambda d: (d.get("max_length"), d.get("diffusion"))),
                      (model_dir.parent / "config.yaml",
                       lambda d: ((d.get("data") or {}).get("pipeline", {}).get("seq_len"), d.get("diffusion")))):
        if path.is_file():
            max_length, diffusion = get(load_yaml(path) or {})
            return (int(max_length) if max_length else None,
                    build_config(DiffusionConfig, diffusion) if diffusion is not None else None)
    return None, None


@dataclass(frozen=True)
class ModelSettings:
    """How a model folder is driven, from its generation.yaml (the effective values; `stated`: the keys
    the file itself gives, which a run fine-tuned from the folder carries into its own)."""

    max_length: int | None
    diffusion: DiffusionConfig | None
    image_generation: bool
    chat_template: str | None
    image_preprocessing: str
    stated: frozenset[str]


def read_model_settings(model_dir: str | Path) -> ModelSettings:
    """Every generation setting of a model folder, read and checked in one place (engine and training)."""
    folder = Path(model_dir)
    path, data = _generation_yaml(folder)
    max_length, diffusion = read_generation_settings(folder)
    return ModelSettings(max_length, diffusion, _image_generation(path, data), _chat_template(path, data),
                         _image_preprocessing(path, data), frozenset(data))


def load_text_tokenizer(text_dir: str | Path):
    """The text tokenizer in `text_dir` (a model folder's or a run's text_tokenizer/, or data.text_tokenizer):
    a converted Chameleon's own through the adapter (ChameleonTokenizer) when a vocab_map.json sits beside
    that folder, else mixmodal's byte-level BPE (TextTokenizer). ValueError naming the file and the fix."""
    from mixmodal.interop.chameleon_tokenizer import ChameleonTokenizer
    from mixmodal.interop.hf_chameleon import VOCAB_MAP_FILE
    from mixmodal.tokenizers.text import TOKENIZER_FILE, TextTokenizer

    text_dir = Path(text_dir)
    if (text_dir.parent / VOCAB_MAP_FILE).is_file():
        return ChameleonTokenizer.load(text_dir.parent, text_dir / TOKENIZER_FILE)
    from mixmodal.weights import ManifestError

    try:
        return TextTokenizer.load(text_dir)
    except ManifestError:
        raise
    except ValueError:
        file = text_dir / TOKENIZER_FILE if text_dir.is_dir() else text_dir
        if file.is_file() and "<racm3:break>" in file.read_text(encoding="utf-8", errors="replace"):
            raise ValueError(f"{file} is Chameleon's text tokenizer, which mixmodal reads through the vocab_map.json "
                             f"that `mixmodal convert hf-chameleon` writes beside text_tokenizer/; there is none at "
                             f"{text_dir.parent / VOCAB_MAP_FILE}: use the converted folder's text_tokenizer/ (or "
                             "init_from the converted folder)") from None
        raise


def model_folder(path: str | Path) -> Path:
    from mixmodal.model.io import WEIGHTS_FILE

    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint {folder} does not exist; give a run directory of `mixmodal train` "
                              "or its model/ folder")
    if not (folder / WEIGHTS_FILE).is_file() and (folder / "model" / WEIGHTS_FILE).is_file():
        folder = folder / "model"
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} holds no {WEIGHTS_FILE}: give a run directory of `mixmodal train` (it writes "
                              "RUN/model/ when training ends) or a model folder")
    return folder


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    require_image_tokenizer: bool = True):
    """An Engine for a run or model folder. Without an image tokenizer the engine can only write text;
    `require_image_tokenizer` makes that an error naming the missing folder."""
    from mixmodal.inference.engine import Engine
    from mixmodal.interop.hf_chameleon import VOCAB_MAP_FILE
    from mixmodal.model.io import FIX, load_model_dir
    from mixmodal.tokenizers.image import load_image_tokenizer
    from mixmodal.weights import ManifestError, checked_folder

    folder = model_folder(path)
    text_dir, image_dir = folder / TEXT_TOKENIZER_DIR, folder / IMAGE_TOKENIZER_DIR
    # manifest.json (weights.py) covers the tokenizers inside the folder too: checked once, here
    with checked_folder(folder, FIX):
        if not (folder / VOCAB_MAP_FILE).is_file() and not text_dir.is_dir():
            raise CheckpointError(f"{folder} has no {TEXT_TOKENIZER_DIR}/ folder: copy the text tokenizer the model "
                                  f"was trained with (its tokenizer.json) into {text_dir}")
        try:
            text_tokenizer = load_text_tokenizer(text_dir)
        except ManifestError:
            raise
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        image_tokenizer = None
        if image_dir.is_dir():
            image_tokenizer = load_image_tokenizer(image_dir, device)
        elif require_image_tokenizer:
            raise CheckpointError(f"{folder} has no {IMAGE_TOKENIZER_DIR}/ folder, so its images cannot be turned "
                                  f"into pixels: copy the image tokenizer the model was trained with into {image_dir} "
                                  "(or generate with --mode text)")
        settings = read_model_settings(folder)
        model = load_model_dir(folder, device, dtype=dtype, verify=False)  # bf16: stays bf16, never an fp32 copy
    engine = Engine(model, text_tokenizer, image_tokenizer, diffusion=settings.diffusion,
                    max_length=settings.max_length, dtype=dtype, image_generation=settings.image_generation,
                    chat_template=settings.chat_template, image_preprocessing=settings.image_preprocessing)
    engine.checkpoint = str(folder)
    return engine


__all__ = ["CheckpointError", "GENERATION_FILE", "ModelSettings", "load_checkpoint", "load_text_tokenizer", "model_folder",
           "read_generation_settings", "read_model_settings",
           "read_chat_template", "read_retrieval_settings",
           "write_generation_settings"]
