"""KL-VAE image tokenizer: images <-> continuous latents (Transfusion's image representation).

    images (B, 3, R, R) -> Encoder -> quant_conv -> (mean, logvar) each (B, C, h, w)
    latents (B, C, h, w) -> post_quant_conv -> Decoder -> images (B, 3, R, R)

The layout and math are diffusers' `AutoencoderKL` (same module names, see trunk.py), so
its checkpoints convert by copying tensors. `encode` returns the distribution mean,
UNSCALED; a diffusion model wants latents of roughly unit variance, which
`scale_latents` gives: (z - shift_factor) * scaling_factor, with the factors estimated
by `fit_latent_scaling` (Stable Diffusion's 1/std recipe) and stored in the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from mixmodal.tokenizers.pixels import check_images
from mixmodal.tokenizers.trunk import Decoder, Encoder, TrunkConfig, TrunkTokenizer

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' clamp: keeps exp(logvar) finite in float16


@dataclass
class VAEConfig(TrunkConfig):
    """A KL-VAE tokenizer: the trunk plus the latent space."""

    latent_channels: int = 4
    kl_weight: float = 1e-6  # weight of the KL term in the training loss (read by the trainer)
    scaling_factor: float = 1.0  # scale_latents multiplies by this (diffusers' scaling_factor)
    shift_factor: float = 0.0  # ...after subtracting this (diffusers' shift_factor; SD3/Flux)
    double_z: bool = True  # encoder predicts mean and logvar; False: a deterministic autoencoder
    use_quant_conv: bool = True  # 1x1 conv on the moments (diffusers' use_quant_conv)
    use_post_quant_conv: bool = True  # 1x1 conv on the latents before decoding

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, exp(logvar)) per latent element; each (B, C, h, w)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor | None) -> None:
        self.mean = mean
        self.deterministic = logvar is None  # double_z=False: a point mass at the mean
        self.logvar = torch.zeros_like(mean) if logvar is None else logvar.clamp(*LOGVAR_RANGE)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.deterministic:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements: (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


@dataclass
class VAEOutput:
    reconstruction: torch.Tensor  # (B, 3, R, R), unclamped decoder output
    losses: dict[str, torch.Tensor]  # "kl": batch mean of the per-sample KL (unweighted; see kl_weight)
    latents: torch.Tensor  # (B, C, h, w), the sample that was decoded (unscaled)


class VAETokenizer(TrunkTokenizer):
    """Images (B, 3, R, R) in [-1, 1] <-> latents (B, latent_channels, R/f, R/f)."""

    kind = "vae"  # the `kind:` written into config.yaml
    discrete = False  # codes (tokens mode) or continuous latents (latents mode)

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        moments = 2 * config.latent_channels if config.double_z else config.latent_channels
        self.encoder = Encoder(config, out_channels=moments)
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(config.latent_channels, config.latent_channels, 1)
                                if config.use_post_quant_conv else None)
        self.decoder = Decoder(config, in_channels=config.latent_channels)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def encode_distribution(self, images: torch.Tensor, *, any_size: bool = False) -> DiagonalGaussian:
        check_images(images, self.config.resolution, self.downsampling_factor, any_size=any_size)
        moments = self.encoder(images)  # (B, 2C, h, w) or (B, C, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        if not self.config.double_z:
            return DiagonalGaussian(moments, None)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def encode(self, images: torch.Tensor, *, any_size: bool = False) -> torch.Tensor:
        """(B, 3, R, R) float in [-1, 1] -> the posterior mean (B, C, h, w), unscaled."""
        return self.encode_distribution(images, any_size=any_size).mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f), unclamped."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape (B, {self.latent_channels}, h, w); got {tuple(latents.shape)}")
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        posterior = self.encode_distribution(images)
        latents = posterior.sample(generator)
        return VAEOutput(self.decode(latents), {"kl": posterior.kl().mean()}, latents)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled -> the roughly unit-variance latents a diffusion model sees."""
        return (latents - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.config.scaling_factor + self.config.shift_factor


@torch.no_grad()
def fit_latent_scaling(model: VAETokenizer, batches: Iterable[torch.Tensor], *, center: bool = False) -> tuple[float, float]:
    """Set `scaling_factor` = 1 / std of the latent means over `batches` of images (and, with
    `center`, `shift_factor` = their mean, as SD3/Flux do); returns (scaling_factor, shift_factor).

    Stable Diffusion computed this once on a batch of training images; the posterior mean
    is used here (not a sample) so the estimate is deterministic.
    """
    count, total, total_sq = 0, 0.0, 0.0
    for images in batches:
        z = model.encode(images).double()
        count += z.numel()
        total += float(z.sum())
        total_sq += float(z.pow(2).sum())
    if count == 0:
        raise ValueError("fit_latent_scaling: no images given")
    mean = total / count
    std = max(total_sq / count - mean**2, 0.0) ** 0.5
    if std == 0.0:
        raise ValueError("fit_latent_scaling: the latents have zero variance; is the encoder trained?")
    model.config.scaling_factor = 1.0 / std  # std about the mean, as SD's `1 / latents.flatten().std()`
    model.config.shift_factor = mean if center else 0.0
    return model.config.scaling_factor, model.config.shift_factor
