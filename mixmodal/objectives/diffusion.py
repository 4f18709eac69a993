"""Diffusion for Transfusion's image latents: schedules as pure functions of t, noising,
the loss, and the samplers the inference engine steps with.

Axes: n images (one row per image), then any trailing shape (patches, channels, ...).

One time axis for both kinds: t in [0, 1], 0 = clean data, 1 = (almost) pure noise. The
denoiser is a pure function model(x_t, t, context); nothing here holds a model or state.

- "ddpm" (Transfusion §2: epsilon prediction, cosine schedule, 1000 steps). Discrete
  step k in [0, T) is time t = (k + 1) / T, so t = 0 is the clean end that sampling loops
  finish on (alpha_bar = 1, like diffusers' "alpha of step -1"), and times are rounded to
  the nearest step. `alphas_cumprod` equals diffusers' DDPMScheduler with
  beta_schedule="squaredcos_cap_v2" (or "linear"); the model predicts the noise.
- "flow" (rectified flow): x_t = (1 - t) x0 + t noise with continuous t; the model
  predicts the velocity noise - x0.

Training times: uniform in (0, 1] (Transfusion), or `time_sampling: logit_normal` (SD3,
Esser et al. 2024: t = sigmoid(N(logit_mean, logit_std)), which spends more of the steps at
middle noise levels, where layout and count are decided, than at the low-noise end).

Noise limiting (Transfusion, for captioning): an image that comes before its caption is
the input of that caption, and a very noisy input teaches the text nothing, so its noise
is capped at step `noise_limit` (ddpm) or t = noise_limit / T (flow). The caller says
which images qualify (`limited`); `noise_limit_prob` of those are capped. With
`noise_limit_read`, an image that a later text target reads (VQA: question -> image ->
answer) qualifies too: its answer is learned from the nearly clean image it reads at inference.
`clean_read` instead feeds a share of those read images clean, with no diffusion loss (the
caller drops them from the targets), so reading is learned on clean pictures while the others
keep their full noise range.

The loss is loss_weight * MSE(prediction, target) in float32 (Transfusion's lambda = 5).
Samplers: `sampling_times` gives the descending grid, then one of `ddpm_step`
(ancestral), `ddim_step` (deterministic, eta = 0; any kind) or `flow_step` (Euler) per
step, each given the model's prediction at (x_t, t).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class DiffusionConfig:
    kind: Literal["ddpm", "flow"] = "ddpm"
    # ddpm: the number of discrete steps; flow: t is continuous and this is only the
    # resolution that sampling grids are rounded to
    num_timesteps: int = 1000
    schedule: Literal["cosine", "linear"] = "cosine"  # ddpm betas
    loss_weight: float = 5.0  # Transfusion's lambda, relative to the text cross-entropy
    # largest ddpm step (exclusive) for images that precede their caption; flow: the
    # largest t is noise_limit / num_timesteps
    noise_limit: int = 500
    noise_limit_prob: float = 1.0  # fraction of the qualifying images that are capped
    # also qualify every image that a later text target reads (VQA's question -> image -> answer, a caption
    # after a prompt): Transfusion caps only images with no text before them
    noise_limit_read: bool = False
    # share of the images that a later text target reads (VQA's image, an image-first caption's) that are fed
    # clean, as the engine feeds a prompt's image, and carry no diffusion loss: the model learns to read the clean
    # pictures it reads at inference (with logit_mean 1.0 a trained image is almost never near t = 0), and the
    # rest of those images stay generation targets at every noise level
    clean_read: float = 0.0
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"  # how training draws t (capped images too)
    logit_mean: float = 0.0  # logit_normal: SD3's default
    logit_std: float = 1.0
    # share of the training images in which a random k ~ U{0..P-1} of the P patches are given clean (t = 0, no
    # loss) and the rest noised at the image's time: the model learns to denoise some patches given the others,
    # which the `patch_groups` sampler needs to commit an image's patches in turns (MAR, Li et al. 2024)
    clean_patches: float = 0.0
    # with model.image.patch_codes = K > 0: the weight of the auxiliary cross-entropy of each noisy patch's state
    # against the nearest of the K centroids of its clean patch (`patch_code_loss`), beside the flow loss
    code_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("ddpm", "flow"):
            raise ValueError(f"kind must be 'ddpm' or 'flow', got {self.kind!r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 1 <= self.noise_limit <= self.num_timesteps:
            raise ValueError(
                f"noise_limit must be in [1, num_timesteps={self.num_timesteps}], got {self.noise_limit}"
            )
        if not 0.0 <= self.noise_limit_prob <= 1.0:
            raise ValueError(f"noise_limit_prob must be in [0, 1], got {self.noise_limit_prob}")
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {self.time_sampling!r}")
        if not 0.0 <= self.clean_read <= 1.0:
            raise ValueError(f"clean_read must be in [0, 1] (a share of the images text reads), got {self.clean_read}")
        if not 0.0 <= self.clean_patches <= 1.0:
            raise ValueError(f"clean_patches must be in [0, 1] (a share of the training images), got {self.clean_patches}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if not (self.loss_weight >= 0.0 and math.isfinite(self.loss_weight)):
            raise ValueError(f"loss_weight must be a finite number >= 0, got {self.loss_weight}")
        if not (self.code_loss_weight >= 0.0 and math.isfinite(self.code_loss_weight)):
            raise ValueError(f"code_loss_weight must be a finite number >= 0, got {self.code_loss_weight}")


class Schedule(ABC):
    """How x_t is made from (x0, noise, t), what the model predicts, and the inverse."""

    def __init__(self, config: DiffusionConfig) -> None:
        self.config = config

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def sample_times(
        self,
        n: int,
        *,
        generator: torch.Generator,
        device: torch.device | str | None = None,
        limited: Tensor | None = None,
    ) -> Tensor:
        """Training times (n,) float32 in (0, 1]; rows where `limited` (bool (n,)) is set
        are capped with probability noise_limit_prob. Drawn from `generator` only, on
        its device, then moved to `device`."""
        draw_device = generator.device
        if self.config.time_sampling == "logit_normal":  # the draw whose time is upper * sigmoid(N(mean, std))
            normal = torch.randn(n, generator=generator, device=draw_device)
            fraction = torch.sigmoid(self.config.logit_mean + self.config.logit_std * normal)
            uniform = (fraction if self._time_rises_with_draw else 1.0 - fraction).clamp(0.0, 1.0 - 1e-7)
        else:
            uniform = torch.rand(n, generator=generator, device=draw_device)  # [0, 1)
        capped = torch.zeros(n, dtype=torch.bool, device=draw_device)
        if limited is not None:
            if limited.shape != (n,) or limited.dtype != torch.bool:
                raise ValueError(
                    f"limited must be a bool tensor of shape ({n},), got {limited.dtype} {tuple(limited.shape)}"
                )
            capped = limited.to(draw_device)
            if self.config.noise_limit_prob < 1.0:
                coin = torch.rand(n, generator=generator, device=draw_device)
                capped = capped & (coin < self.config.noise_limit_prob)
        limit = self.config.noise_limit / self.num_timesteps
        upper = torch.where(capped, limit, 1.0)  # (n,) float32: the largest allowed t
        return self._times_below(uniform, upper).to(device=device if device is not None else draw_device)

    _time_rises_with_draw = True  # does _times_below map larger draws to larger times

    @abstractmethod
    def _times_below(self, uniform: Tensor, upper: Tensor) -> Tensor:
        """Map uniform [0, 1) draws (n,) to float32 times in (0, upper]."""

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """x_t from clean x0 and noise (n, ...), at times t (n,) or one time for all."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """What the model is trained to predict at (x_t, t)."""

    @abstractmethod
    def predict_x0(self, x_t: Tensor, prediction: Tensor, t: Tensor | float) -> Tensor:
        """The clean sample implied by the model's prediction at (x_t, t)."""

    @abstractmethod
    def predict_noise(self, x_t: Tensor, prediction: Tensor, t: Tensor | float) -> Tensor:
        """The noise implied by the model's prediction at (x_t, t)."""


class DDPMSchedule(Schedule):
    """Discrete DDPM: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise; target = noise."""

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        # float64 betas and product (diffusers multiplies in float32; the two agree to ~1e-7)
        betas = torch.from_numpy(_betas(config.schedule, config.num_timesteps))
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)  # (T,)
        self._on_device: dict[torch.device, Tensor] = {}

    def step_index(self, t: Tensor | float) -> Tensor:
        """DDPM step k (long) of time t: round(t * T) - 1; -1 is the clean end (t = 0)."""
        t = torch.as_tensor(t)
        t = t.to(torch.promote_types(t.dtype, torch.float32))  # exact for any T below ~10^6
        return torch.round(t * self.num_timesteps).long() - 1

    def time_of_step(self, k: Tensor | int) -> Tensor:
        """Time t (float32) of DDPM step k: (k + 1) / T."""
        return (torch.as_tensor(k) + 1).to(torch.float32) / self.num_timesteps

    def alpha_bar(self, t: Tensor | float, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """alphas_cumprod at the step of t (1 at t = 0), in `dtype`."""
        t = torch.as_tensor(t, device=device)
        k = self.step_index(t)
        table = self._on_device.get(k.device)
        if table is None:
            table = self._on_device[k.device] = self.alphas_cumprod.to(k.device)
        values = table[k.clamp(min=0)].to(dtype)
        return torch.where(k >= 0, values, torch.ones((), dtype=dtype, device=k.device))

    def _times_below(self, uniform: Tensor, upper: Tensor) -> Tensor:
        num_steps = torch.round(upper * self.num_timesteps)  # steps allowed: T, or noise_limit
        k = torch.minimum(torch.floor(uniform * num_steps), num_steps - 1)
        return ((k + 1) / self.num_timesteps).to(torch.float32)

    def _coefficients(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) broadcastable against x (n, ...)."""
        alpha_bar = _broadcast(self.alpha_bar(t, dtype=_compute_dtype(x), device=x.device), x)
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        signal, sigma = self._coefficients(t, x0)
        return (signal * x0 + sigma * noise).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        return noise

    def predict_x0(self, x_t: Tensor, prediction: Tensor, t: Tensor | float) -> Tensor:
        signal, sigma = self._coefficients(t, x_t)
        return ((x_t - sigma * prediction) / signal).to(x_t.dtype)

    def predict_noise(self, x_t: Tensor, prediction: Tensor, t: Tensor | float) -> Tensor:
        return prediction


class FlowSchedule(Schedule):
    """Rectified flow: x_t = (1 - t) x0 + t noise; target = velocity noise - x0."""

    _time_rises_with_draw = False

    def _times_below(self, uniform: Tensor, upper: Tensor) -> Tensor:
        # 1 - uniform is in (0, 1]: t = 0 would ask the model for a velocity at clean data
        return ((1.0 - uniform) * upper).to(torch.float32)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        t = _broadcast(_time(t, x0), x0)
        return ((1.0 - t) * x0 + t * noise).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        return (noise.to(_compute_dtype(x0)) - x0).to(x0.dtype)

    def predict_x0(self, x_t: Tensor, prediction: Tensor, t: Tensor | float) -> Tensor:
        t = _broadcast(_time(t, x_t), x_t)
        return (x_t - t * prediction).to(x_t.dtype)

    def predict_noise(self, x_t: Tensor, prediction: Tensor, t: Tensor | float) -> Tensor:
        t = _broadcast(_time(t, x_t), x_t)
        return (x_t + (1.0 - t) * prediction).to(x_t.dtype)


def build_schedule(config: DiffusionConfig) -> DDPMSchedule | FlowSchedule:
    return DDPMSchedule(config) if config.kind == "ddpm" else FlowSchedule(config)


def diffusion_loss(prediction: Tensor, target: Tensor, *, weight: float, image_weights: Tensor | None = None,
                   element_mask: Tensor | None = None) -> Tensor:
    """weight * mean squared error over every element, in float32; with `image_weights` [N]
    (per image, first dim) the mean over images is weighted by them. With `element_mask` (bool,
    broadcastable to the prediction: the elements that carry loss) each image's error is the mean
    over its masked elements (an image with none weighs 0)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape; "
            "broadcasting them would average the wrong pairs"
        )
    if image_weights is None and element_mask is None:
        return weight * F.mse_loss(prediction.float(), target.float())
    error = (prediction.float() - target.float()).square().flatten(1)
    mask = None if element_mask is None else element_mask.expand_as(prediction).flatten(1)
    return _image_mean(error, weight, image_weights, mask)


def _image_mean(error: Tensor, weight: float, image_weights: Tensor | None, mask: Tensor | None) -> Tensor:
    """weight * the mean over images (first dim; weighted by `image_weights` [N] when given) of each image's mean
    of `error` [N, E] over its elements (those `mask` [N, E] keeps, when given: an image with none weighs 0)."""
    w = None if image_weights is None else image_weights.float().to(error.device)
    if mask is None:
        per_image = error.mean(1)
        w = torch.ones_like(per_image) if w is None else w
    else:
        m = mask.float()
        count = m.sum(1)
        per_image = (error * m).sum(1) / count.clamp(min=1.0)
        w = (count > 0).float() if w is None else w * (count > 0)
    return weight * (w * per_image).sum() / w.sum().clamp(min=1e-8)


def patch_code_loss(logits: Tensor, codes: Tensor, *, weight: float, image_weights: Tensor | None = None,
                    patch_mask: Tensor | None = None) -> Tensor:
    """weight * cross-entropy of `logits` [N, P, K] against `codes` [N, P] (each clean patch's nearest centroid),
    in float32: each image's mean over its patches (over those `patch_mask` [N, P] keeps, when given: an image
    with none weighs 0), then the mean over images, weighted by `image_weights` [N] as `diffusion_loss` does."""
    if logits.shape[:-1] != codes.shape:
        raise ValueError(f"code logits {tuple(logits.shape)} do not match codes {tuple(codes.shape)} (N, P)")
    ce = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten(), reduction="none").view(codes.shape)
    return _image_mean(ce, weight, image_weights, patch_mask)


def clean_patch_mask(n: int, num_patches: int, share: float, generator: torch.Generator) -> Tensor:
    """(n, num_patches) bool: for a `share` of the n images (a coin each), a random k ~ U{0..P-1} of their
    P patches, chosen uniformly, are clean (DiffusionConfig.clean_patches); drawn from `generator` on its
    device. No image has all its patches clean, so every chosen image still carries loss."""
    device = generator.device
    chosen = torch.rand(n, generator=generator, device=device) < share
    k = torch.randint(0, num_patches, (n,), generator=generator, device=device)
    rank = torch.rand(n, num_patches, generator=generator, device=device).argsort(1).argsort(1)
    return chosen[:, None] & (rank < k[:, None])


def patch_map(values: Tensor, patch_size: int) -> Tensor:
    """Per-patch values (n, P) on a g x g patch grid -> (n, 1, g p, g p), each patch's value over its
    p x p latent pixels."""
    n, num = values.shape
    g = math.isqrt(num)
    if g * g != num:
        raise ValueError(f"{num} patches are not a square grid")
    grid = values.reshape(n, 1, g, 1, g, 1).expand(n, 1, g, patch_size, g, patch_size)
    return grid.reshape(n, 1, g * patch_size, g * patch_size)


# --- samplers ------------------------------------------------------------------------------

def sampling_times(schedule: Schedule, num_steps: int) -> Tensor:
    """(num_steps + 1,) float32 times from 1 down to 0, evenly spaced and rounded to the
    1/T grid: diffusers' "trailing" spacing (which starts at the last training step, where
    "leading" would never start from pure noise). Step i goes from times[i] to times[i+1]."""
    T = schedule.num_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, num_timesteps={T}], got {num_steps}")
    steps = np.round(T - np.arange(num_steps) * (T / num_steps))  # diffusers trailing, + 1
    return torch.from_numpy(np.append(steps, 0.0) / T).to(torch.float32)


def ddpm_step(
    schedule: DDPMSchedule,
    x_t: Tensor,
    prediction: Tensor,
    t: Tensor | float,
    t_prev: Tensor | float,
    generator: torch.Generator,
) -> Tensor:
    """One ancestral DDPM step t -> t_prev < t: a draw from q(x_prev | x_t, x0_hat) with
    the posterior variance ("fixed_small"), as diffusers' DDPMScheduler.step without
    clipping. The noise comes from `generator` (on its device); none is added at t_prev = 0."""
    if not isinstance(schedule, DDPMSchedule):
        raise TypeError(f"ddpm_step needs a DDPMSchedule, got {type(schedule).__name__}; use flow_step or ddim_step")
    dtype = _compute_dtype(x_t)
    alpha_bar = _broadcast(schedule.alpha_bar(t, dtype=dtype, device=x_t.device), x_t)
    alpha_bar_prev = _broadcast(schedule.alpha_bar(t_prev, dtype=dtype, device=x_t.device), x_t)
    alpha = alpha_bar / alpha_bar_prev
    beta = 1.0 - alpha
    x0 = schedule.predict_x0(x_t, prediction, t).to(dtype)
    mean = (alpha_bar_prev.sqrt() * beta * x0 + alpha.sqrt() * (1.0 - alpha_bar_prev) * x_t) / (1.0 - alpha_bar)
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta  # 0 where t_prev = 0
    noise = torch.randn(x_t.shape, generator=generator, device=generator.device, dtype=x_t.dtype).to(x_t.device)
    return (mean + variance.sqrt() * noise).to(x_t.dtype)


def ddim_step(schedule: Schedule, x_t: Tensor, prediction: Tensor, t: Tensor | float, t_prev: Tensor | float) -> Tensor:
    """One deterministic DDIM step (eta = 0): re-noise the predicted x0 with the predicted
    noise to t_prev. For ddpm this is diffusers' DDIMScheduler.step; for flow it equals
    the Euler step."""
    x0 = schedule.predict_x0(x_t, prediction, t)
    noise = schedule.predict_noise(x_t, prediction, t)
    return schedule.add_noise(x0, noise, t_prev)


def flow_step(x_t: Tensor, velocity: Tensor, t: Tensor | float, t_prev: Tensor | float) -> Tensor:
    """One Euler step of the flow ODE dx/dt = velocity, from t to t_prev."""
    dt = _broadcast(_time(t_prev, x_t) - _time(t, x_t), x_t)
    return (x_t + dt * velocity).to(x_t.dtype)


# --- helpers -------------------------------------------------------------------------------

def _betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """float64 betas (T,), as diffusers computes them."""
    if schedule == "cosine":
        # Nichol & Dhariwal's squared cosine with s = 0.008, betas capped at 0.999
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999) for i in range(num_timesteps)]
        )
    # DDPM's 1e-4 .. 0.02 at 1000 steps, scaled to keep the same total noise at other T
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: the schedule arithmetic never runs in bf16."""
    return torch.promote_types(x.dtype, torch.float32)


def _time(t: Tensor | float, x: Tensor) -> Tensor:
    return torch.as_tensor(t, device=x.device).to(_compute_dtype(x))


def _broadcast(values: Tensor, x: Tensor) -> Tensor:
    """(n,) per-row values -> (n, 1, ..., 1) against x (n, ...); a 0-dim value stays as is, and so does
    one of x's rank (per-element times, e.g. `patch_map`'s (n, 1, h, w)), which must broadcast to x."""
    if values.ndim == 0:
        return values
    if values.ndim == x.ndim and values.ndim > 1:
        torch.broadcast_shapes(values.shape, x.shape)  # raises when they do not fit
        return values
    if values.shape != x.shape[:1]:
        raise ValueError(f"t has shape {tuple(values.shape)}; expected ({x.shape[0]},) or one time for all rows")
    return values.reshape(values.shape + (1,) * (x.ndim - 1))
