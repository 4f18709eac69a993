"""The one sequence layout of mixmodal, shared by training and generation.

A document is laid out as

    <bos> text ids <boi> IMAGE <eoi> text ids ... <eos>

IMAGE is the image's N code ids (token mode; ids of the shared vocabulary) or N
placeholder positions, one per latent patch (latent mode; the model writes the patch
vectors there). Positions count from 0 at `<bos>`.

Everything that turns documents into ids goes through this module:

- training rows (data/pipeline.py): `encode_document`, the per-document transforms
  (`order_caption`, `drop_conditioning`, CM3), then `lay_out(..., eos=True)`, packed;
- prompts (inference/prompt.py and the engine): `lay_out(..., eos=False)`. A prompt is
  therefore a prefix of the training layout of the document it begins, ids and positions;
- retrieved documents (retrieval augmentation, in training and at `--retrieve`): each laid
  out whole with `<eos>` and joined in front of the document (`join_flats`);
- guidance: the unconditional stream's prompt is `unconditional(segments, ...)`, and
  training's conditioning dropout (`drop_conditioning`) removes a document's prompt with
  the same function, so the stream CFG extrapolates from is trained on exactly what
  generation feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mixmodal.data.chat import chat_segments, turns_of
from mixmodal.data.segments import Segment
from mixmodal.documents import Document, Image, Text
from mixmodal.vocab import Vocab

UNCONDITIONAL = ("empty", "mask")  # what replaces the conditioning text: nothing, or one <mask:0> per text run


@dataclass
class Encoded:
    """One tokenized document: segments, plus its images' latents (latent mode)."""

    index: int
    segments: list[Segment]
    latents: torch.Tensor | None = None  # [n_images, C, h, w]
    keep_order: bool = False  # the document's order is its meaning (metadata keep_order): never reorder it
    chat: bool = False  # a conversation (data/chat.py): loss on assistant turns only, no dropout or CM3


@dataclass
class Flat:
    """One document laid out as a sequence: what training packs and generation prefills."""

    index: int
    ids: list[int]
    targets_ok: list[bool]  # may this token be a prediction target
    images: list[tuple[int, int, int]]  # (start position, length, image number in the document)
    limited: list[bool]  # per image: no text before it (noise limiting applies)
    latents: torch.Tensor | None
    weights: list[float] | None = None  # per token: loss weight when it is a target (None: all 1)
    image_loss: list[bool] | None = None  # per image: is it a target (None: all are); latents: else fed clean
    read: list[bool] | None = None  # per image: a text target follows it (a caption or answer reads it; None: none)
    positions: list[int] | None = None  # per token: its RoPE position (None: 0, 1, 2, ...; pipeline.position_gap)


def encode_document(doc: Document, text_tokenizer, contents: Sequence[torch.Tensor], mode: str,
                    index: int = -1, vocab: Vocab | None = None, add_generation_prompt: bool = False,
                    chat_template: str | None = "mixmodal") -> Encoded:
    """A document's parts -> segments. `contents`: its images already encoded, in order: code
    ids [N] in the shared vocabulary (tokens) or scaled latents [C, h, w] (latents). A
    conversation (metadata "turns", data/chat.py) gets `chat_template`, which needs `vocab`
    (None: its parts are laid out plainly, for a model never tuned to chat); `add_generation_prompt`
    ends it with the reply's opening (a prompt)."""
    per_part, latents = [], []
    images = iter(contents)
    for part in doc.parts:
        if isinstance(part, Text):
            ids = text_tokenizer.encode(part.text)
            per_part.append([Segment("text", list(ids))] if ids else [])
        elif isinstance(part, Image):
            content = next(images)
            per_part.append([Segment("image", content.tolist() if mode == "tokens" else [], image=len(latents))])
            latents.append(content)
    stacked = torch.stack(latents) if mode == "latents" and latents else None
    turns = turns_of(doc.metadata, len(doc.parts), f"document {doc.id or index}: metadata")
    if turns is None or chat_template is None:
        segments = [s for segs in per_part for s in segs]
        return Encoded(index, segments, stacked, keep_order=bool(doc.metadata.get("keep_order", False)))
    if vocab is None:
        raise ValueError("a conversation document needs the vocabulary for its role tokens; pass vocab=")
    segments = chat_segments(per_part, turns, vocab, add_generation_prompt=add_generation_prompt,
                             template=chat_template)
    return Encoded(index, segments, stacked, keep_order=True, chat=True)


def order_caption(segments: list[Segment], rng: np.random.Generator, caption_first_prob: float) -> list[Segment]:
    """A one-text-one-image document: caption first with probability caption_first_prob."""
    if len(segments) != 2 or {s.kind for s in segments} != {"text", "image"}:
        return segments
    text, image = (segments if segments[0].kind == "text" else segments[::-1])
    return [text, image] if rng.random() < caption_first_prob else [image, text]


def unconditional(segments: Sequence[Segment], uncond: str, vocab: Vocab, keep_images: bool) -> list[Segment]:
    """The segments with their conditioning taken away: text runs removed ("empty") or each
    replaced by one `<mask:0>` ("mask", CM3Leon); images kept or removed."""
    if uncond not in UNCONDITIONAL:
        raise ValueError(f"uncond must be one of {', '.join(UNCONDITIONAL)}; got {uncond!r}")
    out: list[Segment] = []
    for seg in segments:
        if seg.kind == "image":
            if keep_images:
                out.append(seg)
        elif uncond == "mask" and not (out and out[-1].ids == [vocab.mask(0)]):
            out.append(Segment("text", [vocab.mask(0)], loss=False))
    return out


def drop_conditioning(segments: list[Segment], uncond: str, vocab: Vocab) -> list[Segment] | None:
    """Conditioning dropout (Transfusion drops 10% of captions): the text before a document's
    first image, its prompt, replaced as the unconditional guidance stream replaces a prompt,
    then that image and nothing after it. What followed the image answered the dropped prompt
    (VQA's "Answer: yes" to a question no longer there; a story's next line): kept, it taught a
    bare picture to be followed by an answer, and 6 in 100 greedy captions began "Answer:".
    None when no text precedes an image (nothing conditions it)."""
    first = next((i for i, s in enumerate(segments) if s.kind == "image"), None)
    if not first:  # no image, or an image first
        return None
    return unconditional(segments[:first], uncond, vocab, keep_images=False) + [segments[first]]


def drop_chat_conditioning(segments: list[Segment], uncond: str, vocab: Vocab, keep_images: bool) -> list[Segment] | None:
    """Conditioning dropout for a conversation whose reply draws an image (InstructPix2Pix drops the
    instruction, the input image, or both): everything before the first image the assistant draws,
    replaced as the engine's unconditional (`keep_images` False) or image-only (True) guidance stream
    replaces a chat prompt, then that image. None when the assistant draws no image."""
    first = next((i for i, s in enumerate(segments) if s.kind == "image" and s.loss), None)
    if first is None:
        return None
    return unconditional(segments[:first], uncond, vocab, keep_images=keep_images) + [segments[first]]


def lay_out(segments: Sequence[Segment], vocab: Vocab, mode: str, positions_per_image: int, *,
            max_len: int | None = None, eos: bool = True, index: int = -1,
            latents: torch.Tensor | None = None) -> tuple[Flat | None, str]:
    """Segments -> the sequence from `<bos>` (and `<eos>` when `eos`). Cut at a part boundary to
    fit `max_len` positions. Returns (flat or None, "" | "truncated" | "dropped")."""
    ids, ok, images, limited, image_loss, read = [vocab.bos], [False], [], [], [], []
    seen_text = False
    status = ""
    reserve = 1 if eos else 0
    for seg in segments:
        room = (max_len - reserve - len(ids)) if max_len is not None else None
        if seg.kind == "text":
            take = seg.ids if room is None else seg.ids[: max(room, 0)]
            if len(take) < len(seg.ids):
                status = "truncated"
            ids += take
            ok += [seg.loss] * len(take)
            seen_text = seen_text or bool(take)
            if seg.loss and take:
                read = [True] * len(read)
            if status:
                break
            continue
        n = positions_per_image
        if room is not None and room < n + 2:
            status = "truncated"
            break
        content = seg.ids if mode == "tokens" else [vocab.pad] * n
        if len(content) != n:
            raise ValueError(f"an image has {len(content)} codes but the model expects {n} per image; "
                             "the image tokenizer does not match model.image.grid_size")
        ids.append(vocab.boi)
        ok.append(seg.loss)
        images.append((len(ids), n, seg.image))
        limited.append(not seen_text)
        read.append(False)
        image_loss.append(seg.loss)
        ids += content
        ok += [seg.loss and mode == "tokens"] * n
        ids.append(vocab.eoi)
        ok.append(seg.loss and mode == "tokens")
    if eos:
        if len(ids) == 1:
            return None, "dropped"
        ids.append(vocab.eos)
        ok.append(True)
    chosen = None
    if mode == "latents" and images and latents is not None:
        chosen = latents[torch.tensor([im for _, _, im in images])]
    return Flat(index, ids, ok, images, limited, chosen, image_loss=None if all(image_loss) else image_loss,
                read=read), status


def cut_to_turn(flat: Flat, vocab: Vocab) -> Flat | None:
    """A conversation cut to fit a row ends after its last whole assistant turn (its `<|end|>`, a
    target), then `<eos>`: packing never splits a turn, nor keeps a question without its answer.
    None when not even the first exchange fits."""
    ends = [i for i, t in enumerate(flat.ids) if t == vocab.end_of_turn and flat.targets_ok[i]]
    if not ends:
        return None
    n = ends[-1] + 1
    keep = [k for k, (start, length, _) in enumerate(flat.images) if start + length < n]
    latents = flat.latents[torch.tensor(keep, dtype=torch.long)] if flat.latents is not None and keep else None
    image_loss = [flat.image_loss[k] for k in keep] if flat.image_loss is not None else None
    return Flat(flat.index, flat.ids[:n] + [vocab.eos], flat.targets_ok[:n] + [True], [flat.images[k] for k in keep],
                [flat.limited[k] for k in keep], latents,
                None if flat.weights is None else flat.weights[:n] + [flat.weights[n - 1]],
                None if image_loss is None or all(image_loss) else image_loss,
                None if flat.read is None else [flat.read[k] for k in keep])


def join_flats(parts: Sequence[Flat], weights: Sequence[float]) -> Flat:
    """Documents laid out back to back as one attention segment (retrieved documents, then
    the document itself); the last part's index names the result."""
    ids, ok, images, limited, latents, w, image_loss, read = [], [], [], [], [], [], [], []
    for part, weight in zip(parts, weights):
        read += part.read or [False] * len(part.images)
        images += [(start + len(ids), n, im) for start, n, im in part.images]
        image_loss += part.image_loss or [True] * len(part.images)
        ids += part.ids
        ok += part.targets_ok
        limited += part.limited
        w += [weight] * len(part.ids)
        if part.latents is not None:
            latents.append(part.latents)
    return Flat(parts[-1].index, ids, ok, images, limited, torch.cat(latents) if latents else None, w,
                None if all(image_loss) else image_loss, read)


__all__ = ["Encoded", "Flat", "UNCONDITIONAL", "cut_to_turn", "drop_chat_conditioning", "drop_conditioning", "encode_document", "join_flats", "lay_out",
           "order_caption", "unconditional"]
