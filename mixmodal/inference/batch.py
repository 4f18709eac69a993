"""A generating sequence's state (what the engine's state machine reads and writes each step) and
RunningBatch, which steps the engine over the sequences sharing one KV cache (continuous
batching: they join and leave between steps). The state machine itself is engine.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from mixmodal.documents import Document, Image, Text
from mixmodal.inference.cache import KVCache
from mixmodal.inference.config import GenerationConfig
from mixmodal.inference.detokenize import IncrementalDetokenizer
from mixmodal.inference.events import End, Event, GenerationResult
from mixmodal.inference.prompt import PromptError, PromptLike
from mixmodal.objectives.samplers import PatchTurns, Sampler

if TYPE_CHECKING:  # engine.py imports this module (Engine.stream is a RunningBatch)
    from mixmodal.inference.engine import Engine


@dataclass
class Block:
    """What one row is fed in one step."""

    ids: list[int]
    commit: int  # how many of them stay in the cache
    # (offset in block, latents [C,h,w], time: one, or [P] one per patch with the patch_groups sampler)
    latent: tuple[int, torch.Tensor, float | torch.Tensor] | None = None
    denoise: bool = False  # the latent is a noisy image to predict (not committed)
    prompt_images: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # prefill: (offset, clean latents)
    slot_start: int = 0  # codes of the open image already cached before this block (image.slot_embedding)


@dataclass
class GeneratedImage:
    """An image part of the output: its pixels (None when the engine does not decode images)."""

    pil: object | None


@dataclass
class SequenceState:
    """One generating sequence: its rows (one per guidance stream), next step's blocks, and the state
    machine's phase (engine.py `_advance`)."""

    index: int
    config: GenerationConfig
    generator: torch.Generator
    rows: list[int]
    seen: list[int]  # ids of the cond stream (prompt + generated), for the repetition penalty
    length: int  # committed positions of the cond row
    blocks: list[Block]  # next step's block per row
    generated: list[int] = field(default_factory=list)
    parts: list[IncrementalDetokenizer | GeneratedImage] = field(default_factory=list)  # in reading order
    images: list[torch.Tensor] = field(default_factory=list)
    phase: str = "text"
    codes: list[int] = field(default_factory=list)
    x: torch.Tensor | None = None  # latent mode: current noisy latents
    sampler: Sampler | None = None  # latent mode: how the image is denoised (objectives/samplers.py)
    times: torch.Tensor | None = None  # latent mode: the sampler's time grid, from noise to 0
    turns: PatchTurns | None = None  # latent mode, patch_groups > 1: which patches are committed, which next
    step: int = 0
    finish: str = ""
    text_tokens: int = 0
    error: str = ""  # why it ended with finish "error" (RunningBatch(isolate_errors=True))

    def result(self) -> GenerationResult:
        """The finished sequence as a document (its text runs and decoded images, in order) and ids."""
        seq = self
        parts = []
        for part in seq.parts:
            if isinstance(part, IncrementalDetokenizer):
                if part.text:
                    parts.append(Text(part.text))
            elif part.pil is not None:
                parts.append(Image(part.pil, origin="generated"))
        meta = {"finish_reason": seq.finish, "mode": seq.config.mode, "new_positions": len(seq.generated),
                "images": len(seq.images), **({"error": seq.error} if seq.error else {})}
        return GenerationResult(seq.index, Document(parts, meta), list(seq.generated), list(seq.images), seq.finish)


class RunningBatch:
    """Continuous batching over one KV cache: sequences join at the next step (`add`, `join`) and
    leave when they finish or are cancelled; every step is one forward over all live rows, so a
    new prompt's prefill runs beside the others' decoding. A sequence's guidance streams are rows
    that join, step and leave together. `Engine.stream` is a RunningBatch that nobody joins later.

        batch = RunningBatch(engine)        # rows of engine.max_length (+ one image block) positions
        i = batch.add("a photo of a red star", GenerationConfig(mode="image"), seed=0)
        while batch:
            for event in batch.step(): ...
    """

    def __init__(self, engine: Engine, capacity: int | None = None, *, isolate_errors: bool = False) -> None:
        capacity = capacity or (engine.max_length + engine.per_image + 4 if engine.max_length else None)
        if not capacity:
            raise ValueError("a RunningBatch needs a capacity (positions per row): pass capacity= or load the "
                             "engine with a max_length")
        self.engine, self.capacity = engine, capacity
        # isolate_errors (a server): an exception while advancing one sequence ends that sequence with
        # finish_reason "error" (its End's result.document.metadata["error"] says why); the others go on
        self.isolate_errors = isolate_errors
        self.cache = KVCache(engine.model.config.transformer.num_layers, 0, capacity, engine.device)
        self.live: list[SequenceState] = []
        self._next_index = 0

    def __len__(self) -> int:
        return len(self.live)

    @property
    def rows(self) -> int:
        return self.cache.rows

    def add(self, prompt: PromptLike, config: GenerationConfig | None = None, *, seed: int = 0,
            generator: torch.Generator | None = None, context: Sequence[Document] = ()) -> int:
        """Queue a prompt to start at the next step; returns its sequence index (events carry it).
        Raises PromptError for a prompt that does not fit, before anything joins."""
        index = self._next_index
        generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        self.join([self.engine._sequence(index, prompt, config or GenerationConfig(), generator, context)])
        return index

    def join(self, sequences: list[SequenceState]) -> None:
        for seq in sequences:
            need = len(seq.blocks[0].ids) + seq.config.max_new_tokens
            if self.engine.max_length is not None:  # generation stops at the context's end
                need = min(need, self.engine.max_length)
            need += self.engine.per_image + 4  # a step's block may reach past the committed length
            if need > self.capacity:
                raise PromptError(f"prompt {seq.index} needs up to {need} positions (prompt + max_new_tokens); this "
                                  f"batch's rows hold {self.capacity}: lower max_new_tokens or shorten the prompt")
        for seq in sequences:
            first = self.cache.rows
            self.cache.add_rows(len(seq.rows))
            seq.rows = list(range(first, first + len(seq.rows)))
            self.live.append(seq)
            self._next_index = max(self._next_index, seq.index + 1)

    def cancel(self, index: int) -> bool:
        """Drop sequence `index` now (a client went away); False if it is not running."""
        gone = [s for s in self.live if s.index == index]
        self._drop(gone)
        return bool(gone)

    @torch.no_grad()
    def step(self) -> list[Event]:
        """One forward over every live row; the events it produced, with End for each finished sequence."""
        if not self.live:
            return []
        output = self.engine._forward(self.live, self.cache)
        events: list[Event] = []
        for seq in self.live:
            try:
                events += self.engine._advance(seq, output)
            except Exception as e:  # noqa: BLE001 - re-raised unless isolating
                if not self.isolate_errors:
                    raise
                seq.finish, seq.error = "error", f"{type(e).__name__}: {e}"
        finished = [s for s in self.live if s.finish]
        events += [End(s.index, s.result()) for s in finished]
        self._drop(finished)
        return events

    def _drop(self, sequences: list[SequenceState]) -> None:
        if not sequences:
            return
        self.live = [s for s in self.live if all(s is not d for d in sequences)]
        self.cache.keep(torch.tensor([r for s in self.live for r in s.rows], dtype=torch.long))
        row = 0
        for s in self.live:
            s.rows = list(range(row, row + len(s.rows)))
            row += len(s.rows)

