"""Documents -> token sequences -> packed training rows, resumable exactly.

One document becomes `<bos> text ids <boi> IMAGE <eoi> text ids ... <eos>`, laid out by
data/layout.py, the module generation lays prompts out with. Per-document transforms run
first, each drawing from a random stream seeded by (seed, rank, document index), so a
document is transformed the same way whatever came before it and however the run was resumed:
  - caption order: a document of one text and one image is put caption-first with
    probability `caption_first_prob` (Transfusion: 0.8), image-first otherwise (documents
    marked `keep_order` in their metadata are left as they are);
  - conditioning dropout: with probability `cond_dropout` the text before a document's first
    image is removed (`uncond: empty`) or replaced by `<mask:0>` (`uncond: mask`), exactly as
    the unconditional guidance stream's prompt is made (layout.unconditional), and what followed
    the first image (the dropped question's answer) goes too; such a document gets no retrieved
    context, no CM3 and no noise limiting, since at generation the unconditional stream predicts
    the image at every noise level, and no loss on its final `<eos>` (an artefact of the
    dropout, not a caption's end);
  - CM3 causal masking (data/cm3.py) on a fraction `cm3.rate` of documents.
A conversation (data/chat.py) keeps its order and gets no CM3; its conditioning dropout keeps
only the first image the assistant draws, after what the engine's unconditional stream (or,
half the time, the image-only stream: the input images kept) is fed for a chat prompt.

Retrieval augmentation (CM3Leon / RA-CM3; an `augmenter`, mixmodal/retrieval/augment.py):
each document is preceded by the documents retrieved for it, in one attention segment,

    <bos> retrieved 1 <eos> <bos> retrieved 2 <eos> <bos> document <eos>

with continuous positions (in training with `position_gap`, a random gap after each image: below).
Retrieved documents get the caption-order transform (not CM3)
and a loss weight `alpha` (1: loss on every token; RA-CM3 uses 0.1): the batch then
carries `loss_weights` [B, T] (the weight of each label) and, in latent mode,
`image_weights` [N]. Retrieved documents that do not fit in the row with the document
are dropped, least relevant first (counted). Retrieval runs per chunk of `encode_batch`
documents; chunks start at multiples of `encode_batch`, also after a resume, so every
document is retrieved in the same company (bitwise the same embeddings) either way.

Rows of `seq_len` are filled greedily with whole documents; a document that does not
fit ends the row (the rest is padding) and starts the next. A document longer than a
row is cut at a part boundary (counted as truncated), a conversation at its last whole
turn (layout.cut_to_turn); one whose first image (or turn) alone does not fit is dropped
(counted). Targets (`labels`, already shifted: labels[t] is the id
at t+1) are -100 for padding, for latent placeholders and the `<eoi>` that always
follows them (the engine forces it), and for tokens of segments marked loss=False (the
CM3 sentinels; in a conversation, everything but the assistant's turns: data/chat.py).

`position_gap` G > 0 (training only): after each image's <eoi>, the RoPE positions of the rest of the
document move on by a random 0..G, drawn from the document's own stream (so a resumed run draws the same
gaps). Pretraining otherwise puts a caption or an answer right after the picture it reads, and a model
learns to find an object's cell by its distance; in a conversation the user's words stand between them.

A batch is a dict of tensors:
    input_ids, labels, positions, document_ids, image_ids   [B, T]
    image_latents [N, C, h, w]  clean scaled VAE latents      (latent mode)
    image_index   [N, P]        flat positions b * T + t      (latent mode)
    image_limited [N] bool      image precedes all text of its document (noise limiting)
    image_read    [N] bool      a text target of its document follows it (diffusion.noise_limit_read)
    image_loss    [N] bool      image is a target; False (a user's image in a conversation):
                                fed clean, no diffusion loss           (latent mode)
Its state is the index of the first document of the next row: resuming restarts the
source there (the shapes world jumps; other sources are re-read and skipped).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mixmodal.data.cm3 import CM3Config, cm3_transform
from mixmodal.data.layout import (UNCONDITIONAL, Encoded, Flat, cut_to_turn, drop_chat_conditioning, drop_conditioning,
                                  encode_document, join_flats, lay_out, order_caption)
from mixmodal.documents import Document, Image
from mixmodal.tokenizers.pixels import pixel_convention
from mixmodal.vocab import Vocab

IGNORE = -100


@dataclass
class PipelineConfig:
    seq_len: int = 512  # positions per packed row
    caption_first_prob: float = 0.8  # one-text-one-image documents: P(caption before image)
    # Conditioning dropout (Transfusion: 0.1): the share of documents whose text before the first
    # image is removed ("empty") or masked ("mask"), as guidance's unconditional stream removes it.
    cond_dropout: float = 0.0
    uncond: str = "empty"
    cm3: CM3Config = field(default_factory=CM3Config)
    encode_batch: int = 64  # documents whose images are encoded together
    # Training only: after each image, the RoPE positions of the rest of its document move on by a random
    # 0..position_gap, so the distance between a picture and the text that reads it varies as it does in a
    # conversation, where the user's words stand between them (benchmarks/study/reading_gap.py). 0: off.
    position_gap: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8, got {self.seq_len}")
        if not 0.0 <= self.caption_first_prob <= 1.0:
            raise ValueError(f"caption_first_prob must be in [0, 1], got {self.caption_first_prob}")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if self.uncond not in UNCONDITIONAL:
            raise ValueError(f"uncond must be one of {', '.join(UNCONDITIONAL)} (what generation's unconditional "
                             f"stream sees), got {self.uncond!r}")
        if self.encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1, got {self.encode_batch}")
        if self.position_gap < 0:
            raise ValueError(f"position_gap must be >= 0 (the most positions skipped after an image; 0: off), "
                             f"got {self.position_gap}")


class DocumentEncoder:
    """Document -> Encoded: BPE for text, the image tokenizer for images (batched, no grad)."""

    def __init__(self, text_tokenizer, image_tokenizer, vocab: Vocab, mode: str, device: torch.device | str = "cpu",
                 image_batch: int = 16, chat_template: str = "mixmodal", image_preprocessing: str = "mixmodal"):
        self.text = text_tokenizer
        self.chat_template = chat_template  # conversations' layout (data/chat.py)
        # how PIL images become tokenizer input (tokenizers/pixels.py): the model folder's generation.yaml
        # image_preprocessing, as the engine prepares prompt images ("chameleon": Meta's, for a converted model)
        self.image_preprocessing = image_preprocessing
        self._to_tensor = pixel_convention(image_preprocessing).to_tensor
        self.image = image_tokenizer
        self.vocab = vocab
        self.mode = mode
        self.device = torch.device(device)
        self.resolution = image_tokenizer.config.resolution
        self.image_batch = image_batch

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> list[torch.Tensor]:
        """PIL images -> per image: code ids [N] (tokens) or scaled latents [C, h, w] (latents).

        Always in batches of exactly `image_batch` (the last one padded): an image's codes
        or latents then never depend on which other images it was encoded with, so a
        resumed run sees bitwise the same inputs as a straight one."""
        out: list[torch.Tensor] = []
        was_training = self.image.training
        self.image.eval()
        try:
            for start in range(0, len(images), self.image_batch):
                chunk = images[start:start + self.image_batch]
                pixels = self._to_tensor(chunk, self.resolution)
                if len(chunk) < self.image_batch:
                    pad = pixels.new_zeros(self.image_batch - len(chunk), *pixels.shape[1:])
                    pixels = torch.cat([pixels, pad])
                pixels = pixels.to(self.device)
                if self.mode == "tokens":
                    result = self.vocab.image_code_to_id(self.image.encode(pixels).flatten(1))
                else:
                    result = self.image.scale_latents(self.image.encode(pixels)).float()
                out += list(result[:len(chunk)].cpu())
        finally:
            self.image.train(was_training)
        return out

    def encode(self, docs: Sequence[tuple[int, Document]]) -> list[Encoded]:
        images = [p.image for _, d in docs for p in d.parts if isinstance(p, Image)]
        encoded = self.encode_images(images)
        out, used = [], 0
        for index, doc in docs:
            n = sum(isinstance(p, Image) for p in doc.parts)
            out.append(encode_document(doc, self.text, encoded[used:used + n], self.mode, index, self.vocab,
                                       chat_template=self.chat_template))
            used += n
        return out


def with_position_gaps(flat: Flat, rng: np.random.Generator, most: int) -> Flat:
    """`flat` with its positions after each image's <eoi> moved on by a random 0..most (pipeline.position_gap):
    a picture's own positions stay consecutive, the text after it starts a random distance away."""
    positions = np.arange(len(flat.ids))
    for (start, length, _), gap in zip(flat.images, rng.integers(0, most + 1, size=len(flat.images))):
        positions[start + length + 1:] += int(gap)
    return dataclasses.replace(flat, positions=positions.tolist())


class Packer:
    """Flat documents -> rows of seq_len -> a batch dict (see the module docstring)."""

    def __init__(self, seq_len: int, batch_size: int, vocab: Vocab, mode: str, weighted: bool = False) -> None:
        self.seq_len, self.batch_size, self.vocab, self.mode = seq_len, batch_size, vocab, mode
        self.weighted = weighted  # emit loss_weights / image_weights

    def rows_fit(self, row: list[Flat], doc: Flat) -> bool:
        return sum(len(f.ids) for f in row) + len(doc.ids) <= self.seq_len

    def batch(self, rows: list[list[Flat]]) -> dict[str, Any]:
        b, t = len(rows), self.seq_len
        input_ids = torch.full((b, t), self.vocab.pad, dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        positions = torch.zeros((b, t), dtype=torch.long)
        document_ids = torch.full((b, t), -1, dtype=torch.long)
        image_ids = torch.full((b, t), -1, dtype=torch.long)
        weights = torch.zeros((b, t), dtype=torch.float32)
        latents, index, limited, image_weights, image_loss, read = [], [], [], [], [], []
        image_count = 0
        for r, row in enumerate(rows):
            start = 0
            for d, flat in enumerate(row):
                n = len(flat.ids)
                ids = torch.tensor(flat.ids, dtype=torch.long)
                ok = torch.tensor(flat.targets_ok)
                input_ids[r, start:start + n] = ids
                target = torch.where(ok[1:], ids[1:], torch.full_like(ids[1:], IGNORE))
                labels[r, start:start + n - 1] = target
                w = torch.tensor(flat.weights, dtype=torch.float32) if flat.weights is not None else torch.ones(n)
                weights[r, start:start + n - 1] = w[1:]
                positions[r, start:start + n] = torch.arange(n) if flat.positions is None else torch.tensor(flat.positions)
                document_ids[r, start:start + n] = d
                for k, (offset, length, _) in enumerate(flat.images):
                    image_ids[r, start + offset:start + offset + length] = image_count
                    if self.mode == "latents":
                        index.append(r * t + start + offset + torch.arange(length))
                        latents.append(flat.latents[k])
                        limited.append(flat.limited[k])
                        read.append(bool(flat.read and flat.read[k]))
                        target = flat.image_loss is None or flat.image_loss[k]
                        image_loss.append(target)
                        image_weights.append(float(w[offset]) if target else 0.0)
                    image_count += 1
                start += n
        batch = {"input_ids": input_ids, "labels": labels, "positions": positions,
                 "document_ids": document_ids, "image_ids": image_ids}
        if self.mode == "latents":
            batch["image_latents"] = torch.stack(latents) if latents else torch.zeros(0)
            batch["image_index"] = torch.stack(index) if index else torch.zeros(0, 0, dtype=torch.long)
            batch["image_limited"] = torch.tensor(limited, dtype=torch.bool)
            batch["image_read"] = torch.tensor(read, dtype=torch.bool)
            batch["image_loss"] = torch.tensor(image_loss, dtype=torch.bool)
        if self.weighted:
            batch["loss_weights"] = torch.where(labels != IGNORE, weights, 0.0)
            if self.mode == "latents":
                batch["image_weights"] = torch.tensor(image_weights, dtype=torch.float32)
        return batch


@dataclass
class PipelineStats:
    documents: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0  # non-padding positions emitted
    positions: int = 0  # all positions emitted
    retrieved: int = 0  # retrieved documents prepended (retrieval augmentation)
    retrieval_dropped: int = 0  # retrieved documents left out: no room in the row
    cond_dropped: int = 0  # documents whose prompt was dropped (conditioning dropout)
    conversations: int = 0  # documents in the chat template (data/chat.py)

    def as_dict(self) -> dict:
        out = {"documents": self.documents, "truncated": self.truncated, "dropped": self.dropped,
               "fill": self.tokens / self.positions if self.positions else 0.0}
        if self.cond_dropped:
            out["cond_dropped"] = self.cond_dropped
        if self.conversations:
            out["conversations"] = self.conversations
        if self.retrieved or self.retrieval_dropped:
            out.update(retrieved=self.retrieved, retrieval_dropped=self.retrieval_dropped)
        return out


class FusionBatches:
    """The training iterator (task.DataIterator): endless packed batches of one consumer's shard.

    `source_factory()` returns a fresh Source (a new pass over the data); a finite source is
    restarted when exhausted (an epoch). `augmenter` (optional): retrieval augmentation,
    an object with `alpha` and `retrieve(chunk, training) -> [[Encoded, ...] per document]`
    (mixmodal.retrieval.augment.RetrievalAugmenter); `training` turns on its query dropout
    and conditioning dropout (held-out losses measure the conditional model)."""

    def __init__(self, source_factory, encoder: DocumentEncoder, config: PipelineConfig, batch_size: int,
                 positions_per_image: int, *, seed: int = 0, rank: int = 0, endless: bool = True,
                 augmenter=None, training: bool = True) -> None:
        self.source_factory = source_factory
        self.encoder = encoder
        self.config = config
        self.vocab = encoder.vocab
        self.mode = encoder.mode
        self.positions_per_image = positions_per_image
        self.augmenter, self.training = augmenter, training
        weighted = augmenter is not None and augmenter.alpha != 1.0
        self.packer = Packer(config.seq_len, batch_size, encoder.vocab, encoder.mode, weighted=weighted)
        self.batch_size = batch_size
        self.seed, self.rank, self.endless = seed, rank, endless
        self.stats = PipelineStats()
        self.next_document = 0  # index of the first document of the next row
        self._stream: Iterator[Flat] | None = None
        self._pending: Flat | None = None

    # -- state --
    def state_dict(self) -> dict:
        return {"next_document": self.next_document}

    def load_state_dict(self, state: dict) -> None:
        self.next_document = int(state["next_document"])
        self._stream, self._pending = None, None

    # -- documents --
    def _documents(self, start: int) -> Iterator[tuple[int, Document]]:
        """(index, document) from `start` on; a finite source is read again when it runs out."""
        index = 0
        while True:
            source = self.source_factory()
            if index < start and hasattr(source, "skip"):  # the shapes world jumps straight there
                index += source.skip(start - index)
            produced = 0
            for doc in source:
                if index >= start:
                    yield index, doc
                index += 1
                produced += 1
            if not self.endless:
                return
            if produced == 0:
                summary = source.summary() if hasattr(source, "summary") else ""
                raise RuntimeError(f"the source {source!r} yields no usable documents{': ' + summary if summary else ''}")

    def _flats(self, start: int) -> Iterator[Flat]:
        block = self.config.encode_batch
        docs = self._documents(start - start % block)  # chunks always start at a multiple of block
        while True:
            chunk = list(itertools.islice(docs, block))
            if not chunk:
                return
            retrieved = self.augmenter.retrieve(chunk, self.training) if self.augmenter is not None else None
            for k, enc in enumerate(self.encoder.encode(chunk)):
                if enc.index < start:  # before the resume point: only there to keep the chunk whole
                    continue
                rng = np.random.default_rng([self.seed, self.rank, enc.index])
                if not enc.keep_order:
                    enc.segments = order_caption(enc.segments, rng, self.config.caption_first_prob)
                dropped = None
                if self.training and self.config.cond_dropout > 0 and rng.random() < self.config.cond_dropout:
                    if enc.chat:  # the instruction dropped, and half the time the input images too
                        dropped = drop_chat_conditioning(enc.segments, self.config.uncond, self.vocab,
                                                         keep_images=bool(rng.random() < 0.5))
                    else:
                        dropped = drop_conditioning(enc.segments, self.config.uncond, self.vocab)
                if dropped is not None:
                    enc.segments = dropped
                    self.stats.cond_dropped += 1
                elif not enc.chat:  # a conversation's loss mask is its meaning: no CM3 spans across turns
                    enc.segments = cm3_transform(enc.segments, self.vocab, rng, self.config.cm3)
                flat, status = lay_out(enc.segments, self.vocab, self.mode, self.positions_per_image,
                                       max_len=self.config.seq_len, index=enc.index, latents=enc.latents)
                if enc.chat and dropped is None and status == "truncated" and flat is not None:
                    flat = cut_to_turn(flat, self.vocab)  # never split a turn
                self.stats.documents += 1
                self.stats.conversations += enc.chat
                if status == "truncated":
                    self.stats.truncated += 1
                if flat is None:
                    self.stats.dropped += 1
                    continue
                if dropped is not None:
                    # what the unconditional stream is fed at generation: no prompt, no retrieved
                    # context, and the image at every noise level (not noise-limited). Its <eos> is
                    # no target: "an image, then the end" would teach a captioner to stop at once
                    # (greedy captions came out empty with it).
                    flat.limited, flat.read = [False] * len(flat.limited), None
                    flat.targets_ok[-1] = False
                    yield flat
                    continue
                if retrieved is not None:
                    flat = self._augment(flat, retrieved[k])
                if self.training and self.config.position_gap > 0:
                    flat = with_position_gaps(flat, rng, self.config.position_gap)
                yield flat

    def _augment(self, flat: Flat, retrieved: list[Encoded]) -> Flat:
        """Prepend the retrieved documents that fit in one row with `flat` (most relevant first)."""
        parts: list[Flat] = []
        room = self.config.seq_len - len(flat.ids)
        for j, enc in enumerate(retrieved):
            rng = np.random.default_rng([self.seed, self.rank, flat.index, 1 + j])
            segments = order_caption(list(enc.segments), rng, self.config.caption_first_prob)
            part, status = lay_out(segments, self.vocab, self.mode, self.positions_per_image,
                                   max_len=self.config.seq_len, index=enc.index, latents=enc.latents)
            if part is None or status or len(part.ids) > room:
                self.stats.retrieval_dropped += 1
                continue
            parts.append(part)
            room -= len(part.ids)
        self.stats.retrieved += len(parts)
        if not parts:
            return flat
        return join_flats(parts + [flat], [self.augmenter.alpha] * len(parts) + [1.0])

    def _next_flat(self) -> Flat | None:
        if self._pending is not None:
            flat, self._pending = self._pending, None
            return flat
        if self._stream is None:
            self._stream = self._flats(self.next_document)
        return next(self._stream, None)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        rows: list[list[Flat]] = []
        row: list[Flat] = []
        while len(rows) < self.batch_size:
            flat = self._next_flat()
            if flat is None:  # a finite pass is over
                if row:
                    rows.append(row)
                    row = []
                if not rows:
                    raise StopIteration
                break
            if row and not self.packer.rows_fit(row, flat):
                rows.append(row)
                row = []
                if len(rows) == self.batch_size:
                    self._pending = flat
                    break
            row.append(flat)
        if row:
            rows.append(row)
        nxt = self._pending.index if self._pending is not None else None
        if nxt is None:
            # the next document is not read yet: it is the one after the last packed
            nxt = rows[-1][-1].index + 1
        self.next_document = nxt
        batch = self.packer.batch(rows)
        self.stats.tokens += int((batch["document_ids"] >= 0).sum())
        self.stats.positions += batch["document_ids"].numel()
        return batch


__all__ = ["DocumentEncoder", "Encoded", "Flat", "FusionBatches", "IGNORE", "Packer", "PipelineConfig",
           "PipelineStats", "join_flats", "lay_out", "order_caption"]
