"""Frechet distance between feature distributions (FID), with pluggable feature networks.

    from mixmodal.eval.fid import compute_fid
    from mixmodal.eval.inception import load_inception          # comparable to published FIDs
    from mixmodal.eval.feature_net import default_feature_net   # shapes-only, needs no download
    result = compute_fid(load_inception("pt_inception-2015-12-05-6726825d.pth"), real_batches, fake_batches)
    # {"fid": 12.3, "n_real": 5000, "n_fake": 5000, "features": "inception-v3 (pytorch-fid weights)",
    #  "comparable": True, "note": None}

Images are float (B, 3, H, W) in [0, 1] at any resolution; each extractor resizes them
itself. `frechet_distance` is pytorch-fid's `calculate_frechet_distance` (the formula of
Heusel et al. 2017 with Dougal Sutherland's stable matrix square root) line for line, so
equal statistics give equal numbers.

An FID is only comparable with another computed by the same feature network, on the same
number of images: the estimate is biased upwards, more so for few images. With fewer
images than feature dimensions the covariances are singular, and the number mostly
measures the sample size (the result then carries a "note").
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from scipy import linalg


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str  # recorded with every FID, e.g. "inception-v3 (pytorch-fid weights)"
    comparable: bool  # True only when FIDs are comparable with published (Inception) FIDs
    dim: int

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1], any H and W -> (B, dim)."""
        ...


def check_images(images: object, who: str) -> torch.Tensor:
    """`images` if it is a float (B, 3, H, W) batch in [0, 1]; otherwise a ValueError
    that says what is wrong and how to convert."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{who}: expected a torch.Tensor batch of images (B, 3, H, W); got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: expected images of shape (B, 3, H, W); got {tuple(images.shape)} "
                         "(a single image needs a batch axis: image[None]; grayscale: image.expand(-1, 3, -1, -1))")
    if not images.is_floating_point():
        raise ValueError(f"{who}: expected float images in [0, 1]; got {images.dtype} "
                         "(for uint8 images pass images.float() / 255)")
    if images.numel():
        low, high = float(images.min()), float(images.max())
        if not (low >= -1e-3 and high <= 1 + 1e-3):  # also catches NaN
            raise ValueError(f"{who}: expected values in [0, 1]; got [{low:.3g}, {high:.3g}] "
                             "(for images in [-1, 1] pass (images + 1) / 2; for 0-255 pass images / 255)")
    return images


class FeatureStats:
    """Streaming mean and covariance of features: float64 sums, one batch at a time.

    `cov` is the unbiased covariance, as np.cov(x, rowvar=False). The sums are taken
    around a fixed shift (the first batch's mean): the covariance does not depend on it,
    and without it sum(x x^T) - n mu mu^T would cancel catastrophically for features whose
    mean is large against their spread.
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim
        self.n = 0
        self._shift: np.ndarray | None = None  # (D,)
        self._sum: np.ndarray | None = None  # (D,) sum of (x - shift)
        self._outer: np.ndarray | None = None  # (D, D) sum of (x - shift)(x - shift)^T

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> "FeatureStats":
        stats = cls()
        stats.update(features)
        return stats

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float64).numpy()
        x = np.asarray(features, dtype=np.float64)  # (B, D)
        if x.ndim != 2:
            raise ValueError(f"features must be a (batch, dim) array; got shape {x.shape}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}; these statistics hold dimension {self.dim}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf; the feature network or its input is broken "
                             "(check the images are finite and in [0, 1])")
        if len(x) == 0:
            return
        if self._shift is None:
            self.dim = x.shape[1]
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
        centred = x - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.n += len(x)

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features yet: call update() first")
        return self._shift + self._sum / self.n

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples; got {self.n}")
        centred_mean = self._sum / self.n
        return (self._outer - self.n * np.outer(centred_mean, centred_mean)) / (self.n - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two means differ in length: {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"covariances {sigma1.shape} and {sigma2.shape} do not match means of length {len(mu1)}")
    diff = mu1 - mu2
    # The product might be almost singular. (pytorch-fid passes disp=False, which SciPy 1.16
    # deprecates; the square root it returns is the same.)
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the product of the covariances is singular; adding {eps} to their diagonals "
                      "(as pytorch-fid does)", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # Numerical error might give a slight imaginary component.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(f"FID: the matrix square root of sigma1 @ sigma2 has an imaginary component of "
                             f"{largest:.3g}; the covariances are not valid (not symmetric positive semi-definite, "
                             "or far too few samples for their dimension)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(extractor: FeatureExtractor, batches: Iterable[torch.Tensor], side: str) -> FeatureStats:
    """Statistics of the extractor's features over an iterable of image batches."""
    if isinstance(batches, torch.Tensor):  # one batch; iterating it would yield single (3, H, W) images
        batches = [batches]
    stats = FeatureStats(extractor.dim)
    with torch.no_grad():
        for k, images in enumerate(batches):
            features = extractor.features(check_images(images, f"{side} batch {k}"))  # (B, D)
            if features.shape != (images.shape[0], extractor.dim):
                raise ValueError(f"{extractor.name} returned features of shape {tuple(features.shape)} for "
                                 f"{images.shape[0]} images; expected ({images.shape[0]}, {extractor.dim})")
            stats.update(features)
    return stats


def compute_fid(extractor: FeatureExtractor, real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor]) -> dict:
    """FID between two sets of images, each an iterable of float (B, 3, H, W) batches in [0, 1]."""
    real_stats = feature_stats(extractor, real, "real")
    fake_stats = feature_stats(extractor, fake, "fake")
    for side, stats in (("real", real_stats), ("fake", fake_stats)):
        if stats.n < 2:
            raise ValueError(f"FID needs at least 2 {side} images (a covariance of 1 sample is undefined); "
                             f"got {stats.n}")
    fid = frechet_distance(real_stats.mean, real_stats.cov, fake_stats.mean, fake_stats.cov)
    note = None
    if min(real_stats.n, fake_stats.n) < extractor.dim:
        note = (f"only {real_stats.n} real and {fake_stats.n} fake images for {extractor.dim}-d features: the "
                "covariances are singular and the FID is biased upwards; compare only FIDs computed on the same "
                f"number of images, and use at least {extractor.dim} (thousands for Inception) for a stable value")
    return {"fid": fid, "n_real": real_stats.n, "n_fake": fake_stats.n, "features": extractor.name,
            "comparable": extractor.comparable, "note": note}
