"""The model folder: its layout, its generation.yaml, and `load_bundle` (everything generation needs from it).

`mixmodal train` (task fusion) writes RUN/model/:

    config.yaml, model.safetensors   the model (model/io.py)
    text_tokenizer/                  the BPE the model was trained with
    image_tokenizer/                 the VQ (token mode) or KL-VAE (latent mode)
    generation.yaml                  max_length (the trained data.pipeline.seq_len) and, in
                                     latent mode, the diffusion schedule (kind, steps, ...), and
                                     for a retrieval-augmented run its memory bank and k
    training.json                    what training cost (train/fusion.py; `mixmodal eval` reads it)
    manifest.json                    sizes and SHA-256s of every file above but generation.yaml,
                                     the tokenizers' files included (weights.py), written last

A run directory or its model/ folder are both accepted. A checkpoint written before
generation.yaml existed falls back to the run's config.yaml for max_length and diffusion.

A converted Chameleon (`mixmodal convert hf-chameleon`) also holds vocab_map.json (and
hf_config.json); its text_tokenizer/tokenizer.json is Chameleon's own, loaded through the adapter
(interop/chameleon_tokenizer.py), and its generation.yaml says whether it may start images
(`image_generation`, false for base Chameleon; absent means true) and how its images become
pixels (`image_preprocessing: chameleon`, Meta's pipeline; absent means mixmodal's,
tokenizers/pixels.py). Its image_tokenizer/ is the VQGAN: encoder only when converted from
transformers alone, encoder and decoder from Meta's vqgan.ckpt.

Generation and training read a folder through the same functions: `load_text_tokenizer`
(Chameleon's tokenizer through the adapter when a vocab_map.json sits beside text_tokenizer/,
mixmodal's BPE otherwise) and `read_model_settings` (generation.yaml). A fine-tuning run
(`init_from`) therefore encodes its data as the engine encodes prompts, and writes RUN/model
in the same form (train/fusion.py). `load_bundle` reads a whole folder: the engine is built
from its Bundle (`Engine.from_bundle`, `Engine.from_pretrained`).

Loading checks the folder's manifest once (weights.py's rule): the tokenizers' own manifests
are not checked again when the folder's manifest lists the files they read, so every file is
hashed at most once per load.

This module imports nothing from mixmodal.inference or mixmodal.train: both import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import torch

from mixmodal.config import build_config, load_yaml, save_config, to_dict
from mixmodal.data.chat import TEMPLATES
from mixmodal.interop.chameleon_tokenizer import ChameleonTokenizer
from mixmodal.interop.vocab_map import VOCAB_MAP_FILE
from mixmodal.model.fusion import FusionModel
from mixmodal.model.io import CONFIG_FILE, FIX, WEIGHTS_FILE, load_model_dir
from mixmodal.objectives.diffusion import DiffusionConfig
from mixmodal.tokenizers import image as image_io
from mixmodal.tokenizers.image import ImageTokenizer, load_image_tokenizer
from mixmodal.tokenizers.pixels import PIXEL_CONVENTIONS
from mixmodal.tokenizers.text import TOKENIZER_FILE, TextTokenizer
from mixmodal.weights import ManifestError, checked_folder, read_manifest

# --- the layout -------------------------------------------------------------------------------

MODEL_DIR = "model"  # a run's model folder: RUN/model
GENERATION_FILE = "generation.yaml"
TEXT_TOKENIZER_DIR = "text_tokenizer"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
TRAINING_FILE = "training.json"  # what training cost, for `mixmodal eval` and the study
# VOCAB_MAP_FILE = "vocab_map.json": a converted Chameleon: Chameleon id <-> mixmodal id (interop/vocab_map.py)
HF_CONFIG_FILE = "hf_config.json"  # the source's config.json, kept so the inverse writes the same fields back

TextTokenizerLike = Union[TextTokenizer, ChameleonTokenizer]


class BundleError(ValueError):
    """A model folder that cannot be generated from; the message names the path and the fix."""


CheckpointError = BundleError  # the name it had in inference/checkpoint.py


# --- generation.yaml --------------------------------------------------------------------------

def write_generation_settings(model_dir: str | Path, *, max_length: int | None, diffusion: DiffusionConfig | None,
                              retrieval: dict | None = None, image_generation: bool | None = None,
                              chat_template: str | None = None, image_preprocessing: str | None = None,
                              image_sampling: dict | None = None) -> Path:
    """model_dir/generation.yaml (never listed in a manifest: meant to be edited); None leaves a key out."""
    settings: dict = {"max_length": max_length}
    if image_sampling:
        settings["image_sampling"] = dict(image_sampling)
    if image_preprocessing is not None:
        settings["image_preprocessing"] = image_preprocessing
    if chat_template is not None:
        settings["chat_template"] = chat_template
    if image_generation is not None:
        settings["image_generation"] = bool(image_generation)
    if diffusion is not None:
        settings["diffusion"] = to_dict(diffusion)
    if retrieval is not None:
        settings["retrieval"] = dict(retrieval)
    return save_config(settings, model_dir, GENERATION_FILE)


def read_retrieval_settings(model_dir: str | Path) -> dict | None:
    """The memory bank (index, encoder, k) a retrieval-augmented model was trained with, or None."""
    path = model_folder(model_dir) / GENERATION_FILE
    return (load_yaml(path) or {}).get("retrieval") if path.is_file() else None


def read_image_sampling(model_dir: str | Path) -> dict | None:
    """The text -> image sampling a model folder states (generation.yaml image_sampling), or None."""
    return _image_sampling(*_generation_yaml(model_folder(model_dir)))


def _image_sampling(path: Path, data: dict) -> dict | None:
    value = data.get("image_sampling")
    if value is not None and not isinstance(value, dict):
        raise BundleError(f"{path}: image_sampling must be a mapping of sampling settings (cfg: 7.5, "
                          f"plausibility: 0.5, ...); got {value!r}")
    return value


def _setting(path: Path, data: dict, key: str, default, allowed: tuple, hint: str):
    """generation.yaml's `key` (the default when absent), checked against `allowed`."""
    value = data.get(key, default)
    if not any(type(value) is type(a) and value == a for a in allowed):  # typed: 1 is not true
        raise BundleError(f"{path}: {key} must be {hint}; got {value!r}")
    return value


def _generation_yaml(model_dir: Path) -> tuple[Path, dict]:
    path = Path(model_dir) / GENERATION_FILE
    return path, (load_yaml(path) or {}) if path.is_file() else {}


def _image_generation(path: Path, data: dict) -> bool:
    """Whether the model may start images (default true; false for a base Chameleon)."""
    return _setting(path, data, "image_generation", True, (True, False), "true or false")


def _image_preprocessing(path: Path, data: dict) -> str:
    """How images become tokenizer input and pixels come back (tokenizers/pixels.py; default mixmodal's)."""
    return _setting(path, data, "image_preprocessing", "mixmodal", tuple(PIXEL_CONVENTIONS),
                    f"one of {', '.join(PIXEL_CONVENTIONS)} (or absent: mixmodal)")


def _chat_template(path: Path, data: dict) -> str | None:
    """The conversation template (data/chat.py): None for a model never tuned on conversations."""
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
    image_sampling: dict | None = None  # the text -> image sampling it was tuned for (eval-suite fields)


def read_model_settings(model_dir: str | Path) -> ModelSettings:
    """Every generation setting of a model folder, read and checked in one place (engine and training)."""
    folder = Path(model_dir)
    path, data = _generation_yaml(folder)
    max_length, diffusion = read_generation_settings(folder)
    return ModelSettings(max_length, diffusion, _image_generation(path, data), _chat_template(path, data),
                         _image_preprocessing(path, data), frozenset(data), _image_sampling(path, data))


# --- the tokenizers ---------------------------------------------------------------------------

def load_text_tokenizer(text_dir: str | Path, *, verify: bool = True) -> TextTokenizerLike:
    """The text tokenizer in `text_dir` (a model folder's or a run's text_tokenizer/, or data.text_tokenizer):
    a converted Chameleon's own through the adapter (ChameleonTokenizer) when a vocab_map.json sits beside
    that folder, else mixmodal's byte-level BPE (TextTokenizer). ValueError naming the file and the fix.
    `verify=False`: its manifest is not checked (the caller checked a manifest that lists its files)."""
    text_dir = Path(text_dir)
    if (text_dir.parent / VOCAB_MAP_FILE).is_file():
        return ChameleonTokenizer.load(text_dir.parent, text_dir / TOKENIZER_FILE)
    try:
        return TextTokenizer.load(text_dir, verify=verify)
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


def _covered(listed: set[str], sub: str, names: Iterable[str]) -> bool:
    """Whether the folder's manifest (its `listed` files) lists every file `names` of subfolder `sub`: then it
    was checked already, and the subfolder's own manifest need not be checked (and its files hashed) again."""
    return all(f"{sub}/{name}" in listed for name in names)


# --- the folder -------------------------------------------------------------------------------

def model_folder(path: str | Path) -> Path:
    """The model folder `path` names: the folder itself, or RUN/model of a run. BundleError naming the fix."""
    folder = Path(path)
    if not folder.exists():
        raise BundleError(f"checkpoint {folder} does not exist; give a run directory of `mixmodal train` "
                          "or its model/ folder")
    if not (folder / WEIGHTS_FILE).is_file() and (folder / MODEL_DIR / WEIGHTS_FILE).is_file():
        folder = folder / MODEL_DIR
    if not (folder / WEIGHTS_FILE).is_file():
        raise BundleError(f"{folder} holds no {WEIGHTS_FILE}: give a run directory of `mixmodal train` (it writes "
                          "RUN/model/ when training ends) or a model folder")
    return folder


@dataclass
class Bundle:
    """A model with what drives it: its tokenizers and its generation.yaml settings. `load_bundle` reads one
    from a folder; training builds one around the model it is training (its in-training eval)."""

    model: FusionModel
    text_tokenizer: TextTokenizerLike
    image_tokenizer: ImageTokenizer | None  # None: a folder without image_tokenizer/ (text only)
    max_length: int | None = None  # the positions it was trained on (None: unknown)
    diffusion: DiffusionConfig | None = None  # latent mode: the schedule it was trained with
    image_generation: bool = True  # False: it may not start images (a base Chameleon)
    chat_template: str | None = None  # data/chat.py's template; None: never tuned on conversations
    image_preprocessing: str = "mixmodal"  # tokenizers/pixels.py's convention
    retrieval: dict | None = None  # the memory bank it was trained with (index, encoder, k), or None
    # the text -> image sampling the model was tuned for, in the eval suite's fields (cfg, plausibility, ...;
    # eval/shapes_tasks.py SAMPLING_FIELDS), over the suite's defaults for its mode; None: those defaults
    image_sampling: dict | None = None
    dtype: torch.dtype | None = None  # what the weights were loaded as (None: float32)
    folder: Path | None = None  # the model folder it was read from


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                require_image_tokenizer: bool = True) -> Bundle:
    """The Bundle of a run or model folder, its manifest checked once. Without image_tokenizer/ the bundle
    has no image tokenizer (it can only write text); `require_image_tokenizer` makes that a BundleError
    naming the missing folder. `dtype` None loads float32; torch.bfloat16 keeps bf16 weights as they are."""
    folder = model_folder(path)
    text_dir, image_dir = folder / TEXT_TOKENIZER_DIR, folder / IMAGE_TOKENIZER_DIR
    # manifest.json (weights.py) covers the tokenizers inside the folder too: checked once, here
    with checked_folder(folder, FIX):
        listed = set((read_manifest(folder) or {"files": {}})["files"])
        if not (folder / VOCAB_MAP_FILE).is_file() and not text_dir.is_dir():
            raise BundleError(f"{folder} has no {TEXT_TOKENIZER_DIR}/ folder: copy the text tokenizer the model "
                              f"was trained with (its tokenizer.json) into {text_dir}")
        try:
            text_tokenizer = load_text_tokenizer(
                text_dir, verify=not _covered(listed, TEXT_TOKENIZER_DIR, [TOKENIZER_FILE]))
        except ManifestError:
            raise
        except ValueError as e:
            raise BundleError(str(e)) from None
        image_tokenizer = None
        if image_dir.is_dir():
            image_tokenizer = load_image_tokenizer(
                image_dir, device,
                verify=not _covered(listed, IMAGE_TOKENIZER_DIR, [image_io.CONFIG_FILE, image_io.WEIGHTS_FILE]))
        elif require_image_tokenizer:
            raise BundleError(f"{folder} has no {IMAGE_TOKENIZER_DIR}/ folder, so its images cannot be turned "
                              f"into pixels: copy the image tokenizer the model was trained with into {image_dir} "
                              "(or generate with --mode text)")
        settings = read_model_settings(folder)
        retrieval = _generation_yaml(folder)[1].get("retrieval")
        model = load_model_dir(folder, device, dtype=dtype, verify=False)  # bf16: stays bf16, never an fp32 copy
    return Bundle(model, text_tokenizer, image_tokenizer, max_length=settings.max_length,
                  diffusion=settings.diffusion, image_generation=settings.image_generation,
                  chat_template=settings.chat_template, image_preprocessing=settings.image_preprocessing,
                  retrieval=retrieval, image_sampling=settings.image_sampling, dtype=dtype,
                  folder=folder)


__all__ = ["Bundle", "BundleError", "CONFIG_FILE", "CheckpointError", "GENERATION_FILE", "HF_CONFIG_FILE",
           "IMAGE_TOKENIZER_DIR", "MODEL_DIR", "ModelSettings", "TEXT_TOKENIZER_DIR", "TRAINING_FILE",
           "VOCAB_MAP_FILE", "WEIGHTS_FILE", "load_bundle", "load_text_tokenizer", "model_folder",
           "read_chat_template", "read_generation_settings", "read_model_settings", "read_retrieval_settings",
           "write_generation_settings"]
