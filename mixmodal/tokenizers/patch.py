"""Patch tokenizers computed in closed form: images <-> one vector or code per p x p patch.

    images (B, 3, R, R) -> p x p patches (B, h, w, 3 p^2), h = R / p
      pca:    -> whitened projections onto the top `latent_channels` principal components
               -> latents (B, C, h, w)              (continuous: the Transfusion path)
      kmeans: -> the nearest of `codebook_size` centroids
               -> codes (B, h, w)                    (discrete: the Chameleon / CM3Leon path)
    decoding is the inverse map (the projection back; the centroid's pixels).

Nothing is learned by gradient: `fit(images)` computes the principal components (an eigen-
decomposition of the patch covariance) or the centroids (FAISS k-means; when the images hold
no more distinct patches than codes, the codebook is exactly those patches) in seconds. This is
the oldest kind of image tokenizer (iGPT's k-means colour palette is the 1 x 1 case; PCA patch
codes predate deep autoencoders), and on real photographs it is far worse than a trained VQ-GAN
or KL-VAE. It exists because on worlds whose images are made of few distinct patches it is
exact: at 48 px every 8 x 8 patch of the `shapes` world is a quarter of one grid cell, the
world holds 385 distinct ones on its black background, and a 4 x 4 PCA with 12 channels or an
8 x 8 k-means with 512 codes writes every held-out scene back oracle-exact (docs/recipes.md) —
in seconds instead of the 9-14 minutes a trained tokenizer takes.

Both present the interface of the trained tokenizers (vq.py, vae.py): `kind`, `discrete`,
`config.resolution`, `grid_size`, `downsampling_factor`, `encode`, `decode`; the PCA also
`latent_channels`, `encode_distribution` (a point mass), `scale_latents`, `unscale_latents`;
the k-means `num_codes`. Weights are buffers, saved in safetensors like any tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mixmodal.tokenizers.pixels import check_images
from mixmodal.tokenizers.trunk import TrunkTokenizer
from mixmodal.tokenizers.vae import DiagonalGaussian
from mixmodal.tokenizers.vq import check_codes


@dataclass
class PatchConfig:
    resolution: int = 48  # trained image size (square); encode() checks it
    patch_size: int = 8  # the downsampling factor: one latent / code per patch_size x patch_size pixels

    def __post_init__(self) -> None:
        if self.resolution < 1 or self.patch_size < 1:
            raise ValueError(f"resolution and patch_size must be >= 1; got {self.resolution}, {self.patch_size}")
        if self.resolution % self.patch_size:
            raise ValueError(f"resolution={self.resolution} is not divisible by patch_size={self.patch_size}; "
                             f"pick a divisor of {self.resolution}")

    @property
    def downsampling_factor(self) -> int:
        return self.patch_size

    @property
    def grid_size(self) -> int:
        return self.resolution // self.patch_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size ** 2


@dataclass
class PCAConfig(PatchConfig):
    """Continuous latents: whitened principal components of the patches; or, `factored`, of each patch's
    colour-free pattern, beside its colour and its ground (factor_patches)."""

    latent_channels: int = 12  # factored: the pattern's components + FACTORED_COLOUR_CHANNELS
    scaling_factor: float = 1.0  # scale_latents multiplies by this (the components are already unit-variance)
    shift_factor: float = 0.0
    factored: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factored:
            low, high = FACTORED_COLOUR_CHANNELS + 1, self.patch_size ** 2 + FACTORED_COLOUR_CHANNELS
            if not low <= self.latent_channels <= high:
                raise ValueError(f"with factored=true, latent_channels (the pattern's principal components + "
                                 f"{FACTORED_COLOUR_CHANNELS} for colour and ground) must lie in [{low}, {high}]; "
                                 f"got {self.latent_channels}")
        elif not 1 <= self.latent_channels <= self.patch_dim:
            raise ValueError(f"latent_channels must lie in [1, {self.patch_dim}] (3 x patch_size^2 pixel values "
                             f"per patch); got {self.latent_channels}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")


@dataclass
class KMeansConfig(PatchConfig):
    """Discrete codes: the nearest of `codebook_size` patch centroids."""

    codebook_size: int = 512
    iterations: int = 25  # k-means iterations (FAISS), when the patches outnumber the codes
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")


def to_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/p, W/p, 3 p^2), each patch channel-major (c, y, x)."""
    B, C, H, W = images.shape
    return images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // p, C * p * p)


CODE_VIEWS = ("tokenizer", "factored", "grouped")


def factored_vectors(patches: torch.Tensor) -> torch.Tensor:
    """(K, 3 p^2) patches (channel-major) -> (K, 4 p^2 + 6): [the patch; its structure; its colours], each part
    unit length. Structure: the luminance pattern, centred and scaled to unit length, the same for one outline in
    any colour on a uniform ground. Colours: each channel's max and min over the patch, the same for any outline
    in one colour. A linear map of these scores "a red star" as a star term plus a red term, which a linear map
    of raw pixels cannot (a red star's pixels live in the red channel, a blue star's in the blue)."""
    k = patches.shape[0]
    x = patches.float().reshape(k, 3, -1)
    luminance = x.mean(1)
    structure = F.normalize(luminance - luminance.mean(1, keepdim=True), dim=1, eps=1e-6)
    colours = F.normalize(torch.cat([x.amax(2), x.amin(2)], 1), dim=1, eps=1e-6)
    return torch.cat([F.normalize(patches.float(), dim=1, eps=1e-6), structure, colours], 1)


def code_groups(patches: torch.Tensor, tolerance: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, 3 p^2) patches -> (structure group, colour group) of each code, (K,) each, numbered from 0: codes
    share a structure group when their factored_vectors structure parts are within `tolerance` (L2; the parts
    are unit length) of the group's first code (one outline in any colour: anti-aliased edges rounded to 8 bits
    per channel differ slightly from colour to colour), and a colour group when their colour parts are (any
    outline in one colour)."""
    parts = factored_vectors(patches)[:, patches.shape[1]:]

    def group(x: torch.Tensor) -> torch.Tensor:
        near = torch.cdist(x, x) <= tolerance
        ids = torch.full((len(x),), -1, dtype=torch.long)
        for i in range(len(x)):  # greedy, in code order: each code not yet grouped starts a group
            if ids[i] < 0:
                ids[near[i] & (ids < 0)] = int(ids.max()) + 1
        return ids

    return group(parts[:, :-6]), group(parts[:, -6:])


def grouped_vectors(patches: torch.Tensor) -> torch.Tensor:
    """(K, 3 p^2) patches -> (K, 3 p^2 + S + C): [the patch; one-hot of its structure group; one-hot of its colour
    group] (code_groups; S, C groups), each part unit length. A linear map of the one-hots is a free row per
    outline plus a free row per colour, so "a red star" scores as star + red as sharply as a code's own row would,
    and a red star never seen in training still has both of its rows trained (factored_vectors' colour part is 6
    numbers, too few for a free row per colour)."""
    structure, colours = code_groups(patches)
    return torch.cat([F.normalize(patches.float(), dim=1, eps=1e-6),
                      F.one_hot(structure).float(), F.one_hot(colours).float()], 1)


FACTORED_COLOUR_CHANNELS = 6  # a factored PCA latent's last channels: the colour (3), then the ground (3)
FACTORED_MIN_STD = 0.1  # the smallest scale of a colour or ground channel, in [-1, 1] pixel units
FLAT_PATCH = 1e-3  # a patch whose largest deviation from its mean is below this (in [-1, 1] units) is uniform


def factor_patches(patches: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., 3 p^2) patches (channel-major) -> (pattern (..., p^2) in [0, 1], colour (..., 3), ground (..., 3))
    with patch = ground + colour x pattern: the best rank-1 fit of the patch about its mean (its top singular
    pair), the pattern scaled to span [0, 1] and signed to be higher at the patch centre than on average.

    Exact for one colour over a uniform ground, as every cell of the `shapes` world is (render.py mixes
    ground * (1 - coverage) + colour * coverage, so the pattern is the coverage): an outline gets the same
    pattern in any colour on any ground, and a colour the same (colour, ground) under any outline. Patches
    with more than one colour keep only their dominant one. A uniform patch is all ground (pattern and colour
    zero)."""
    shape = patches.shape[:-1]
    x = patches.float().reshape(-1, 3, p * p)
    mean = x.mean(2, keepdim=True)
    u, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    u, s, v = u[:, :, 0], s[:, 0], vh[:, 0, :]
    c = p // 2
    centre = v.reshape(-1, p, p)[:, c - (p > 1):c + 1, c - (p > 1):c + 1].mean((1, 2))
    sign = torch.where(centre < 0, -1.0, 1.0)
    u, v = u * sign[:, None], v * sign[:, None]
    low, high = v.amin(1), v.amax(1)
    span = (high - low).clamp_min(1e-12)
    flat = (x - mean).abs().amax((1, 2)) < FLAT_PATCH
    pattern = torch.where(flat[:, None], 0.0, (v - low[:, None]) / span[:, None])
    colour = torch.where(flat[:, None], 0.0, u * (s * span)[:, None])
    ground = torch.where(flat[:, None], mean[:, :, 0], mean[:, :, 0] + u * (s * low)[:, None])
    return pattern.reshape(*shape, p * p), colour.reshape(*shape, 3), ground.reshape(*shape, 3)


def unfactor_patches(pattern: torch.Tensor, colour: torch.Tensor, ground: torch.Tensor) -> torch.Tensor:
    """The inverse of factor_patches: (..., p^2), (..., 3), (..., 3) -> (..., 3 p^2) channel-major patches."""
    patch = ground[..., :, None] + colour[..., :, None] * pattern[..., None, :]
    return patch.reshape(*pattern.shape[:-1], 3 * pattern.shape[-1])


def from_patches(patches: torch.Tensor, p: int) -> torch.Tensor:
    """(B, h, w, 3 p^2) -> (B, 3, h p, w p): the inverse of to_patches."""
    B, h, w, _ = patches.shape
    return patches.reshape(B, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, h * p, w * p)


class _PatchTokenizer(TrunkTokenizer):  # grid_size, downsampling_factor: from the config, as every tokenizer's
    config: PatchConfig

    def _patches(self, images: torch.Tensor, any_size: bool) -> torch.Tensor:
        check_images(images, self.config.resolution, self.config.patch_size, any_size=any_size)
        return to_patches(images.float(), self.config.patch_size)

    def check_fitted(self) -> None:
        if not bool(self.fitted):
            raise ValueError(f"this {self.kind} tokenizer has not been fitted: compute it with "
                             f"`mixmodal train configs/tokenizers/{self.kind}-shapes-48.yaml` (or call .fit(images))")


class PCATokenizer(_PatchTokenizer):
    """Images (B, 3, R, R) in [-1, 1] <-> latents (B, latent_channels, R/p, R/p), unit variance per channel.

    `factored`: each patch is first split into a colour-free pattern, a colour and a ground (factor_patches);
    the latent is the pattern's whitened principal components, then the colour and the ground, standardised.
    An unseen shape-colour pair is then a seen pattern beside a seen colour, the latent analogue of the token
    model's factored code vectors (fusion.py). Buffers: `mean` is the pattern's mean followed by the colour's
    and ground's (p^2 + 6), `std` every channel's, `components` the pattern's (latent_channels - 6, p^2)."""

    kind = "pca"
    discrete = False

    def __init__(self, config: PCAConfig) -> None:
        super().__init__()
        self.config = config
        D, C = config.patch_dim, config.latent_channels
        if config.factored:
            D, C = config.patch_size ** 2, C - FACTORED_COLOUR_CHANNELS
        extra = FACTORED_COLOUR_CHANNELS if config.factored else 0
        self.register_buffer("mean", torch.zeros(D + extra))
        self.register_buffer("components", torch.zeros(C, D))  # rows: principal directions, largest first
        self.register_buffer("std", torch.ones(C + extra))  # sqrt of each component's variance (whitening)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def _vectors(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(..., 3 p^2) patches -> (what the components project (..., D), colour and ground (..., 6) or None)."""
        if not self.config.factored:
            return patches, None
        pattern, colour, ground = factor_patches(patches, self.config.patch_size)
        return pattern, torch.cat([colour, ground], -1)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> dict[str, float]:
        """Principal components of the patches (or their patterns) of `images` (N, 3, R, R); returns the share
        of the variance the kept components explain (factored: also the rank-1 fit's share of the patches)."""
        patches = self._patches(images, any_size=False).reshape(-1, self.config.patch_dim)
        X, rest = self._vectors(patches)
        X = X.double()
        mean = X.mean(0)
        covariance = (X - mean).T @ (X - mean) / max(len(X) - 1, 1)
        values, vectors = torch.linalg.eigh(covariance)  # ascending
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        C = self.components.shape[0]
        signs = torch.sign(vectors[vectors.abs().argmax(0), torch.arange(vectors.shape[1])])  # a fixed sign per vector
        vectors = vectors * signs
        std = values[:C].sqrt()
        stats = {"explained_variance": float(values[:C].sum() / values.sum().clamp_min(1e-12))}
        if rest is not None:
            # a component with (almost) no variance would be whitened into rounding noise: floor its scale
            std = std.clamp_min(1e-3 * float(std[0]))
            mean = torch.cat([mean, rest.double().mean(0)])
            # likewise a colour or ground channel the fitted images barely vary (one ground for all of them)
            std = torch.cat([std, rest.double().std(0).clamp_min(FACTORED_MIN_STD)])
            residual = (patches.double() - unfactor_patches(X, rest[:, :3].double(), rest[:, 3:].double())).pow(2).sum()
            stats["rank1_explained"] = float(1 - residual / (patches.double() - patches.double().mean(0)).pow(2).sum())
        self.mean.copy_(mean.float())
        self.components.copy_(vectors[:, :C].T.float())
        self.std.copy_(std.clamp_min(1e-6).float())
        self.fitted.fill_(True)
        return stats

    def encode_distribution(self, images: torch.Tensor, *, any_size: bool = False) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode(images, any_size=any_size), None)

    def encode(self, images: torch.Tensor, *, any_size: bool = False) -> torch.Tensor:
        """(B, 3, R, R) float in [-1, 1] -> latents (B, C, h, w), unscaled (unit variance per channel)."""
        self.check_fitted()
        X, rest = self._vectors(self._patches(images, any_size))
        C, D = self.components.shape
        latents = (X - self.mean[:D]) @ self.components.T / self.std[:C]
        if rest is not None:
            latents = torch.cat([latents, (rest - self.mean[D:]) / self.std[C:]], -1)
        return latents.permute(0, 3, 1, 2).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, h p, w p), unclamped."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape (B, {self.latent_channels}, h, w); got {tuple(latents.shape)}")
        self.check_fitted()
        z = latents.float().permute(0, 2, 3, 1)
        C, D = self.components.shape
        X = (z[..., :C] * self.std[:C]) @ self.components + self.mean[:D]
        if not self.config.factored:
            return from_patches(X, self.config.patch_size)
        rest = z[..., C:] * self.std[C:] + self.mean[D:]
        patches = unfactor_patches(X, rest[..., :3], rest[..., 3:])
        return from_patches(patches, self.config.patch_size)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.config.scaling_factor + self.config.shift_factor


def fit_codebook(X: torch.Tensor, K: int, keys: torch.Tensor, *, iterations: int, seed: int) -> tuple[torch.Tensor, int]:
    """K centroids of the rows of X (n, D) float, and how many distinct rows X holds (rows are the same when
    their `keys`, an integer grid of X, are). When X holds no more distinct rows than K, the centroids are those
    rows (most frequent first; the spare ones repeat the first, so a nearest-centroid search never picks them)
    and quantising X is exact; else FAISS k-means (`iterations`, `seed`)."""
    import faiss

    unique, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    if len(unique) <= K:
        order = counts.argsort(descending=True, stable=True)
        first = torch.full((len(unique),), len(X)).scatter_reduce(0, inverse, torch.arange(len(X)), "amin")
        distinct = X[first[order]]
        return torch.cat([distinct, distinct[:1].expand(K - len(distinct), -1)]).float(), len(unique)
    kmeans = faiss.Kmeans(X.shape[1], K, niter=iterations, seed=seed, max_points_per_centroid=256, verbose=False)
    kmeans.train(np.ascontiguousarray(X.numpy(), dtype=np.float32))
    return torch.from_numpy(kmeans.centroids).float(), len(unique)


def nearest_centroid(flat: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, D) rows -> (n,) long: the index of each row's nearest centroid (K, D), in chunks (no n x K matrix)."""
    codes = []
    for chunk in flat.split(4096):
        d = (chunk ** 2).sum(1, keepdim=True) - 2 * chunk @ centroids.T + (centroids ** 2).sum(1)
        codes.append(d.argmin(1))
    return torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long, device=flat.device)


class KMeansTokenizer(_PatchTokenizer):
    """Images (B, 3, R, R) in [-1, 1] <-> codes (B, R/p, R/p) in [0, codebook_size)."""

    kind = "kmeans"
    discrete = True

    def __init__(self, config: KMeansConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("codebook", torch.zeros(config.codebook_size, config.patch_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def num_codes(self) -> int:
        return self.config.codebook_size

    @torch.no_grad()
    def code_vectors(self, view: str = "tokenizer") -> torch.Tensor:
        """Each code's vector, which a model's image.code_embedding=codebook* reads. view "tokenizer": (K, 3 p^2),
        the patch, pixels in [-1, 1]; "factored": (K, 4 p^2 + 6), factored_vectors of the patches; "grouped":
        (K, 3 p^2 + S + C), grouped_vectors of the patches."""
        self.check_fitted()
        if view not in CODE_VIEWS:
            raise ValueError(f"image.code_vectors must be one of {', '.join(CODE_VIEWS)}, got {view!r}")
        patches = self.codebook.float().clone()
        views = {"tokenizer": lambda x: x, "factored": factored_vectors, "grouped": grouped_vectors}
        return views[view](patches)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> dict[str, float]:
        """Centroids of the patches of `images` (N, 3, R, R). When they hold no more distinct patches
        than codes, the codebook is those patches (most frequent first; the spare codes repeat the
        first, so encoding never picks them) and the round trip is exact; else FAISS k-means.
        Returns the number of distinct patches and the mean squared quantisation error."""
        X = self._patches(images, any_size=False).reshape(-1, self.config.patch_dim)
        # distinct patches, on the 8-bit grid images are stored on
        codebook, distinct = fit_codebook(X, self.config.codebook_size, torch.round((X + 1) * 127.5).to(torch.int16),
                                          iterations=self.config.iterations, seed=self.config.seed)
        self.codebook.copy_(codebook)
        self.fitted.fill_(True)
        error = ((self.codebook[self._nearest(X)] - X) ** 2).mean()
        return {"distinct_patches": float(distinct), "quantisation_mse": float(error)}

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        return nearest_centroid(flat, self.codebook)

    def encode(self, images: torch.Tensor, *, any_size: bool = False) -> torch.Tensor:
        """(B, 3, R, R) float in [-1, 1] -> codes (B, h, w) long."""
        self.check_fitted()
        patches = self._patches(images, any_size)
        B, h, w, D = patches.shape
        return self._nearest(patches.reshape(-1, D)).reshape(B, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, h p, w p)."""
        check_codes(codes, self.num_codes)
        self.check_fitted()
        return from_patches(self.codebook[codes.long()], self.config.patch_size)
