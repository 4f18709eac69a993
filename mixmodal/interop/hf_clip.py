"""transformers' CLIP (`CLIPModel`) -> a mixmodal dual-encoder directory (retrieval/encoder.py).

    convert_hf_clip(SRC, OUT)   SRC: config.json + model.safetensors (or a sharded index),
                                tokenizer.json, optionally preprocessor_config.json
                                -> OUT/config.yaml, model.safetensors, tokenizer.json

DualEncoder follows CLIPModel's arithmetic and its layer names, so every tensor is a
renaming, copied as it is (upcast to float32):

    text_model.embeddings.{token,position}_embedding   text.{token,position}_embedding
    text_model.encoder.layers.i.*                       text.layers.i.*
    text_model.final_layer_norm                         text.final_layer_norm
    vision_model.embeddings.{patch,position}_embedding, class_embedding   vision.*
    vision_model.pre_layrnorm (sic), post_layernorm     vision.pre_layernorm, post_layernorm
    vision_model.encoder.layers.i.*                     vision.layers.i.*
    text_projection, visual_projection, logit_scale     the same

Pooling: transformers pools the text at the first `eos_token_id`, except for configs that
still carry the old eos_token_id == 2, where it takes the largest id of the row (OpenAI
CLIP's <|endoftext|> is its largest id); the converted config says which (text.pooling).
<bos>/<eos> for tokenization come from the tokenizer's <|startoftext|> / <|endoftext|>
(else the config's ids), pad from the config's pad_token_id (masked anyway).

Pixels: OUT's vision.mean/std are the processor's image_mean/image_std
(preprocessor_config.json; OpenAI CLIP's when absent), so `encode_image(x)` on [-1, 1]
pixels equals transformers on ((x + 1) / 2 - mean) / std. transformers' processor resizes
the short side and centre-crops; DocumentEmbedder centre-crops then resizes (bicubic).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mixmodal.interop.common import ConversionError, read_hf_state, read_json
from mixmodal.retrieval.document_embedder import DocumentEmbedder, check_encoder_state, save_dual_encoder
from mixmodal.retrieval.encoder import (DualEncoder, DualEncoderConfig, EncoderError, TextTowerConfig,
                                        VisionTowerConfig, load_tokenizer)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
LEGACY_EOS_ID = 2  # transformers' marker of a config from before its pooling fix: pool at the largest id
# CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults (a config.json may omit any of them)
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_RENAMES = (  # (transformers prefix, ours), first match wins
    ("text_model.embeddings.", "text."),
    ("text_model.encoder.layers.", "text.layers."),
    ("text_model.final_layer_norm.", "text.final_layer_norm."),
    ("vision_model.embeddings.", "vision."),
    ("vision_model.pre_layrnorm.", "vision.pre_layernorm."),
    ("vision_model.encoder.layers.", "vision.layers."),
    ("vision_model.post_layernorm.", "vision.post_layernorm."),
    ("text_projection.", "text_projection."),
    ("visual_projection.", "visual_projection."),
    ("logit_scale", "logit_scale"),
)


# --- configs ---------------------------------------------------------------------------------

def _section(config: dict, key: str, defaults: dict, origin: str) -> dict:
    """A sub-config with transformers' defaults filled; old configs' `*_config_dict` wins, as there."""
    section = config.get(key) or {}
    legacy = config.get(key + "_dict") or {}
    if not isinstance(section, dict) or not isinstance(legacy, dict):
        raise ConversionError(f"{origin}: {key} must be a JSON object")
    return {**defaults, **section, **legacy}


def _square(value, key: str, origin: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"{origin}: {key}={value} is not square; mixmodal's vision tower takes square images")
        value = value[0]
    if not isinstance(value, int) or value < 1:
        raise ConversionError(f"{origin}: {key}={value!r} must be a positive integer")
    return value


def _activation(value, key: str, origin: str) -> str:
    if value not in ("gelu", "quick_gelu"):
        raise ConversionError(f"{origin}: {key}={value!r} is not implemented in mixmodal's dual encoder "
                              "(gelu or quick_gelu)")
    return value


def _image_statistics(src: Path, notes: list[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = src / "preprocessor_config.json"
    if not path.is_file():
        notes.append("no preprocessor_config.json: images are normalised with OpenAI CLIP's mean and std")
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    data = read_json(path, "")
    mean, std = data.get("image_mean", OPENAI_CLIP_MEAN), data.get("image_std", OPENAI_CLIP_STD)
    for key, value in (("image_mean", mean), ("image_std", std)):
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
            raise ConversionError(f"{path}: {key}={value!r} must be 3 numbers (RGB)")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _token_ids(text: dict, tokenizer, origin: str, tokenizer_path: Path, notes: list[str]) -> dict:
    """bos/eos/pad ids and the pooling rule (see the module docstring)."""
    eos_config = text["eos_token_id"]
    if not isinstance(eos_config, int):
        raise ConversionError(f"{origin}: text_config.eos_token_id={eos_config!r}; mixmodal pools at one eos id "
                              "(an integer)")
    bos = tokenizer.token_to_id(BOS_TOKEN)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    bos = bos if bos is not None else text["bos_token_id"]
    if eos_config == LEGACY_EOS_ID:
        if eos is None:
            raise ConversionError(f"{origin}: text_config.eos_token_id=2 (a config from before transformers' pooling "
                                  f"fix: pool at the largest id), and {tokenizer_path} has no {EOS_TOKEN} token to end "
                                  "texts with; set eos_token_id to the tokenizer's end-of-text id")
        pooling = "argmax"
        notes.append(f"text_config.eos_token_id=2 (legacy CLIP config): texts are pooled at their largest id, as "
                     f"transformers does; texts end with {EOS_TOKEN} (id {eos})")
    else:
        pooling = "eos"
        if eos is not None and eos != eos_config:
            notes.append(f"{tokenizer_path} has {EOS_TOKEN} at id {eos}, but text_config.eos_token_id={eos_config}; "
                         f"texts end with and are pooled at {eos_config}, as transformers pools")
        eos = eos_config
    pad = text["pad_token_id"]
    if not isinstance(pad, int):
        pad = eos
    if not isinstance(bos, int):
        raise ConversionError(f"{origin}: no bos id: {tokenizer_path} has no {BOS_TOKEN} and text_config.bos_token_id "
                              f"is {bos!r}")
    return {"bos_id": bos, "eos_id": eos, "pad_id": pad, "pooling": pooling}


def dual_encoder_config_from_hf(config: dict, tokenizer, src: Path, notes: list[str]) -> DualEncoderConfig:
    """A CLIPModel config.json dict -> DualEncoderConfig; what mixmodal does not implement is refused by name."""
    origin = str(src / "config.json")
    text = _section(config, "text_config", _TEXT_DEFAULTS, origin)
    vision = _section(config, "vision_config", _VISION_DEFAULTS, origin)
    if vision["num_channels"] != 3:
        raise ConversionError(f"{origin}: vision_config.num_channels={vision['num_channels']}; mixmodal's images are RGB")
    eps = {float(text["layer_norm_eps"]), float(vision["layer_norm_eps"])}
    if len(eps) != 1:
        raise ConversionError(f"{origin}: text_config.layer_norm_eps={text['layer_norm_eps']} differs from "
                              f"vision_config.layer_norm_eps={vision['layer_norm_eps']}; mixmodal's dual encoder has "
                              "one layer_norm_eps")
    mean, std = _image_statistics(src, notes)
    try:
        text_tower = TextTowerConfig(
            vocab_size=text["vocab_size"], max_length=text["max_position_embeddings"], dim=text["hidden_size"],
            num_layers=text["num_hidden_layers"], num_heads=text["num_attention_heads"],
            mlp_dim=text["intermediate_size"],
            activation=_activation(text["hidden_act"], "text_config.hidden_act", origin),
            **_token_ids(text, tokenizer, origin, src / "tokenizer.json", notes))
        vision_tower = VisionTowerConfig(
            image_size=_square(vision["image_size"], "vision_config.image_size", origin),
            patch_size=_square(vision["patch_size"], "vision_config.patch_size", origin), dim=vision["hidden_size"],
            num_layers=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
            mlp_dim=vision["intermediate_size"],
            activation=_activation(vision["hidden_act"], "vision_config.hidden_act", origin), mean=mean, std=std)
        return DualEncoderConfig(embed_dim=config.get("projection_dim") or 512, text=text_tower, vision=vision_tower,
                                 logit_scale_init=float(config.get("logit_scale_init_value", 2.6592)),
                                 layer_norm_eps=eps.pop())
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{origin}: {e}") from None


# --- tensors ---------------------------------------------------------------------------------

def hf_name_to_mixmodal(name: str) -> str | None:
    for theirs, ours in _RENAMES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return None


def hf_state_to_mixmodal(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Rename every tensor; position_ids buffers (saved by old checkpoints) are dropped; anything
    else without a counterpart (a projection bias, another model's heads) is refused by name."""
    out, unknown, dropped = {}, [], []
    for name, tensor in state.items():
        if name.endswith("embeddings.position_ids"):
            dropped.append(name)
            continue
        new = hf_name_to_mixmodal(name)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor.float() if tensor.is_floating_point() else tensor
    if unknown:
        raise ConversionError(f"tensors with no counterpart in mixmodal's dual encoder ({len(unknown)}): "
                              f"{', '.join(unknown[:12])}" + (" ..." if len(unknown) > 12 else "")
                              + " (a projection with a bias, or not a plain CLIPModel?)")
    if dropped:
        notes.append(f"dropped {', '.join(dropped)} (positions are implicit)")
    return out


# --- the conversion --------------------------------------------------------------------------

def convert_hf_clip(src: str | os.PathLike, out: str | os.PathLike) -> tuple[DocumentEmbedder, list[str]]:
    """Convert a transformers CLIPModel folder into a dual-encoder directory `out`.

    Returns the result loaded back from disk (a DocumentEmbedder on the CPU) and notes for the user."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory: pass a transformers CLIP folder (config.json + "
                              "model.safetensors + tokenizer.json)")
    origin = src / "config.json"
    config = read_json(origin, "a transformers CLIP folder holds config.json (CLIPModel.save_pretrained writes it)")
    if config.get("model_type") != "clip":
        raise ConversionError(f"{origin}: model_type={config.get('model_type')!r}; only a transformers CLIPModel "
                              "(model_type 'clip', both towers) converts to a dual encoder")
    tokenizer_path = src / "tokenizer.json"
    if not tokenizer_path.is_file():
        found = [n for n in ("vocab.json", "merges.txt") if (src / n).is_file()]
        raise ConversionError(f"{tokenizer_path} not found{' (found ' + ', '.join(found) + ')' if found else ''}: "
                              "the converted encoder needs the fast tokenizer's tokenizer.json; save it with the "
                              "model: CLIPTokenizerFast.from_pretrained(...).save_pretrained(SRC)")
    try:
        tokenizer = load_tokenizer(tokenizer_path, fix="re-download or re-save the source folder")
    except EncoderError as e:
        raise ConversionError(str(e)) from None
    notes: list[str] = []
    encoder_config = dual_encoder_config_from_hf(config, tokenizer, src, notes)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > encoder_config.text.vocab_size:
        raise ConversionError(f"{tokenizer_path} has {size} ids, more than text_config.vocab_size="
                              f"{encoder_config.text.vocab_size} of {origin}")
    state = hf_state_to_mixmodal(read_hf_state(src, "CLIPModel"), notes)
    try:
        with torch.device("meta"):  # names and shapes only: nothing is allocated
            check_encoder_state(DualEncoder(encoder_config), state, f"{src} (weights)",
                                hint="are config.json and these weights one checkpoint? re-download or re-save the "
                                     "source folder")
    except EncoderError as e:
        raise ConversionError(str(e).replace("(config.yaml)", "(config.json)")) from None
    model = DualEncoder(encoder_config)
    model.load_state_dict(state)
    save_dual_encoder(model, tokenizer, out, remake=f"re-run `mixmodal convert hf-clip {src} {out}`")
    notes.append("transformers' CLIPProcessor resizes the short side and centre-crops; DocumentEmbedder.embed_images "
                 f"centre-crops, then resizes to {encoder_config.vision.image_size} px (bicubic)")
    return DocumentEmbedder.from_pretrained(out), notes


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "convert_hf_clip", "dual_encoder_config_from_hf",
           "hf_name_to_mixmodal", "hf_state_to_mixmodal", "read_hf_state"]
