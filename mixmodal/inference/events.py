"""What `Engine.stream` yields while sequences are written. `index` is the sequence's
position in the batch; `image` counts the images of that sequence's output from 0."""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image
import torch

from mixmodal.documents import Document


@dataclass
class TextDelta:
    index: int
    text: str


@dataclass
class ImageStarted:
    index: int
    image: int


@dataclass
class ImagePreview:
    """Latent mode, every `preview_every` steps: the decoded current estimate of the clean image."""

    index: int
    image: int
    step: int
    num_steps: int
    preview: PIL.Image.Image


@dataclass
class ImageDone:
    index: int
    image: int
    pil: PIL.Image.Image | None  # None when the engine does not decode images
    content: torch.Tensor  # codes [h, w] (tokens) or scaled latents [C, h, w] (latents)


@dataclass
class GenerationResult:
    """One finished sequence: the document and the raw ids / image contents behind it."""

    index: int
    document: Document
    ids: list[int]  # every generated position: text ids, <boi>/<eoi>, codes or latent placeholders
    images: list[torch.Tensor] = field(default_factory=list)  # per image: codes [h, w] or scaled latents [C, h, w]
    finish_reason: str = ""  # eos | stop | length
    score: float | None = None  # set by best_of's scorer


@dataclass
class End:
    index: int
    result: GenerationResult


Event = TextDelta | ImageStarted | ImagePreview | ImageDone | End

__all__ = ["End", "Event", "GenerationResult", "ImageDone", "ImagePreview", "ImageStarted", "TextDelta"]
