"""Prompts: a string, a Document, or a list of strings and images -> the segments of each stream.

A prompt is laid out by data/layout.py, as a training document is, without `<eos>`:

    <bos> text ids <boi> IMAGE <eoi> text ids ...

IMAGE is the image's code ids (token mode) or one placeholder per latent patch whose
vectors the model writes from the clean latents (latent mode). Guidance needs the same
prompt with its conditioning taken away (config.GuidanceConfig): `stream_segments` makes
those variants from the encoded segments (layout.unconditional, the function training's
conditioning dropout uses), so the images are encoded once.

How a PIL image becomes tokenizer input is the model's pixel convention (generation.yaml
`image_preprocessing`, tokenizers/pixels.py): mixmodal's (RGB, centre-crop, bicubic) for a
native model, Meta's (white-blended transparency, LANCZOS on the shortest side, centre-crop)
for a converted Chameleon.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import PIL.Image
import torch

from mixmodal.data.bad_input import BadInputError, BadInputLog
from mixmodal.data.images import decode_image
from mixmodal.data.layout import encode_document, lay_out, unconditional
from mixmodal.data.segments import Segment
from mixmodal.documents import Document, Image, Text
from mixmodal.inference.config import GuidanceConfig
from mixmodal.tokenizers.image import tokenizer_device
from mixmodal.tokenizers.pixels import pixel_convention
from mixmodal.vocab import Vocab

PromptLike = Union[str, Document, Sequence[Union[str, PIL.Image.Image, Text, Image]]]


class PromptError(ValueError):
    """A prompt that cannot be generated from; the message says what to change."""


def to_document(prompt: PromptLike, image_preprocessing: str = "mixmodal") -> Document:
    """A prompt as a Document; a PIL image becomes RGB by the pixel convention (mixmodal's
    `convert("RGB")`, or Meta's white blend of transparency for a converted Chameleon)."""
    to_rgb = pixel_convention(image_preprocessing).to_rgb
    if isinstance(prompt, Document):
        return prompt
    if isinstance(prompt, str):
        return Document([Text(prompt)] if prompt else [])
    parts = []
    for item in prompt:
        if isinstance(item, (Text, Image)):
            parts.append(item)
        elif isinstance(item, str):
            parts.append(Text(item))
        elif isinstance(item, PIL.Image.Image):
            parts.append(Image(to_rgb(item)))
        else:
            raise PromptError(f"a prompt part must be a str or a PIL image, got {type(item).__name__}")
    return Document(parts)


def load_prompt_image(path: str | os.PathLike) -> Image:
    """Read an image file for a prompt, with the message a user can act on when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"--image {path}: no such file")
    try:
        image = decode_image(None, str(path), log=BadInputLog(strict=True), where=f"--image {path}")
    except BadInputError as e:
        raise PromptError(f"{e}; give a readable PNG or JPEG file") from None
    return Image(image, origin=str(path))


@dataclass
class EncodedPrompt:
    segments: list[Segment]  # text ids, or an image (ids = code ids in token mode)
    latents: list[torch.Tensor]  # latent mode: scaled latents [C, h, w] of each image, by Segment.image


@torch.no_grad()
def encode_prompt(doc: Document, text_tokenizer, image_tokenizer, vocab: Vocab, mode: str,
                  chat_template: str | None = None, image_preprocessing: str = "mixmodal") -> EncodedPrompt:
    """A prompt's segments; a conversation (metadata "turns") in `chat_template` (None: plainly);
    images become tokenizer input by `image_preprocessing` (tokenizers/pixels.py)."""
    pils = [p.image for p in doc.parts if isinstance(p, Image)]
    contents: list[torch.Tensor] = []
    if pils:
        if image_tokenizer is None:
            raise PromptError("the prompt has images but the checkpoint has no image tokenizer")
        device = tokenizer_device(image_tokenizer)
        pixels = pixel_convention(image_preprocessing).to_tensor(pils, image_tokenizer.config.resolution).to(device)
        if mode == "tokens":
            contents = list(vocab.image_code_to_id(image_tokenizer.encode(pixels).flatten(1)).cpu())
        else:
            contents = list(image_tokenizer.scale_latents(image_tokenizer.encode(pixels)).float().cpu())
    encoded = encode_document(doc, text_tokenizer, contents, mode, vocab=vocab, add_generation_prompt=True,
                              chat_template=chat_template)
    return EncodedPrompt(encoded.segments, contents if mode == "latents" else [])


def stream_segments(segments: list[Segment], guidance: GuidanceConfig, streams: int, vocab: Vocab) -> list[list[Segment]]:
    """The prompt of each guidance stream: [cond], [cond, uncond] or [cond, image-only, uncond]."""
    if streams == 1:
        return [segments]
    uncond = unconditional(segments, guidance.uncond, vocab, keep_images=False)
    if streams == 2:
        return [segments, uncond]
    return [segments, unconditional(segments, guidance.uncond, vocab, keep_images=True), uncond]


def prompt_ids(segments: list[Segment], vocab: Vocab, mode: str, positions_per_image: int, *,
               eos: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """Segments -> ids from <bos> (layout.lay_out), and (start position, image number) of each image."""
    flat, _ = lay_out(segments, vocab, mode, positions_per_image, eos=eos)
    if flat is None:  # a retrieved document with nothing in it
        return [], []
    return flat.ids, [(start, image) for start, _, image in flat.images]


__all__ = ["EncodedPrompt", "PromptError", "PromptLike", "encode_prompt", "load_prompt_image", "prompt_ids",
           "stream_segments", "to_document"]
