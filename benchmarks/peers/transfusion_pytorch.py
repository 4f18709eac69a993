"""Peer for the one-image sampling benchmark: lucidrains' `transfusion-pytorch` (pinned 0.20.0).

    pip install transfusion-pytorch==0.20.0   # pulls einx, einops, beartype, jaxtyping, torchdiffeq,
                                              # ema-pytorch, rotary-embedding-torch, loguru, ...; keeps torch

The peer is built at the benchmark's size and driven through its own sampling entry points
(`Transfusion.sample_many` by default, `Transfusion.sample_one` with `use_kv_cache=False`); nothing
here reimplements its sampler. Only the configuration is chosen to match ours:

* p x p patches: the peer's flow runs on whatever the modality tensor is, one sequence position per
  entry of its axial shape. A parameter-free `modality_encoder` patchifies a [C, h, w] latent into a
  (h/p, w/p, C p p) grid and `modality_decoder` undoes it, so the peer's own `latent_to_model`
  (Linear(C p p, dim)) and `model_to_latent` (Linear(dim, C p p, bias=False)) are the linear patch
  in/out and an image takes (h/p)(w/p) positions. The flow itself lives in the patchified space,
  which is a reshape of the latent space.
* steps: the peer integrates its flow ODE with torchdiffeq `odeint` over
  `torch.linspace(0, 1, modality_steps)`; its default solver is `midpoint` (two transformer
  evaluations per interval). We build it with `method='euler'` and pass `modality_steps=steps + 1`,
  so `steps` sampler steps are exactly `steps` transformer evaluations.
* no classifier-free guidance (`cfg_scale=1.`; the peer's default 3. would double every step).
* the image starts right after the prompt: `force_modality_at_start=(0, (h/p, w/p))` appends the
  peer's [meta] "h',w'" [som] tokens to the prompt, and `max_length=0` ends sampling after that one
  image (otherwise the peer goes on decoding text, and maybe more images, until [eos]).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import transfusion_pytorch.transfusion as _tf
from transfusion_pytorch import Transfusion

__all__ = ["build_peer", "peer_parameter_count", "peer_parameter_breakdown", "sample_one_image", "describe_peer"]

# the peer draws a tqdm bar and logs through loguru on every sample call; silence both (display only)
_tf.tqdm = functools.partial(_tf.tqdm, disable=True)
_tf.logger.disable("transfusion_pytorch")


class Patchify(nn.Module):
    """[B, C, h, w] -> [B, h/p, w/p, C*p*p] (channel-last, the peer's default latent layout)."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.p
        x = x.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)


class Unpatchify(nn.Module):
    """[B, h/p, w/p, C*p*p] -> [B, C, h, w]."""

    def __init__(self, p: int, channels: int) -> None:
        super().__init__()
        self.p = p
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, hp, wp, _ = x.shape
        p, c = self.p, self.channels
        x = x.reshape(b, hp, wp, c, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, hp * p, wp * p)


def build_peer(*, dim: int, depth: int, heads: int, text_vocab: int, latent_channels: int, latent_size: int,
               patch_size: int, seed: int = 0, ff_hidden: int | None = None, ode_method: str = "euler",
               device: str | torch.device = "cpu") -> nn.Module:
    """A `transfusion_pytorch.Transfusion` in eval mode, float32.

    `ff_hidden`: the GEGLU inner width; None keeps the peer's default (expansion 4 -> int(dim * 8 / 3),
    682 at dim 256), 704 matches our SwiGLU 704. `ode_method`: the torchdiffeq solver (the peer's own
    default is 'midpoint', two evaluations per step; 'euler' makes steps == transformer evaluations).
    """
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    if latent_size % patch_size:
        raise ValueError(f"latent_size {latent_size} is not divisible by patch_size {patch_size}")

    ff_expansion = 4.0
    if ff_hidden is not None:
        ff_expansion = ff_hidden * 3 / (2 * dim)  # the peer's FeedForward: int(dim * expansion * 2 / 3)
        if int(dim * ff_expansion * 2 / 3) != ff_hidden:
            raise ValueError(f"ff_hidden {ff_hidden} is not reachable through the peer's expansion factor at dim {dim}")

    grid = latent_size // patch_size
    torch.manual_seed(seed)
    model = Transfusion(
        num_text_tokens=text_vocab,
        dim_latent=latent_channels * patch_size * patch_size,
        modality_default_shape=(grid, grid),
        modality_encoder=Patchify(patch_size),
        modality_decoder=Unpatchify(patch_size, latent_channels),
        odeint_kwargs=dict(method=ode_method, atol=1e-5, rtol=1e-5),
        transformer=dict(
            dim=dim,
            depth=depth,
            heads=heads,
            dim_head=dim // heads,
            ff_expansion_factor=ff_expansion,
        ),
    )
    model._bench_meta = dict(latent_channels=latent_channels, latent_size=latent_size, patch_size=patch_size,
                             grid=grid, text_vocab=text_vocab)
    return model.to(device=device, dtype=torch.float32).eval()


def peer_parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameter counts by part, summing to `peer_parameter_count` (every nn.Parameter of the
    `Transfusion` module, including the rotary frequencies, which the peer keeps as a frozen
    nn.Parameter; buffers such as the RandomFourierEmbed frequencies are not counted). `layers:` entries
    sum over all layers."""

    def count(params) -> int:
        return sum(p.numel() for p in params)

    tr = model.transformer
    out: dict[str, int] = {}
    out["text_embed"] = count(model.text_embed.parameters())
    out["to_text_logits"] = count(model.to_text_logits.parameters())
    out["patch_in (latent_to_model)"] = count(model.latent_to_model_projs.parameters())
    out["patch_out (model_to_latent)"] = count(model.model_to_latent_projs.parameters())
    out["axial pos emb mlp"] = count(p for m in model.pos_emb_mlp if m is not None for p in m.parameters())
    out["time cond mlp (to_time_cond)"] = count(tr.to_time_cond.parameters())
    out["final norm"] = count(tr.norm.parameters())
    out["rotary freqs (frozen nn.Parameter)"] = count(model.rotary_emb.parameters())
    parts = {"attn qkv/out/gates/qk-norm": 0, "ffn (GEGLU)": 0, "adaLN (film + ada-ln-zero, attn+ffn)": 0,
             "pre-norm gamma + layerscale": 0, "unet skip proj": 0, "attention residual": 0}
    for skip_proj, attn, ff, attn_res in tr.layers:
        parts["attn qkv/out/gates/qk-norm"] += count(attn.fn.parameters())
        parts["ffn (GEGLU)"] += count(ff.fn.parameters())
        for w in (attn, ff):
            parts["adaLN (film + ada-ln-zero, attn+ffn)"] += count(w.to_film.parameters()) + count(w.to_ada_ln_zero.parameters())
            parts["pre-norm gamma + layerscale"] += w.layernorm_gamma.numel() + w.layerscale.numel()
        if skip_proj is not None:
            parts["unet skip proj"] += count(skip_proj.parameters())
        parts["attention residual"] += count(attn_res.parameters())
    out.update({f"layers: {k}": v for k, v in parts.items()})
    total = count(model.parameters())
    assert sum(out.values()) == total, (sum(out.values()), total)
    out["total"] = total
    return out


def peer_parameter_count(model: nn.Module) -> int:
    """All parameters of the peer: text embedding (num_text_tokens + 3 special + 2 [som]/[eom] + 129
    meta-character rows) and untied text head, the transformer (attention, GEGLU ffn, the per-sublayer
    adaLN/ada-ln-zero conditioning, time MLP, U-Net skip projections, attention residuals, norms) and the
    linear patch in/out. The patchify/unpatchify wrappers have no parameters. See
    `peer_parameter_breakdown` for the split."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def sample_one_image(model: nn.Module, *, prompt_ids: torch.Tensor, steps: int, use_kv_cache: bool = True,
                     seed: int | None = None) -> torch.Tensor:
    """One image's latents [C, h, w] from the peer's own sampler, conditioned on `prompt_ids` (1-D).

    use_kv_cache=True  -> `model.sample_many([prompt])`: one prefill forward over [sos] prompt [meta]
                          "h',w'" [som] builds a KV cache; each step runs only the image's positions.
    use_kv_cache=False -> `model.sample_one(prompt)`: each step re-runs the whole sequence (prefix +
                          image) through the transformer (the peer's `cache_kv` flag does not help here:
                          with the image forced right after the prompt its cache is still empty).
    """
    if prompt_ids.ndim != 1 or prompt_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("prompt_ids must be a 1-D integer tensor")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    meta = model._bench_meta
    grid = meta["grid"]
    if seed is not None:
        torch.manual_seed(seed)
    prompt = prompt_ids.to(device=model.device, dtype=torch.long)
    kwargs = dict(
        max_length=0,  # stop after the forced image instead of decoding text until [eos]
        force_modality_at_start=(0, (grid, grid)),
        modality_steps=steps + 1,  # odeint grid linspace(0, 1, steps + 1): `steps` intervals
        cfg_scale=1.0,
        return_without_prompt=True,
    )
    if use_kv_cache:
        (sample,) = model.sample_many([prompt], **kwargs)
    else:
        sample = model.sample_one(prompt, **kwargs)
    images = [item for item in sample if not torch.is_tensor(item)]
    if len(images) != 1:
        raise RuntimeError(f"expected exactly one generated image, got {len(images)}")
    latents = images[0].tensor  # ModalityItem, already through the modality decoder (unpatchify)
    c, s = meta["latent_channels"], meta["latent_size"]
    if tuple(latents.shape) != (c, s, s):
        raise RuntimeError(f"unexpected peer output shape {tuple(latents.shape)}, wanted {(c, s, s)}")
    return latents


def describe_peer() -> str:
    return (
        "transfusion-pytorch 0.20.0 (lucidrains), driven through its own `Transfusion.sample_many` (default) "
        "or `Transfusion.sample_one`: the prompt is [sos] + text ids + [meta] \"h',w'\" [som] "
        "(`force_modality_at_start=(0, shape)`), the image is integrated with torchdiffeq `odeint` over "
        "`linspace(0, 1, steps + 1)` with the Euler solver (we override the peer's default midpoint solver, "
        "which costs two transformer evaluations per step) and no classifier-free guidance (`cfg_scale=1`, "
        "the default 3 would add a second, unconditional forward per step). In `sample_many` the peer runs one "
        "prefill forward over the prefix to build a KV cache, then every step feeds only the image's "
        "(h/p)(w/p) patch tokens (fresh Linear patch-in of the current latents, per-token time MLP and "
        "adaLN/ada-ln-zero on every sublayer) through all layers, attending to the cached prefix keys/values "
        "plus the image's own (bidirectional); the prefix is not recomputed. In `sample_one` with the image "
        "forced right after the prompt its KV cache is still empty, so every step re-runs the full "
        "sequence (prefix + image) through the peer's generic `forward` (batch re-assembly, mask building, "
        "rotary positions) and recomputes the prefix each time. All image tokens share one rotary position "
        "and, as configured (`add_pos_emb=False`, the peer's default), carry no 2-D position signal; "
        "patchify/unpatchify are parameter-free reshapes around the peer's own linear projections."
    )
