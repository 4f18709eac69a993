"""The latent path's patch layers (image.mode = latents; model/fusion.py builds them): the diffusion time's
embedding, patchify / unpatchify, and how patches enter and leave the transformer (image.patchify: a linear
layer, Linear-GELU-Linear out, or U-Net down/up blocks with a skip, as Transfusion's)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # the config only: fusion.py imports this module
    from mixmodal.model.fusion import ImageConfig


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of diffusion time t in [0, 1] (scaled to 0..1000 as DDPM steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, features: int = 256) -> None:
        super().__init__()
        self.features = features
        self.linear_1 = nn.Linear(features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [N] -> [N, dim] (or [N, P] -> [N, P, dim])
        return self.linear_2(F.silu(self.linear_1(timestep_features(t, self.features).to(self.linear_1.weight.dtype))))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:  # [N, C, h, w] -> [N, (h/p)(w/p), C p p]
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, channels: int) -> torch.Tensor:  # inverse of patchify
    n, num, _ = x.shape
    g = math.isqrt(num)
    x = x.reshape(n, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, g * p, g * p)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between (DDPM U-Net)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class LinearPatchIn(nn.Module):
    def __init__(self, image: ImageConfig, dim: int) -> None:
        super().__init__()
        self.p = image.patch_size
        self.proj = nn.Linear(image.latent_channels * self.p ** 2, dim)

    def forward(self, latents: torch.Tensor, temb: torch.Tensor):  # -> [N, P, D], skip state
        return self.proj(patchify(latents, self.p)), None


class LinearPatchOut(nn.Module):
    def __init__(self, image: ImageConfig, dim: int, hidden: bool = False) -> None:
        super().__init__()
        self.p, self.channels = image.patch_size, image.latent_channels
        self.proj = nn.Linear(dim, image.latent_channels * self.p ** 2)
        nn.init.zeros_(self.proj.weight)  # the first predictions are 0 (DiT's final layer)
        nn.init.zeros_(self.proj.bias)
        if hidden:  # patchify=mlp: Linear-GELU before the projection
            self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), self.proj)

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor, skip) -> torch.Tensor:  # [N, P, D] -> [N, C, h, w]
        return unpatchify(self.proj(hidden), self.p, self.channels)


class UNetPatchIn(nn.Module):
    """conv_in -> ResBlock at latent resolution -> strided conv down to the patch grid -> to width D."""

    def __init__(self, image: ImageConfig, dim: int) -> None:
        super().__init__()
        c, p = image.unet_channels, image.patch_size
        self.conv_in = nn.Conv2d(image.latent_channels, c, 3, padding=1)
        self.block = ResBlock(c, c, dim)
        self.down = nn.Conv2d(c, 2 * c, kernel_size=p, stride=p)
        self.down_block = ResBlock(2 * c, 2 * c, dim)
        self.proj = nn.Linear(2 * c, dim)

    def forward(self, latents: torch.Tensor, temb: torch.Tensor):
        skip = self.block(self.conv_in(latents), temb)
        h = self.down_block(self.down(skip), temb)
        return self.proj(h.flatten(2).transpose(1, 2)), skip


class UNetPatchOut(nn.Module):
    """From width D on the patch grid -> up (transposed conv) -> concat the skip -> ResBlock -> conv_out."""

    def __init__(self, image: ImageConfig, dim: int) -> None:
        super().__init__()
        c, p = image.unet_channels, image.patch_size
        self.proj = nn.Linear(dim, 2 * c)
        self.up_block = ResBlock(2 * c, 2 * c, dim)
        self.up = nn.ConvTranspose2d(2 * c, c, kernel_size=p, stride=p)
        self.block = ResBlock(2 * c, c, dim)
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, image.latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        n, num, _ = hidden.shape
        g = math.isqrt(num)
        h = self.proj(hidden).transpose(1, 2).reshape(n, -1, g, g)
        h = self.up(self.up_block(h, temb))
        h = self.block(torch.cat([h, skip], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


__all__ = ["LinearPatchIn", "LinearPatchOut", "ResBlock", "TimestepEmbedding", "UNetPatchIn", "UNetPatchOut", "patchify",
           "timestep_features", "unpatchify"]
