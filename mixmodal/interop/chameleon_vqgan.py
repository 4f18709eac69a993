"""Chameleon's image tokenizer (a taming-transformers VQGAN) -> mixmodal VQ tokenizer directory.

Two sources, one tensor mapping (both use taming's names):

- transformers' `ChameleonVQVAE`: a folder with config.json (a ChameleonVQVAEConfig, or
  a full Chameleon config whose `vq_config` holds it) and model.safetensors (or a sharded
  index; `model.vqmodel.` prefixes are stripped). transformers ships only the encoder, so
  the result is `encoder_only` and can encode but not decode.
- Meta's `vqgan.ckpt`: a PyTorch Lightning checkpoint of taming's `VQModel` with its
  `vqgan.yaml`. Read with `torch.load(weights_only=True)`, PyTorch's restricted
  unpickler, so the file cannot run code; `loss.*` (discriminator, LPIPS) is dropped.

taming's quantiser is a plain nearest-neighbour codebook, so the result uses
`codebook: euclidean`; taming fixes GroupNorm at 32 groups. The tests prove the mapping:
codes equal to transformers' on random images, and codes equal / images within 1e-5 of a
plain functional taming forward written independently in the test.

Attaching the decoder to a converted Chameleon (`convert hf-chameleon` keeps transformers'
encoder-only VQGAN in MODEL/image_tokenizer/): convert Meta's vqgan.ckpt into that folder,
`mixmodal convert chameleon-vqgan vqgan.ckpt MODEL/image_tokenizer`, or pass it at conversion,
`mixmodal convert hf-chameleon SRC OUT --vqgan vqgan.ckpt`. Either way the checkpoint's encoder
must be the model's (the VQGAN the language model was trained on): the tensors are compared
and a different VQGAN is refused, naming the first tensor that differs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import yaml

from mixmodal.interop.common import ConversionError, finish_conversion, read_safetensors
from mixmodal.model.io import CONFIG_FILE, ModelDirError, read_model_config
from mixmodal.tokenizers.image import load_image_tokenizer
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer
from mixmodal.weights import refresh_manifest

TAMING_NORM_GROUPS = 32  # taming's Normalize() and transformers' Chameleon blocks hard-code 32 groups
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_IGNORED_PREFIXES = ("loss.",)  # taming's training-only discriminator and perceptual loss


# --- configs ------------------------------------------------------------------------------

def vq_config_from_transformers(config: dict, origin: str, encoder_only: bool) -> VQConfig:
    """A ChameleonVQVAEConfig dict -> VQConfig."""
    config = config.get("vq_config", config)  # a full Chameleon config nests it
    if config.get("double_latent", False):
        raise ConversionError(f"{origin}: double_latent=true has no meaning for a VQ tokenizer")
    return _vq_config(origin, encoder_only,
                      resolution=config.get("resolution", 512), base_channels=config.get("base_channels", 128),
                      channel_multipliers=config.get("channel_multiplier", [1, 1, 2, 2, 4]),
                      num_res_blocks=config.get("num_res_blocks", 2), attn_resolutions=config.get("attn_resolutions") or [],
                      attention=config.get("attn_type", "vanilla") == "vanilla", in_channels=config.get("in_channels", 3),
                      latent_channels=config.get("latent_channels", 256), codebook_dim=config.get("embed_dim", 256),
                      codebook_size=config.get("num_embeddings", 8192))


def vq_config_from_taming(config: dict, origin: str) -> VQConfig:
    """A taming vqgan.yaml (model.params.{embed_dim, n_embed, ddconfig}) -> VQConfig."""
    params = config.get("model", {}).get("params", config)
    dd = params.get("ddconfig")
    if not isinstance(dd, dict) or "embed_dim" not in params or "n_embed" not in params:
        raise ConversionError(f"{origin}: expected a taming VQModel config with model.params.ddconfig, "
                              "model.params.embed_dim and model.params.n_embed")
    if dd.get("double_z", False):
        raise ConversionError(f"{origin}: ddconfig.double_z=true has no meaning for a VQ tokenizer")
    if dd.get("out_ch", 3) != 3:
        raise ConversionError(f"{origin}: ddconfig.out_ch={dd['out_ch']}; mixmodal's trunk writes RGB (3)")
    return _vq_config(origin, False, resolution=dd["resolution"], base_channels=dd["ch"], channel_multipliers=dd["ch_mult"],
                      num_res_blocks=dd["num_res_blocks"], attn_resolutions=dd.get("attn_resolutions") or [],
                      attention=dd.get("attn_type", "vanilla") == "vanilla", in_channels=dd.get("in_channels", 3),
                      latent_channels=dd["z_channels"], codebook_dim=params["embed_dim"], codebook_size=params["n_embed"])


def _vq_config(origin: str, encoder_only: bool, *, in_channels: int, attn_resolutions, **fields) -> VQConfig:
    if in_channels != 3:
        raise ConversionError(f"{origin}: in_channels={in_channels}; mixmodal's trunk reads RGB (3)")
    try:
        return VQConfig(**fields, attention_resolutions=list(attn_resolutions), norm_groups=TAMING_NORM_GROUPS,
                        codebook="euclidean", encoder_only=encoder_only, restart_after=0)
    except ValueError as e:
        raise ConversionError(f"{origin}: {e}") from None


# --- tensors ------------------------------------------------------------------------------

def taming_to_mixmodal(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename a taming VQModel state dict (encoder, decoder, quantize, quant convs) to mixmodal's;
    unknown names raise, naming them. taming's decoder `up` list is indexed by resolution
    level (up.0 = full resolution), ours by order of use (up_blocks.0 = lowest resolution)."""
    out, unknown = {}, []
    for name, tensor in state.items():
        if name.startswith(_IGNORED_PREFIXES):
            continue
        new = _rename(name, num_levels)
        if new is None:
            unknown.append(name)
            continue
        if tensor.ndim == 4 and re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", new):
            tensor = tensor[:, :, 0, 0]  # taming's attention uses 1x1 convs; ours uses linears
        out[new] = tensor
    if unknown:
        raise ConversionError(f"tensors with no mixmodal counterpart ({len(unknown)}): {', '.join(unknown[:12])}"
                              + (" ..." if len(unknown) > 12 else ""))
    return out


def _rename(name: str, num_levels: int) -> str | None:
    if name in ("quantize.embedding.weight", "quant_conv.weight", "quant_conv.bias",
                "post_quant_conv.weight", "post_quant_conv.bias"):
        return name
    m = re.fullmatch(r"(encoder|decoder)\.(.+)\.(weight|bias)", name)
    if not m:
        return None
    part, path, leaf = m.groups()
    simple = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
    if path in simple:
        return f"{part}.{simple[path]}.{leaf}"
    if m2 := re.fullmatch(r"mid\.block_([12])\.(\w+)", path):
        sub = _RESNET.get(m2.group(2))
        return sub and f"{part}.mid_block.resnets.{int(m2.group(1)) - 1}.{sub}.{leaf}"
    if m2 := re.fullmatch(r"mid\.attn_1\.(\w+)", path):
        sub = _ATTENTION.get(m2.group(1))
        return sub and f"{part}.mid_block.attentions.0.{sub}.{leaf}"
    if m2 := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", path):
        kind, level, what, j, sub = m2.groups()
        sub = (_RESNET if what == "block" else _ATTENTION).get(sub)
        group = "resnets" if what == "block" else "attentions"
        return sub and f"{part}.{_level(part, kind, int(level), num_levels)}.{group}.{j}.{sub}.{leaf}"
    if m2 := re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv", path):
        kind, level, what = m2.groups()
        return f"{part}.{_level(part, kind, int(level), num_levels)}.{what}rs.0.conv.{leaf}"
    return None


def _level(part: str, kind: str, level: int, num_levels: int) -> str:
    if part == "encoder" and kind == "down":
        return f"down_blocks.{level}"
    if part == "decoder" and kind == "up":
        return f"up_blocks.{num_levels - 1 - level}"
    return f"{kind}_misplaced.{level}"  # e.g. encoder.up: left for check_state_dict to report as unexpected


# --- reading ------------------------------------------------------------------------------

def load_lightning_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a (Lightning) checkpoint, via PyTorch's restricted unpickler."""
    import pathlib

    # Lightning sometimes pickles path objects (checkpoint dirpaths); rebuilding one runs no code.
    safe = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    try:
        with torch.serialization.safe_globals(safe):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends; torch's own message is long and suggests weights_only=False
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = f"it pickles {found.group(1)}" if found else str(e).splitlines()[0]
        raise ConversionError(
            f"{path}: torch.load(weights_only=True) refused this checkpoint ({why}), so nothing in it was run or read. "
            "It holds Python objects beyond tensors (e.g. training hyper-parameters). If you trust the file, extract "
            "the weights once: python -c \"import torch; c = torch.load('vqgan.ckpt', weights_only=False); "
            "torch.save({'state_dict': c['state_dict']}, 'vqgan-weights.ckpt')\" and convert that."
        ) from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a checkpoint with a `state_dict` of tensors (taming VQModel)")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _read_transformers(src: Path, config_path: Path | None) -> tuple[dict, dict, str]:
    if src.is_dir():
        config_path = config_path or src / "config.json"
        index = src / "model.safetensors.index.json"
        if index.is_file():  # a full Chameleon checkpoint: read only the shards holding the VQ model
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({f for k, f in weight_map.items() if "vqmodel." in k})
            state = {k: v for f in shards for k, v in read_safetensors(src / f).items()}
        elif (src / "model.safetensors").is_file():
            state = read_safetensors(src / "model.safetensors")
        else:
            raise ConversionError(f"{src}: no model.safetensors or model.safetensors.index.json")
    else:
        config_path = config_path or src.with_name("config.json")
        state = read_safetensors(src)
    if not config_path.is_file():
        raise ConversionError(f"{config_path} not found: a ChameleonVQVAE needs its config.json (pass --config)")
    prefix = next((p for p in ("model.vqmodel.", "vqmodel.") if any(k.startswith(p) for k in state)), "")
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return json.loads(config_path.read_text(encoding="utf-8")), state, str(config_path)


TAMING_CHECKPOINT = "vqgan.ckpt"  # Meta's release (and Anole's) names it so, beside vqgan.yaml


def is_taming_checkpoint(src: Path) -> bool:
    """A taming checkpoint file, or a folder holding vqgan.ckpt (Meta's / Anole's tokenizer/)."""
    return (src.is_file() and src.suffix in (".ckpt", ".pt", ".pth")) or (src.is_dir() and (src / TAMING_CHECKPOINT).is_file()
                                                                          and not (src / "config.json").is_file())


def read_taming_vqgan(src: str | os.PathLike, config: str | os.PathLike | None = None
                      ) -> tuple[VQConfig, dict[str, torch.Tensor], Path]:
    """Meta's taming VQGAN: (its VQConfig, its state dict under taming's names in float32, the .ckpt path).
    `src` is the .ckpt or a folder holding vqgan.ckpt; the config is `config`, else vqgan.yaml
    (or the .ckpt's name with .yaml) beside it."""
    src = Path(src)
    if src.is_dir():
        src = src / TAMING_CHECKPOINT
    if not src.is_file():
        raise ConversionError(f"{src} does not exist: pass Meta's {TAMING_CHECKPOINT} (Chameleon's tokenizer/ folder, "
                              "also shipped in Anole's) or the folder holding it")
    config_path = Path(config) if config else None
    if config_path is None:
        candidates = [src.with_suffix(".yaml"), src.with_name("vqgan.yaml")]
        config_path = next((c for c in candidates if c.is_file()), None)
        if config_path is None:
            raise ConversionError(f"no taming config next to {src} (looked for {', '.join(c.name for c in candidates)}); "
                                  "pass --config vqgan.yaml")
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConversionError(f"{config_path}: cannot read the taming config: {e}") from None
    return vq_config_from_taming(raw, str(config_path)), load_lightning_state_dict(src), src


def convert_chameleon_vqgan(src: str | os.PathLike, out: str | os.PathLike,
                            config: str | os.PathLike | None = None) -> tuple[VQTokenizer, list[str]]:
    """Convert a ChameleonVQVAE folder / .safetensors or a taming vqgan.ckpt (or a folder holding
    one) into a tokenizer directory `out`. When `out` is a converted Chameleon's image_tokenizer/
    (its parent holds vocab_map.json), the new VQGAN must fit the model: same codebook size and
    grid, and the encoder of the tokenizer already there (compare_encoders).

    Returns the loaded tokenizer and notes for the user.
    """
    src = Path(src)
    config_path = Path(config) if config else None
    if not src.exists():
        raise ConversionError(f"{src} does not exist: pass a ChameleonVQVAE folder, a .safetensors or a taming vqgan.ckpt")
    notes = []
    if is_taming_checkpoint(src):
        vq_config, state, src = read_taming_vqgan(src, config_path)
    else:
        raw, state, origin = _read_transformers(src, config_path)
        encoder_only = not any(k.startswith("decoder.") for k in state)
        vq_config = vq_config_from_transformers(raw, origin, encoder_only)
        if encoder_only:
            notes.append("transformers' ChameleonVQVAE has no decoder: the tokenizer encodes only "
                         "(convert Meta's vqgan.ckpt to decode)")
    mapped = taming_to_mixmodal(state, len(vq_config.channel_multipliers))
    attach = _check_fits_model(vq_config, mapped, Path(out))
    notes += attach
    given = f"{src} --config {config_path}" if config_path else f"{src}"
    tokenizer = finish_conversion(VQTokenizer(vq_config), mapped, src, out,
                                  remake=f"re-run `mixmodal convert chameleon-vqgan {given} {out}`")
    if _is_converted_model(Path(out).parent):  # the model folder's manifest lists its image_tokenizer/ files
        refresh_manifest(Path(out).parent, Path(out).name)
    return tokenizer, notes


def _is_converted_model(folder: Path) -> bool:
    return (folder / "vocab_map.json").is_file() and (folder / CONFIG_FILE).is_file()


# --- attaching to a converted Chameleon ---------------------------------------------------

def first_difference(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], *,
                     reference_dtype: bool = True) -> str | None:
    """None when every tensor of `reference` is in `candidate` with the same values, else what differs.
    reference_dtype: compare after casting the candidate to the reference's dtype (transformers stores
    the VQGAN in the checkpoint's dtype, e.g. bf16, Meta's vqgan.ckpt in float32); otherwise equal
    after rounding both to bf16 or to fp16 (a folder converted from an unknown dtype)."""
    for name, ref in reference.items():
        if name not in candidate:
            return f"{name} is missing"
        new = candidate[name]
        if tuple(new.shape) != tuple(ref.shape):
            return f"{name} has shape {tuple(new.shape)}, not {tuple(ref.shape)}"
        if reference_dtype:
            same = torch.equal(new.to(ref.dtype), ref)
        else:
            same = torch.equal(new.float(), ref.float()) or any(
                torch.equal(new.to(d), ref.to(d)) for d in (torch.bfloat16, torch.float16))
        if not same:
            return f"{name} differs (max |difference| {float((new.float() - ref.float()).abs().max()):.3g})"
    return None


def _check_fits_model(vq_config: VQConfig, mapped: dict[str, torch.Tensor], out: Path) -> list[str]:
    """`out` is a converted Chameleon's image_tokenizer/: the VQGAN must be the model's."""
    model_dir = out.parent
    if not _is_converted_model(model_dir):
        return []
    try:
        image = read_model_config(model_dir).image
    except ModelDirError as e:
        raise ConversionError(str(e)) from None
    if (vq_config.codebook_size, vq_config.grid_size) != (image.num_codes, image.grid_size):
        raise ConversionError(f"this VQGAN has {vq_config.codebook_size} codes on a {vq_config.grid_size}x"
                              f"{vq_config.grid_size} grid but the model {model_dir} has {image.num_codes} image codes "
                              f"on a {image.grid_size}x{image.grid_size} grid ({model_dir / CONFIG_FILE}): it is not "
                              "the model's VQGAN")
    if not (out / "model.safetensors").is_file():
        return []
    try:
        present = load_image_tokenizer(out)
    except (ValueError, FileNotFoundError) as e:
        raise ConversionError(f"{out} holds an unreadable image tokenizer ({e}); remove it to write this one") from None
    reference = {k: v for k, v in present.state_dict().items()
                 if not k.startswith("decoder.") and k != "quantize.steps_since_used"}
    why = first_difference(reference, mapped, reference_dtype=False)
    if why is not None:
        raise ConversionError(f"this VQGAN's encoder is not the one in {out}, which the model {model_dir} encodes its "
                              f"images with: {why}. Pass the vqgan.ckpt released with these weights, or remove {out} "
                              "to replace the VQGAN anyway")
    had = "encoder and decoder" if present.decoder is not None else "encoder only"
    return [f"its encoder equals the one {out} held ({had}), which it replaces"]
