"""diffusers `AutoencoderKL` folder -> mixmodal VAE tokenizer directory.

The trunk uses diffusers' module names, so tensors copy across unchanged, apart from
checkpoints saved before diffusers renamed its attention (`query`/`key`/`value`/
`proj_attn`, sometimes stored as 1x1 conv kernels), which are renamed and squeezed here
the way diffusers itself does on load. tests/test_interop_diffusers_vae.py proves the
mapping: tiny random AutoencoderKLs of several shapes give the same latent means and
decoded images (max abs diff <= 1e-5, float32) before and after conversion.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mixmodal.interop.common import ConversionError, finish_conversion, read_safetensors
from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def vae_config_from_diffusers(config: dict, origin: str = "config.json") -> VAEConfig:
    """Map an AutoencoderKL config.json to VAEConfig; raise ConversionError naming what cannot be expressed."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConversionError(f"{origin}: _class_name is {config['_class_name']!r}; only AutoencoderKL converts")
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        other = sorted({t for t in config.get(key, [allowed]) if t != allowed})
        if other:
            raise ConversionError(f"{origin}: {key} contains {other}; only {allowed} blocks convert")
    for key, want in (("in_channels", 3), ("out_channels", 3), ("act_fn", "silu")):
        if config.get(key, want) != want:
            raise ConversionError(f"{origin}: {key}={config[key]!r}; mixmodal's trunk supports only {key}={want!r}")
    channels = list(config.get("block_out_channels", [64]))
    base = channels[0]
    if any(c % base for c in channels):
        raise ConversionError(
            f"{origin}: block_out_channels={channels} cannot be written as base_channels x integer multipliers "
            f"(every entry must be a multiple of the first, {base})"
        )
    size = config.get("sample_size", 256)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConversionError(f"{origin}: sample_size={list(size)} is not square; mixmodal tokenizers are square")
        size = size[0]
    return VAEConfig(
        resolution=int(size),
        base_channels=base,
        channel_multipliers=[c // base for c in channels],
        num_res_blocks=int(config.get("layers_per_block", 1)),
        attention=bool(config.get("mid_block_add_attention", True)),
        norm_groups=int(config.get("norm_num_groups", 32)),
        latent_channels=int(config.get("latent_channels", 4)),
        scaling_factor=float(config.get("scaling_factor") or 1.0),
        shift_factor=float(config.get("shift_factor") or 0.0),
        double_z=True,
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
    )


def rename_diffusers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring old attention names up to date; everything else already matches."""
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _OLD_ATTENTION:
            name = ".".join(parts[:-2] + [_OLD_ATTENTION[parts[-2]], parts[-1]])
            if tensor.ndim == 4:  # a 1x1 conv kernel (C, C, 1, 1) -> linear (C, C)
                tensor = tensor[:, :, 0, 0]
        out[name] = tensor
    return out


def convert_diffusers_vae(src: str | os.PathLike, out: str | os.PathLike) -> tuple[VAETokenizer, list[str]]:
    """Convert the AutoencoderKL folder `src` into a mixmodal tokenizer directory `out`.

    Returns the loaded tokenizer and notes about what was not carried over.
    """
    folder = Path(src)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path} not found: SRC must be a diffusers AutoencoderKL folder "
                              "(config.json + diffusion_pytorch_model.safetensors), e.g. the `vae/` folder of a pipeline")
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise ConversionError(f"{folder}: no {' or '.join(WEIGHT_FILES)} (.bin pickles are not read: "
                              "re-save with diffusers' save_pretrained(safe_serialization=True))")
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    config = vae_config_from_diffusers(raw, str(config_path))
    notes = []
    if raw.get("latents_mean") is not None or raw.get("latents_std") is not None:
        notes.append("per-channel latents_mean/latents_std are not carried over (mixmodal scales latents by one "
                     "scaling_factor/shift_factor); set them with fit_latent_scaling if needed")
    state = rename_diffusers_state(read_safetensors(weights))
    model = VAETokenizer(config)
    return finish_conversion(model, state, weights, out,
                             remake=f"re-run `mixmodal convert diffusers-vae {folder} {out}`"), notes
