"""Segment: one run of a tokenized document, text or one image, before it is flattened.

A tokenized document is a list of segments in reading order. Transforms that work on
whole images or on text only (the CM3 causal masking in cm3.py) edit this list; the
pipeline then flattens it into one sequence, wrapping each image segment in
`<boi> ... <eoi>`, and gives no loss to a position whose target comes from a segment
with loss=False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class Segment:
    """kind "text": ids are token ids. kind "image": `image` indexes the document's image
    list; ids are the image's vocabulary ids in token mode (codes already offset into the
    shared vocabulary) and empty in latent mode. loss: whether its tokens are targets."""

    kind: Literal["text", "image"]
    ids: list[int]
    image: int = -1
    loss: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("text", "image"):
            raise ValueError(f"segment kind must be 'text' or 'image', got {self.kind!r}")
        if self.kind == "image" and self.image < 0:
            raise ValueError(f"an image segment needs the index of its image in the document, got image={self.image}")
