"""VQ image tokenizer: images <-> grids of discrete codes (CM3Leon / Chameleon image tokens).

    images (B, 3, R, R) -> Encoder -> quant_conv -> quantize -> codes (B, h, w), h = R / f
    codes -> embedding -> post_quant_conv -> Decoder -> images (B, 3, R, R)

Three codebooks (`VQConfig.codebook`):

- "l2": codes and encoder outputs are l2-normalised and matched by cosine similarity
  (ViT-VQGAN's improved VQ). With a low `codebook_dim` (factorised codes) this keeps
  usage high without tricks; the loss terms are on the unit sphere.
- "ema": Euclidean lookup; the codebook is not trained by gradient but moves to the
  exponential moving average of the encoder outputs assigned to each code (VQ-VAE-2),
  so the codebook loss is 0 and only the commitment term remains.
- "euclidean": the plain nearest-neighbour codebook trained by the codebook loss
  (taming-transformers, Chameleon); converted Chameleon weights use it.

All three restart dead codes while training: a code unused for `restart_after`
consecutive training steps is re-initialised from a random encoder output of the
current batch. (Under data parallelism the restart must be made identical on every
rank; the trainer owns that.)

Submodule names (`encoder`, `quant_conv`, `quantize.embedding`, `post_quant_conv`,
`decoder`) follow taming / transformers' ChameleonVQVAE, with diffusers' names inside
the trunk (see trunk.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mixmodal.tokenizers.pixels import check_images
from mixmodal.tokenizers.trunk import Decoder, Encoder, TrunkConfig, TrunkTokenizer

EMA_EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes


@dataclass
class VQConfig(TrunkConfig):
    """A VQ tokenizer: the trunk plus the codebook."""

    latent_channels: int = 64  # encoder output channels, before quant_conv (taming's z_channels)
    codebook_size: int = 1024  # number of codes
    codebook_dim: int = 32  # width of a code (quant_conv maps latent_channels -> codebook_dim)
    codebook: Literal["l2", "ema", "euclidean"] = "l2"
    beta: float = 0.25  # weight of the commitment loss
    ema_decay: float = 0.99  # codebook "ema" only
    restart_after: int = 100  # re-initialise codes unused for this many training steps (0: never)
    encoder_only: bool = False  # no decoder weights (transformers' ChameleonVQVAE ships only the encoder)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("latent_channels", "codebook_size", "codebook_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook not in ("l2", "ema", "euclidean"):
            raise ValueError(f"codebook must be 'l2', 'ema' or 'euclidean', got {self.codebook!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if self.restart_after < 0:
            raise ValueError(f"restart_after must be >= 0 (0 disables dead-code restart), got {self.restart_after}")


@dataclass
class VQOutput:
    reconstruction: torch.Tensor  # (B, 3, R, R), unclamped decoder output
    losses: dict[str, torch.Tensor]  # "codebook", "commitment" (already beta-weighted); scalars
    codes: torch.Tensor  # (B, h, w) long
    stats: dict[str, float]  # "perplexity", "usage" of this batch


def codebook_stats(codes: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Perplexity (exp of the entropy of code frequencies) and usage (fraction of codes seen).

    Accumulate over an eval set by concatenating its codes, or by summing `torch.bincount`s
    and calling `stats_from_counts`.
    """
    return stats_from_counts(torch.bincount(codes.flatten(), minlength=num_codes))


def stats_from_counts(counts: torch.Tensor) -> dict[str, float]:
    total = counts.sum().clamp(min=1)
    p = counts.float() / total
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return {"perplexity": float(torch.exp(entropy)), "usage": float((counts > 0).float().mean())}


class VectorQuantizer(nn.Module):
    """(B, D, h, w) continuous -> nearest code: quantised (B, D, h, w) with straight-through gradient, codes (B, h, w)."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        K, D = config.codebook_size, config.codebook_dim
        self.embedding = nn.Embedding(K, D)
        nn.init.uniform_(self.embedding.weight, -1.0 / K, 1.0 / K)  # taming's init
        if config.codebook == "ema":
            self.embedding.weight.requires_grad_(False)
            # Start as if every code had been seen once at its initial position, so unused
            # codes stay where they are instead of being divided by a near-zero cluster size.
            self.register_buffer("ema_cluster_size", torch.ones(K))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        self.register_buffer("steps_since_used", torch.zeros(K, dtype=torch.long))

    def codebook_vectors(self) -> torch.Tensor:  # (K, D), in the space codes are matched in
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.config.codebook == "l2" else weight

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, D, h, w)
        return F.embedding(codes, self.codebook_vectors()).permute(0, 3, 1, 2)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N,)
        codebook = self.codebook_vectors()
        if self.config.codebook == "l2":
            return torch.argmax(z @ codebook.t(), dim=1)  # z and codes are unit vectors: max cosine
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, the same expansion as taming/Chameleon, so ties break alike
        distances = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.t()
        return torch.argmin(distances, dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D), N = B*h*w
        if self.config.codebook == "l2":
            flat = F.normalize(flat, dim=1)
        codes = self.nearest(flat.detach())  # (N,)
        quantized = F.embedding(codes, self.codebook_vectors())  # (N, D)
        if self.training:
            self._update(flat.detach(), codes)
        commitment = self.config.beta * F.mse_loss(flat, quantized.detach())
        if self.config.codebook == "ema":
            codebook_loss = torch.zeros((), device=z.device, dtype=commitment.dtype)
        else:
            codebook_loss = F.mse_loss(quantized, flat.detach())
        quantized = flat + (quantized - flat).detach()  # straight-through: forward = code, backward = identity
        quantized = quantized.reshape(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return quantized, codes.reshape(B, h, w), {"codebook": codebook_loss, "commitment": commitment}

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """One training step of codebook bookkeeping: EMA update, dead-code counters and restarts."""
        K = self.config.codebook_size
        counts = torch.bincount(codes, minlength=K)
        if self.config.codebook == "ema":
            decay = self.config.ema_decay
            self.ema_cluster_size.mul_(decay).add_(counts.to(self.ema_cluster_size.dtype), alpha=1 - decay)
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, codes, flat.to(self.ema_embed_sum.dtype))
            self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            n = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + EMA_EPS) / (n + K * EMA_EPS) * n
            # `.data`: the weight may be saved for this step's backward; rows are replaced, not differentiated
            self.embedding.weight.data.copy_(self.ema_embed_sum / smoothed[:, None])
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        if self.config.restart_after:
            dead = (self.steps_since_used >= self.config.restart_after).nonzero().squeeze(1)
            if dead.numel():
                self._restart(dead, flat)

    def _restart(self, dead: torch.Tensor, flat: torch.Tensor) -> None:
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = flat[pick].to(self.embedding.weight.dtype)  # (num_dead, D), already normalised in "l2" mode
        self.embedding.weight.data[dead] = fresh  # dead rows get no gradient this step
        if self.config.codebook == "ema":
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = fresh
        self.steps_since_used[dead] = 0


def check_codes(codes: torch.Tensor, num_codes: int) -> None:
    """Raise ValueError unless `codes` is an integer (B, h, w) tensor of codes in [0, num_codes)."""
    if codes.ndim != 3 or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor (B, h, w); got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(f"codes must lie in [0, {num_codes}); got [{int(codes.min())}, {int(codes.max())}]")


class VQTokenizer(TrunkTokenizer):
    """Images (B, 3, R, R) in [-1, 1] <-> codes (B, R/f, R/f) in [0, codebook_size)."""

    kind = "vq"  # the `kind:` written into config.yaml
    discrete = True  # codes (tokens mode) or continuous latents (latents mode)

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, out_channels=config.latent_channels)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.codebook_dim, 1)
        self.quantize = VectorQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.latent_channels, 1)
        self.decoder = None if config.encoder_only else Decoder(config, in_channels=config.latent_channels)

    @property
    def num_codes(self) -> int:
        return self.config.codebook_size

    @torch.no_grad()
    def code_vectors(self, view: str = "tokenizer") -> torch.Tensor:
        """(K, codebook_dim): each code's vector, in the space codes are matched in (a model's
        image.code_embedding=codebook reads these)."""
        if view != "tokenizer":
            raise ValueError(f"image.code_vectors={view} needs a k-means tokenizer (its codes are pixel patches); "
                             "a VQ's codes are its codebook vectors: use image.code_vectors=tokenizer")
        return self.quantize.codebook_vectors().detach().float().clone()

    def encode_latents(self, images: torch.Tensor, *, any_size: bool = False) -> torch.Tensor:
        """Continuous encoder output before quantisation: (B, codebook_dim, h, w)."""
        check_images(images, self.config.resolution, self.downsampling_factor, any_size=any_size)
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor, *, any_size: bool = False) -> torch.Tensor:
        """(B, 3, R, R) float in [-1, 1] -> codes (B, h, w) long."""
        z = self.encode_latents(images, any_size=any_size)  # (B, D, h, w)
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        if self.config.codebook == "l2":
            flat = F.normalize(flat, dim=1)
        return self.quantize.nearest(flat).reshape(B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, h*f, w*f), unclamped (clamp to [-1, 1] to display)."""
        check_codes(codes, self.num_codes)
        return self.decode_latents(self.quantize.lookup(codes.long()))

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantised vectors (B, codebook_dim, h, w) -> images (B, 3, h*f, w*f)."""
        if self.decoder is None:
            raise ValueError("this VQ tokenizer is encoder-only (encoder_only: true; transformers' ChameleonVQVAE has no "
                             "decoder weights): it can encode but not decode; convert Meta's taming-layout vqgan.ckpt "
                             "with `mixmodal convert chameleon-vqgan vqgan.ckpt OUT` to decode")
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, images: torch.Tensor) -> VQOutput:
        z = self.encode_latents(images)
        quantized, codes, losses = self.quantize(z)
        reconstruction = self.decode_latents(quantized)
        return VQOutput(reconstruction, losses, codes, codebook_stats(codes, self.num_codes))

