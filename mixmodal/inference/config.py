"""What a generation may do: the output mode, lengths, sampling per modality, guidance, CD-K.

A `GenerationConfig` is a plain dataclass like every config in mixmodal, so it reads
from YAML / key=value overrides (`mixmodal generate ... text.temperature=0.7`). Each
sequence of a batch may carry its own.

    mode         text         text only; <boi> is never sampled (a captioning answer)
                 image        images only: <boi> is forced first, after each <eoi> only
                              <boi> or <eos> may follow
                 interleaved  text and images, and <eos> is forbidden until the output
                              holds at least one text token and one image
                 free         whatever the model writes (CM3 sentinels included)
    max_images   images the output may hold; at the limit <boi> is masked
    max_new_tokens  positions written (text tokens + image positions + <boi>/<eoi>);
                 an image is only begun if it fits whole, within this and the context
    text / image SamplingParams per modality (temperature 0 = greedy)
    guidance     classifier-free guidance, applied to image positions (code logits in
                 token mode, the noise/velocity prediction in latent mode), and to text
                 too when `guidance.text` is set
    contrastive  CD-K for image codes (token mode; CM3Leon): expert = the conditional
                 stream, amateur = the unconditional one
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["text", "image", "interleaved", "free"]
MODES: tuple[str, ...] = ("text", "image", "interleaved", "free")


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus; 1.0 = off
    repetition_penalty: float = 1.0  # CTRL-style on ids already in the sequence; 1.0 = off

    def __post_init__(self) -> None:  # written so that NaN fails every check
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")


@dataclass
class GuidanceConfig:
    """out = uncond + scale * (cond - uncond)                                   (two streams)
    out = uncond + image_scale * (image - uncond) + scale * (cond - image)     (three streams)

    cond: the whole prompt. uncond: the prompt's text and images removed ("empty": only
    <bos> is left) or each text run replaced by the mask token and the images removed
    ("mask", CM3Leon). image (three streams, InstructPix2Pix): the prompt's images kept,
    its text removed or masked. Tokens generated so far go to every stream."""

    scale: float = 1.0  # text-conditioning scale; 1.0 with image_scale unset = no guidance
    image_scale: float | None = None  # set: three streams (editing)
    uncond: Literal["empty", "mask"] = "empty"
    text: bool = False  # guide text tokens as well as images
    # latent mode: guide only while lo < t <= hi (t = 1 is noise, 0 clean), elsewhere take the
    # conditional prediction (guidance interval, Kynkaanniemi et al. 2024); None = every step
    interval: list[float] | None = None
    # codes (and guided text): only ids whose conditional probability is at least plausibility x the most
    # probable id's are candidates for the guided scores (the adaptive plausibility constraint of contrastive
    # decoding, Li et al. 2023): guidance then re-ranks what the prompt allows and cannot promote an id the
    # conditional model rules out (a fourth star for "three stars"); 0 = off
    plausibility: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.plausibility, (int, float)) and 0.0 <= self.plausibility < 1.0):
            raise ValueError(f"guidance.plausibility must be in [0, 1) (0 = off), got {self.plausibility!r}")
        self.plausibility = float(self.plausibility)
        if self.interval is not None:
            lo_hi = list(self.interval)
            if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lo_hi) \
                    or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
                raise ValueError(f"guidance.interval must be [lo, hi] with 0 <= lo < hi <= 1 (times, 1 = noise), "
                                 f"got {self.interval!r}")
            self.interval = [float(v) for v in lo_hi]
        if self.uncond not in ("empty", "mask"):
            raise ValueError(f"guidance.uncond must be 'empty' or 'mask', got {self.uncond!r}")
        for name in ("scale", "image_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"guidance.{name} must be a finite number >= 0 (1 = no guidance), got {value}")

    @property
    def streams(self) -> int:
        if self.image_scale is not None:
            return 3
        return 1 if self.scale == 1.0 else 2


@dataclass
class ContrastiveConfig:
    """CD-K (CM3Leon): candidates are the codes with p_expert >= alpha * (k-th largest
    p_expert); among them the next code is drawn from softmax((log p_expert - log p_amateur)
    / image temperature), or taken greedily at temperature 0."""

    alpha: float = 0.5
    k: int = 5

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"contrastive.alpha must be in (0, 1], got {self.alpha}")
        if self.k < 1:
            raise ValueError(f"contrastive.k must be >= 1, got {self.k}")


@dataclass
class GenerationConfig:
    mode: Mode = "interleaved"
    max_new_tokens: int = 512
    max_images: int = 1
    text: SamplingParams = field(default_factory=SamplingParams)
    image: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)  # stop strings (searched in the generated text)
    ignore_eos: bool = False  # never end on <eos> (benchmarks: always max_new_tokens)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    contrastive: ContrastiveConfig | None = None
    diffusion_steps: int = 50  # latent mode
    sampler: Literal["auto", "ddpm", "ddim", "flow"] = "auto"  # auto: ddim for a DDPM model, flow (Euler) for a flow model
    preview_every: int = 0  # latent mode: an ImagePreview event every n denoising steps (0 = none)
    # latent mode: denoise the image in this many turns (MAR-like): each turn walks the whole time grid over the
    # patches not yet committed, given the committed ones clean, then commits the next of the groups a random
    # order splits the patches into and re-noises the rest. 1 = all patches at once (Transfusion). More than 1
    # needs a model trained with diffusion.clean_patches > 0; it costs patch_groups x diffusion_steps forwards
    patch_groups: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {self.max_images}")
        if self.mode == "image" and self.max_images < 1:
            raise ValueError("mode=image needs max_images >= 1")
        if self.diffusion_steps < 1:
            raise ValueError(f"diffusion_steps must be >= 1, got {self.diffusion_steps}")
        if self.patch_groups < 1:
            raise ValueError(f"patch_groups must be >= 1 (1 = every patch at once), got {self.patch_groups}")
        if self.sampler not in ("auto", "ddpm", "ddim", "flow"):
            raise ValueError(f"sampler must be auto, ddpm, ddim or flow; got {self.sampler!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def streams(self) -> int:
        """Model rows this sequence needs: CD-K needs the amateur (unconditional) stream."""
        return max(self.guidance.streams, 2 if self.contrastive is not None else 1)


# A model's image_sampling (generation.yaml; the eval suite's fields) as GenerationConfig keys: the defaults
# `mixmodal generate` starts from for that model (cdk has no key: it is a choice of sampler, made explicitly)
IMAGE_SAMPLING_KEYS = {"cfg": "guidance.scale", "image_temperature": "image.temperature", "image_top_k": "image.top_k",
                       "image_top_p": "image.top_p", "diffusion_steps": "diffusion_steps",
                       "guidance_interval": "guidance.interval", "plausibility": "guidance.plausibility",
                       "patch_groups": "patch_groups"}


def image_sampling_overrides(image_sampling: dict | None) -> list[str]:
    """`key=value` overrides of GenerationConfig from a model's image_sampling (unknown fields ignored)."""
    out = []
    for field_name, key in IMAGE_SAMPLING_KEYS.items():
        value = (image_sampling or {}).get(field_name)
        if value is not None:
            out.append(f"{key}={list(value) if isinstance(value, (list, tuple)) else value}")
    return out


__all__ = ["IMAGE_SAMPLING_KEYS", "MODES", "ContrastiveConfig", "GenerationConfig", "GuidanceConfig", "Mode", "SamplingParams",
           "image_sampling_overrides"]
