"""CM3 causal masking (Aghajanyan et al. 2022; the CM3Leon objective): move a few spans
of a document to its end, so a left-to-right model also learns to infill.

A transformed document, with spans "b c" and the image I (sentinels numbered in
document order):

    before:  a b c d e [I] f g
    after:   a <mask:0> d e <mask:1> f g <mask:0> b c <mask:1> [I]

Each span is a contiguous, non-empty piece of one text segment (start and length
uniform within a free piece of it) or one whole image segment: never across a segment
boundary, so never across an image or a document, and images are never cut. The number
of spans is Poisson(1) clamped to [1, max_spans]; spans never overlap. Only segments
with loss=True are masked, and the moved content keeps loss=True. Every sentinel is a
loss=False text segment, so the model is never trained to predict a sentinel (it cannot
know where one goes), only what follows it.

Sentinel ids come from the Vocab; the transform works on `Segment` lists, before the
pipeline flattens them. It is a pure function of its inputs and the numpy Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixmodal.data.segments import Segment
from mixmodal.vocab import NUM_MASK_SENTINELS, Vocab


@dataclass
class CM3Config:
    rate: float = 0.0  # probability that a document is transformed at all
    max_spans: int = 3  # spans per document: Poisson(1) clamped to [1, max_spans]
    mask_images: bool = True  # a span may be a whole image segment

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        if not 1 <= self.max_spans <= NUM_MASK_SENTINELS:
            raise ValueError(
                f"max_spans must be in [1, {NUM_MASK_SENTINELS}] (the vocabulary has "
                f"{NUM_MASK_SENTINELS} mask sentinels), got {self.max_spans}"
            )


def cm3_transform(
    segments: list[Segment],
    vocab: Vocab,
    rng: np.random.Generator,
    config: CM3Config,
) -> list[Segment]:
    """The document with its masked spans moved to the end (a new list), or `segments`
    itself when it is not transformed (probability 1 - rate, or nothing to mask)."""
    if config.rate <= 0.0 or rng.random() >= config.rate:
        return segments
    num_spans = min(max(int(rng.poisson(1.0)), 1), config.max_spans)

    def maskable(segment: Segment) -> bool:
        if not segment.loss:
            return False
        return bool(segment.ids) if segment.kind == "text" else config.mask_images

    # free pieces (segment index, start, stop); an image is one piece, taken whole
    free = [(i, 0, len(s.ids)) for i, s in enumerate(segments) if maskable(s)]
    spans: list[tuple[int, int, int]] = []
    while free and len(spans) < num_spans:
        i, start, stop = free.pop(int(rng.integers(len(free))))
        if segments[i].kind == "image":
            spans.append((i, start, stop))
            continue
        length = int(rng.integers(1, stop - start + 1))
        first = start + int(rng.integers(0, stop - start - length + 1))
        spans.append((i, first, first + length))
        free += [piece for piece in ((i, start, first), (i, first + length, stop)) if piece[2] > piece[1]]
    if not spans:
        return segments
    spans.sort()  # sentinel k is the k-th span in reading order

    def sentinel(k: int) -> Segment:
        return Segment("text", [vocab.mask(k)], loss=False)

    spans_in: dict[int, list[tuple[int, int, int]]] = {}
    for k, (i, first, stop) in enumerate(spans):
        spans_in.setdefault(i, []).append((first, stop, k))
    out: list[Segment] = []
    for i, segment in enumerate(segments):
        if i not in spans_in:
            out.append(segment)
        elif segment.kind == "image":
            out.append(sentinel(spans_in[i][0][2]))
        else:
            cursor = 0
            for first, stop, k in spans_in[i]:
                if first > cursor:
                    out.append(Segment("text", segment.ids[cursor:first], loss=segment.loss))
                out.append(sentinel(k))
                cursor = stop
            if cursor < len(segment.ids):
                out.append(Segment("text", segment.ids[cursor:], loss=segment.loss))
    for k, (i, first, stop) in enumerate(spans):
        segment = segments[i]
        out.append(sentinel(k))
        out.append(segment if segment.kind == "image" else Segment("text", segment.ids[first:stop], loss=True))
    return out
