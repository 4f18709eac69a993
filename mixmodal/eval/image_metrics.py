"""Reconstruction metrics on image batches: PSNR and SSIM (torch, any device).

Images are float (B, 3, H, W) in [0, 1] (use `(x + 1) / 2` for the tokenizers' [-1, 1]).
SSIM follows Wang et al. 2004 as scikit-image computes it with `gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1`: an 11x11 Gaussian window,
K1 = 0.01, K2 = 0.03, statistics over the windows that fit inside the image, the mean over
positions and channels. Both return one value per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, (B,); +inf for identical images."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse 0 -> inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean structural similarity per image, (B,); 1 for identical images."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels; got {tuple(a.shape[-2:])}")
    channels = a.shape[1]
    window = gaussian_window().to(a.device)[None, None].expand(channels, 1, -1, -1)  # (C, 1, k, k)
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H-k+1, W-k+1), per channel
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
