"""mixmodal token-mode model directory -> transformers' Chameleon (`ChameleonForConditionalGeneration`).

    convert_to_hf_chameleon(SRC, OUT)  a mixmodal token-mode model directory
                                       -> OUT/config.json + model.safetensors (+ tokenizer.json),
                                          which `ChameleonForConditionalGeneration.from_pretrained(OUT)` loads

The inverse of interop/hf_chameleon.py (`convert_hf_chameleon`), whose docstring describes the
mapping both directions share and from which this module imports the vocabulary layout and the
weight check. A converted Chameleon goes back to Chameleon's ids and config fields (its
vocab_map.json and hf_config.json); a model trained in mixmodal keeps its ids, with a
vocabulary_map naming its special and image tokens. The VQGAN encoder of OUT/image_tokenizer/,
when present, becomes `model.vqmodel.*` (transformers has no decoder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixmodal.config import load_yaml
from mixmodal.interop.chameleon_tokenizer import SOURCE_TOKENIZER_FILES
from mixmodal.interop.chameleon_vqgan import TAMING_NORM_GROUPS, taming_to_mixmodal
from mixmodal.interop.common import HF_WEIGHTS, ConversionError
from mixmodal.interop.hf_chameleon import (_VOCAB_ROWS, _VQ_PREFIX, _check, image_token_name, native_vocab_map,
                                           native_vocabulary_map)
from mixmodal.interop.vocab_map import VocabMap
from mixmodal.model.bundle import HF_CONFIG_FILE, IMAGE_TOKENIZER_DIR, TEXT_TOKENIZER_DIR, VOCAB_MAP_FILE
from mixmodal.model.fusion import ModelConfig
from mixmodal.model.io import CONFIG_FILE, WEIGHTS_FILE, ModelDirError, read_model_config, read_model_state
from mixmodal.model.lora import ADAPTER_FILE
from mixmodal.tokenizers.image import load_image_tokenizer


# --- configs ------------------------------------------------------------------------------

def hf_config_from_model_config(config: ModelConfig, vocab_map: VocabMap, base: dict | None, dtype: torch.dtype) -> dict:
    """A Chameleon config.json dict for `config`; fields mixmodal does not model come from `base`
    (the converted checkpoint's own config) or, for a model trained in mixmodal, from its vocab."""
    t = config.transformer
    out = dict(base or {})
    if base is None:
        vocab = config.vocab
        out.update(vocabulary_map=native_vocabulary_map(vocab), bos_token_id=vocab.bos, eos_token_id=vocab.eos,
                   pad_token_id=vocab.pad, max_position_embeddings=4096, model_parallel_size=1, hidden_act="silu",
                   use_cache=True, vq_config=_native_vq_config(config))
    out.pop("rope_scaling", None)
    out.update(
        architectures=["ChameleonForConditionalGeneration"], model_type="chameleon",
        vocab_size=vocab_map.hf_vocab_size, hidden_size=t.dim, intermediate_size=t.hidden_dim,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.kv_heads,
        rms_norm_eps=t.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        rope_theta=t.rope_theta,  # what transformers 4.x reads (5.x reads either)
        swin_norm=t.swin_norm, attention_bias=t.attention_bias, mlp_bias=t.mlp_bias,
        attention_dropout=t.attention_dropout, initializer_range=t.init_std, tie_word_embeddings=config.tie_embeddings,
        dtype=str(dtype).removeprefix("torch."))
    out.pop("torch_dtype", None)
    return out


def _native_vq_config(config: ModelConfig) -> dict:
    """A small placeholder VQGAN config with the model's codebook size and grid (its weights are not
    written; transformers initialises them at random). One level: resolution = grid size."""
    image = config.image
    return {"embed_dim": 8, "num_embeddings": image.num_codes, "latent_channels": 8, "resolution": image.grid_size,
            "in_channels": 3, "base_channels": 32, "channel_multiplier": [1], "num_res_blocks": 1,
            "attn_resolutions": [], "dropout": 0.0, "double_latent": False, "attn_type": "vanilla"}


# --- tensors ------------------------------------------------------------------------------

def mixmodal_name_to_hf(name: str) -> str | None:
    if name in ("lm_head.weight", "embed_tokens.weight"):
        return "lm_head.weight" if name == "lm_head.weight" else "model.embed_tokens.weight"
    if name.startswith("transformer."):
        return "model." + name[len("transformer."):]
    return None


def mixmodal_state_to_hf(state: dict[str, torch.Tensor], vocab_map: VocabMap) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for name, tensor in state.items():
        new = mixmodal_name_to_hf(name)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor[vocab_map.index()].contiguous() if name in _VOCAB_ROWS else tensor
    if unknown:
        raise ConversionError(f"tensors with no Chameleon counterpart ({len(unknown)}): {', '.join(unknown[:12])}"
                              + (" ..." if len(unknown) > 12 else ""))
    return out


# --- writing ------------------------------------------------------------------------------

def convert_to_hf_chameleon(src: str | os.PathLike, out: str | os.PathLike) -> tuple[dict, list[str]]:
    """Write a mixmodal token-mode model directory `src` as a transformers Chameleon folder `out`.

    Uses src/vocab_map.json and src/hf_config.json when present (a converted Chameleon: ids
    and config fields go back to Chameleon's); otherwise ids stay as they are, the padding
    rows are dropped, and a vocabulary_map names the image tokens. Returns the written
    config.json dict and notes for the user."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory: pass a mixmodal model directory ({CONFIG_FILE} + {WEIGHTS_FILE})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise ConversionError(f"{src / name} not found: a mixmodal model directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = read_model_config(src)
    t = config.transformer
    if config.image.mode != "tokens":
        raise ConversionError(f"{src / CONFIG_FILE}: image.mode={config.image.mode!r}; Chameleon has image tokens "
                              "only (image.mode=tokens)")
    if not t.qk_norm:
        raise ConversionError(f"{src / CONFIG_FILE}: transformer.qk_norm=false; Chameleon always applies QK-norm")
    if config.image.is_bidirectional:
        raise ConversionError(f"{src / CONFIG_FILE}: image.bidirectional=true; Chameleon attends causally inside images")
    if config.image.code_embedding != "learned":
        raise ConversionError(f"{src / CONFIG_FILE}: image.code_embedding={config.image.code_embedding}; Chameleon "
                              "has one embedding and one lm_head row per code and no shared map of code vectors "
                              "(train with image.code_embedding=learned to export)")
    if config.image.slot_embedding:
        raise ConversionError(f"{src / CONFIG_FILE}: image.slot_embedding=true; Chameleon's image codes carry no row "
                              "or column embedding (train without it to export)")
    try:
        state = read_model_state(src)  # a LoRA run's folder: its adapter merged into the weights
    except ModelDirError as e:
        raise ConversionError(str(e)) from None
    _check(config, state, str(src / WEIGHTS_FILE))
    notes = []
    if (src / ADAPTER_FILE).is_file():
        notes.append(f"the LoRA adapter {src / ADAPTER_FILE} was merged into the weights written")
    if (src / VOCAB_MAP_FILE).is_file():
        vocab_map = VocabMap.read(src / VOCAB_MAP_FILE)
        if (vocab_map.text_size, vocab_map.num_image_codes) != (config.text_vocab_size, config.image.num_codes):
            raise ConversionError(f"{src / VOCAB_MAP_FILE}: text_size={vocab_map.text_size}, num_image_codes="
                                  f"{vocab_map.num_image_codes} disagree with {src / CONFIG_FILE} "
                                  f"({config.text_vocab_size}, {config.image.num_codes})")
    else:
        vocab_map = native_vocab_map(config)
        notes.append(f"no {VOCAB_MAP_FILE}: ids are kept (mixmodal's layout, padding rows dropped); vocabulary_map "
                     f"names the special tokens and image codes {image_token_name(0)}..")
    base = json.loads((src / HF_CONFIG_FILE).read_text(encoding="utf-8")) if (src / HF_CONFIG_FILE).is_file() else None
    hf_state = mixmodal_state_to_hf(state, vocab_map)
    if config.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    dtype = hf_state["model.embed_tokens.weight"].dtype
    hf_config = hf_config_from_model_config(config, vocab_map, base, dtype)
    if t.dropout:
        notes.append(f"transformer.dropout={t.dropout} has no Chameleon counterpart (dropped; inference is unaffected)")
    if (src / IMAGE_TOKENIZER_DIR).is_dir():
        vq_config, vq_state = _vqgan_to_hf(src / IMAGE_TOKENIZER_DIR, config.image.num_codes)
        hf_config["vq_config"] = vq_config
        hf_state.update({_VQ_PREFIX + k: v for k, v in vq_state.items()})
        decoder = not load_yaml(src / IMAGE_TOKENIZER_DIR / CONFIG_FILE).get("encoder_only", False)
        notes.append(f"the VQGAN encoder of {src / IMAGE_TOKENIZER_DIR} went to model.vqmodel"
                     + (" (its decoder is not written: transformers' ChameleonVQVAE has none)" if decoder else ""))
    else:
        notes.append(f"no {IMAGE_TOKENIZER_DIR}/ in {src}: no VQGAN weights are written; transformers initialises "
                     "model.vqmodel at random and warns about its missing keys (the language model is complete)")
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / HF_WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    tokenizer = src / TEXT_TOKENIZER_DIR / SOURCE_TOKENIZER_FILES[0]
    if tokenizer.is_file():  # its ids are the written model's (Chameleon's, or mixmodal's kept as they are)
        shutil.copyfile(tokenizer, out / SOURCE_TOKENIZER_FILES[0])
        notes.append(f"the text tokenizer {tokenizer} went to {out / SOURCE_TOKENIZER_FILES[0]}")
    return hf_config, notes


_TAMING_PATHS = [  # mixmodal trunk name -> taming name (the inverse of chameleon_vqgan._rename, encoder side)
    (r"^encoder\.conv_norm_out\.", "encoder.norm_out."),
    (r"^encoder\.mid_block\.resnets\.(\d+)\.", lambda m: f"encoder.mid.block_{int(m[1]) + 1}."),
    (r"^encoder\.mid_block\.attentions\.0\.", "encoder.mid.attn_1."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.", r"encoder.down.\1.attn.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
]
_TAMING_LEAVES = [(r"\.conv_shortcut\.", ".nin_shortcut."), (r"\.group_norm\.", ".norm."), (r"\.to_q\.", ".q."),
                  (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."), (r"\.to_out\.0\.", ".proj_out.")]


def _vqgan_to_hf(folder: Path, num_image_codes: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A mixmodal VQ tokenizer directory -> (a ChameleonVQVAEConfig dict, its encoder tensors under
    taming's names). Only what transformers' ChameleonVQVAE can run is accepted: a Euclidean
    codebook and 32-group norms, as `convert chameleon-vqgan` writes them."""
    tokenizer = load_image_tokenizer(folder)
    c = tokenizer.config
    if tokenizer.kind != "vq" or c.codebook != "euclidean" or c.norm_groups != TAMING_NORM_GROUPS:
        raise ConversionError(f"{folder}: transformers' ChameleonVQVAE runs a VQ tokenizer with codebook=euclidean "
                              f"and norm_groups={TAMING_NORM_GROUPS} only (this one: kind={tokenizer.kind}, "
                              f"codebook={getattr(c, 'codebook', None)}, norm_groups={c.norm_groups}); move it aside "
                              "to write the language model alone")
    if c.codebook_size != num_image_codes:
        raise ConversionError(f"{folder}: codebook_size={c.codebook_size} but the model has {num_image_codes} image codes")
    state = {}
    for name, tensor in tokenizer.state_dict().items():
        if name.startswith("decoder.") or name == "quantize.steps_since_used":
            continue  # transformers has no decoder; the dead-code counter is ours
        new = name
        for pattern, replacement in _TAMING_PATHS + _TAMING_LEAVES:
            new = re.sub(pattern, replacement, new)
        if re.search(r"\.(q|k|v|proj_out)\.weight$", new) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # taming's attention uses 1x1 convs
        state[new] = tensor.contiguous()
    back = taming_to_mixmodal(state, len(c.channel_multipliers))  # self-check: the forward mapping undoes this one
    expected = {k for k in tokenizer.state_dict() if not k.startswith("decoder.") and k != "quantize.steps_since_used"}
    if set(back) != expected:
        raise ConversionError(f"{folder}: internal error: the VQGAN names do not round-trip "
                              f"({sorted(set(back) ^ expected)[:5]})")
    vq_config = {"embed_dim": c.codebook_dim, "num_embeddings": c.codebook_size, "latent_channels": c.latent_channels,
                 "resolution": c.resolution, "in_channels": 3, "base_channels": c.base_channels,
                 "channel_multiplier": list(c.channel_multipliers), "num_res_blocks": c.num_res_blocks,
                 "attn_resolutions": list(c.attention_resolutions), "dropout": 0.0, "double_latent": False,
                 "attn_type": "vanilla" if c.attention else "none", "model_type": "chameleon_vqgan"}
    return vq_config, state


__all__ = ["convert_to_hf_chameleon", "hf_config_from_model_config", "mixmodal_state_to_hf"]
