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
"""

from __future__ import annotations

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


def read_image_generation(model_dir: Path) -> bool:
    """generation.yaml's image_generation: whether the model may start images (default true)."""
    path = model_dir / GENERATION_FILE
    value = (load_yaml(path) or {}).get("image_generation", True) if path.is_file() else True
    if not isinstance(value, bool):
        raise CheckpointError(f"{path}: image_generation must be true or false, got {value!r}")
    return value


def read_image_preprocessing(model_dir: Path) -> str:
    """generation.yaml's image_preprocessing: how images become tokenizer input and pixels come back
    (tokenizers/pixels.py PIXEL_CONVENTIONS; default mixmodal's)."""
    from mixmodal.tokenizers.pixels import PIXEL_CONVENTIONS

    path = model_dir / GENERATION_FILE
    value = (load_yaml(path) or {}).get("image_preprocessing", "mixmodal") if path.is_file() else "mixmodal"
    if value not in PIXEL_CONVENTIONS:
        raise CheckpointError(f"{path}: image_preprocessing must be one of {', '.join(PIXEL_CONVENTIONS)} (or "
                              f"absent: mixmodal); got {value!r}")
    return value


def read_chat_template(model_dir: Path) -> str | None:
    """generation.yaml's chat_template (data/chat.py): None for a model never tuned on conversations."""
    from mixmodal.data.chat import TEMPLATES

    path = model_dir / GENERATION_FILE
    value = (load_yaml(path) or {}).get("chat_template") if path.is_file() else None
    if value is not None and value not in TEMPLATES:
        raise CheckpointError(f"{path}: chat_template must be one of {', '.join(TEMPLATES)} (or absent); got {value!r}")
    return value


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
    from mixmodal.model.io import load_model_dir
    from mixmodal.tokenizers.image import load_image_tokenizer
    from mixmodal.tokenizers.text import TextTokenizer

    folder = model_folder(path)
    text_dir, image_dir = folder / TEXT_TOKENIZER_DIR, folder / IMAGE_TOKENIZER_DIR
    text_tokenizer = _chameleon_tokenizer(folder) if (folder / VOCAB_MAP_FILE).is_file() else None
    if text_tokenizer is None and not text_dir.is_dir():
        raise CheckpointError(f"{folder} has no {TEXT_TOKENIZER_DIR}/ folder: copy the text tokenizer the model was "
                              f"trained with (its tokenizer.json) into {text_dir}")
    image_tokenizer = None
    if image_dir.is_dir():
        image_tokenizer = load_image_tokenizer(image_dir, device)
    elif require_image_tokenizer:
        raise CheckpointError(f"{folder} has no {IMAGE_TOKENIZER_DIR}/ folder, so its images cannot be turned into "
                              f"pixels: copy the image tokenizer the model was trained with into {image_dir} "
                              "(or generate with --mode text)")
    max_length, diffusion = read_generation_settings(folder)
    model = load_model_dir(folder, device, dtype=dtype)  # bf16: the weights stay bf16, never an fp32 copy
    engine = Engine(model, text_tokenizer or TextTokenizer.load(text_dir), image_tokenizer, diffusion=diffusion,
                    max_length=max_length, dtype=dtype, image_generation=read_image_generation(folder),
                    chat_template=read_chat_template(folder), image_preprocessing=read_image_preprocessing(folder))
    engine.checkpoint = str(folder)
    return engine


def _chameleon_tokenizer(folder: Path):
    """A converted Chameleon's own tokenizer through the adapter; CheckpointError naming the file and the fix."""
    from mixmodal.interop.chameleon_tokenizer import ChameleonTokenizer
    from mixmodal.tokenizers.text import TOKENIZER_FILE

    try:
        return ChameleonTokenizer.load(folder, folder / TEXT_TOKENIZER_DIR / TOKENIZER_FILE)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


__all__ = ["CheckpointError", "GENERATION_FILE", "load_checkpoint", "model_folder", "read_generation_settings",
           "read_chat_template", "read_image_generation", "read_image_preprocessing", "read_retrieval_settings",
           "write_generation_settings"]
