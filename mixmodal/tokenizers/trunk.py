"""The convolutional trunk shared by the VQ and KL-VAE image tokenizers.

Encoder: conv_in -> L levels of ResNet blocks (downsampling between levels) -> mid
block (ResNet, self-attention, ResNet) -> GroupNorm, SiLU -> conv_out. The decoder
mirrors it with one more ResNet block per level and nearest-neighbour upsampling.

Submodule names follow diffusers' `AutoencoderKL` Encoder/Decoder (`down_blocks.i.
resnets.j.conv1`, `mid_block.attentions.0.to_q`, `up_blocks.i.upsamplers.0.conv`, ...)
so a diffusers state dict loads with no renaming, and the math matches it and
taming-transformers' VQGAN (the layout of Chameleon's image tokenizer) exactly:
GroupNorm eps 1e-6, Downsample pads right/bottom by one then convolves with stride 2,
single-head attention scaled by 1/sqrt(C). Channel semantics follow taming: conv_in
gives `base_channels`, level i goes from base*(1, *mults)[i] to base*mults[i] (equal to
diffusers' `block_out_channels` whenever mults[0] == 1, which diffusers always has).

Axes: B batch, C channels, H x W the current feature map, N = H*W positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6  # diffusers and taming both use 1e-6 in every GroupNorm of the trunk


@dataclass
class TrunkConfig:
    """Shape of the encoder/decoder trunk; VQConfig and VAEConfig extend it."""

    resolution: int = 64  # trained image size (square); encode() checks it
    base_channels: int = 64  # channels after conv_in
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 2])  # per level; len-1 downsamplings
    num_res_blocks: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    attention: bool = True  # self-attention in the mid block (the lowest resolution)
    attention_resolutions: list[int] = field(default_factory=list)  # also attend after each ResNet at these sizes (taming)
    norm_groups: int = 32  # GroupNorm groups; must divide every channel count

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {self.base_channels}")
        if not self.channel_multipliers or any(m < 1 for m in self.channel_multipliers):
            raise ValueError(f"channel_multipliers must be a non-empty list of positive integers, got {self.channel_multipliers}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.resolution % self.downsampling_factor:
            raise ValueError(
                f"resolution={self.resolution} is not divisible by the downsampling factor {self.downsampling_factor} "
                f"(2 ** (len(channel_multipliers) - 1) with channel_multipliers={self.channel_multipliers})"
            )
        if self.norm_groups < 1:
            raise ValueError(f"norm_groups must be >= 1, got {self.norm_groups}")
        for channels in sorted({self.base_channels * m for m in (1, *self.channel_multipliers)}):
            if channels % self.norm_groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} does not divide {channels} channels "
                    f"(base_channels={self.base_channels} x channel_multipliers={self.channel_multipliers}); "
                    "pick norm_groups that divides base_channels"
                )
        level_sizes = [self.resolution // 2**i for i in range(len(self.channel_multipliers))]
        for r in self.attention_resolutions:
            if r not in level_sizes:
                raise ValueError(f"attention_resolutions: {r} is not a level size; the levels are {level_sizes}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the latent / code grid for an image of the trained resolution."""
        return self.resolution // self.downsampling_factor


def _group_norm(config: TrunkConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus a 1x1 shortcut when the channel count changes."""

    def __init__(self, config: TrunkConfig, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual (diffusers `Attention` names)."""

    def __init__(self, config: TrunkConfig, channels: int) -> None:
        super().__init__()
        self.group_norm = _group_norm(config, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # `.0` as in diffusers (`.1` is its dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, N, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scale 1/sqrt(C): one head of width C
        h = self.to_out[0](h)  # (B, N, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        # Asymmetric padding (right and bottom only), as in taming and diffusers; a symmetric
        # padding=1 would shift every pixel by half a step and break converted weights.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResNet blocks (each optionally followed by attention), then an optional resampler."""

    def __init__(self, config: TrunkConfig, in_channels: int, out_channels: int, num_blocks: int,
                 attend: bool, resample: type[nn.Module] | None, resample_name: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(config, in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.attentions = nn.ModuleList(AttentionBlock(config, out_channels) for _ in range(num_blocks)) if attend else None
        self.resample_name = resample_name
        if resample is not None:
            setattr(self, resample_name, nn.ModuleList([resample(out_channels)]))  # `downsamplers.0` / `upsamplers.0`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[j](x)
        resamplers = getattr(self, self.resample_name, None)
        return resamplers[0](x) if resamplers is not None else x


class MidBlock(nn.Module):
    """ResNet, self-attention (optional), ResNet at the lowest resolution."""

    def __init__(self, config: TrunkConfig, channels: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(config, channels, channels), ResnetBlock(config, channels, channels)])
        self.attentions = nn.ModuleList([AttentionBlock(config, channels)]) if config.attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """(B, in_channels, R, R) -> (B, out_channels, R/f, R/f) with f = config.downsampling_factor."""

    def __init__(self, config: TrunkConfig, out_channels: int, in_channels: int = 3) -> None:
        super().__init__()
        base, mults = config.base_channels, config.channel_multipliers
        num_levels = len(mults)
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        in_mults = (1, *mults)
        self.down_blocks = nn.ModuleList(
            Level(config, base * in_mults[i], base * mults[i], config.num_res_blocks,
                  attend=config.resolution // 2**i in config.attention_resolutions,
                  resample=Downsample if i < num_levels - 1 else None, resample_name="downsamplers")
            for i in range(num_levels)
        )
        top = base * mults[-1]
        self.mid_block = MidBlock(config, top)
        self.conv_norm_out = _group_norm(config, top)
        self.conv_out = nn.Conv2d(top, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, in_channels, r, r) -> (B, out_channels, r*f, r*f); up_blocks[0] is the lowest resolution."""

    def __init__(self, config: TrunkConfig, in_channels: int, out_channels: int = 3) -> None:
        super().__init__()
        base, mults = config.base_channels, config.channel_multipliers
        num_levels = len(mults)
        top = base * mults[-1]
        self.conv_in = nn.Conv2d(in_channels, top, 3, padding=1)
        self.mid_block = MidBlock(config, top)
        levels = []
        channels = top
        for k in range(num_levels):
            i = num_levels - 1 - k  # the encoder level this up block mirrors
            levels.append(Level(config, channels, base * mults[i], config.num_res_blocks + 1,
                                attend=config.resolution // 2**i in config.attention_resolutions,
                                resample=Upsample if i > 0 else None, resample_name="upsamplers"))
            channels = base * mults[i]
        self.up_blocks = nn.ModuleList(levels)
        self.conv_norm_out = _group_norm(config, channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class TrunkTokenizer(nn.Module):
    """Base of the image tokenizers: what they derive from their trunk config."""

    config: TrunkConfig

    @property
    def grid_size(self) -> int:
        """Latent positions (codes) per side for an image of the trained resolution."""
        return self.config.grid_size

    @property
    def downsampling_factor(self) -> int:
        return self.config.downsampling_factor
