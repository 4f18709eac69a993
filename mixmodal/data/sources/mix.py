"""MixSource: several sources sampled by weight (Chameleon's SFT balances by category, not by
document count), endless, and resumable exactly.

    mix:SPEC@WEIGHT|SPEC@WEIGHT|...     e.g. mix:shapes:tasks=chat@3|data/vqa.jsonl@1

Document k of a consumer comes from the source a seeded stream picks for (seed, consumer, k),
with probability proportional to its weight; each source is read in its own order and read
again from its start when it runs out (an epoch of that source). `skip(n)` replays the first n
picks and skips each source by its own count (the shapes world jumps; files are re-read), so a
resumed run sees exactly the documents a straight run would. The sub-sources shard themselves
by rank and DataLoader worker, as every Source does.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from mixmodal.data.sources.base import Source, SourceSpecError
from mixmodal.documents import Document

MIX_SEED = 0x313C


class MixSource(Source):
    def __init__(self, factories: list[Callable[[], Source]], weights: list[float], names: list[str] | None = None,
                 seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not factories or len(factories) != len(weights):
            raise ValueError("a mix needs one weight per source and at least one source")
        if any(not (w > 0) for w in weights):
            raise ValueError(f"mix weights must be > 0; got {weights}")
        self.factories, self.names = factories, names or [f"source {i}" for i in range(len(factories))]
        self.p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.seed = seed
        self._skip = 0
        self.counts = [0] * len(factories)  # documents drawn from each source in the last iteration

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}@{p:.3g}" for n, p in zip(self.names, self.p))
        return f"MixSource({parts}{self._sharding()})"

    def picks(self, consumer: int, start: int, n: int) -> np.ndarray:
        """The source of each of this consumer's documents start..start+n-1 (re-drawn from the
        stream's start: one long draw's prefix, whatever the blocks; O(start), cheap next to documents)."""
        rng = np.random.default_rng([MIX_SEED, self.seed, consumer])
        out = rng.choice(len(self.p), size=start + n, p=self.p)
        return out[start:]

    def skip(self, n: int) -> int:
        self._skip = max(int(n), 0)
        return self._skip

    def _open(self, i: int) -> Source:
        source = self.factories[i]()
        source.rank, source.world_size, source.log = self.rank, self.world_size, self.log
        return source

    def _stream(self, i: int, skip: int) -> Iterator[Document]:
        """Source i endlessly (epochs), after its first `skip` documents."""
        while True:
            source = self._open(i)
            if skip and hasattr(source, "skip"):
                skip -= source.skip(skip)
            produced = 0
            for doc in source:
                produced += 1
                if skip:
                    skip -= 1
                    continue
                yield doc
            if produced == 0:
                raise RuntimeError(f"mix: {self.names[i]} yields no usable documents: {self.log.summary()}")

    def _documents(self, consumer: int, num_consumers: int) -> Iterator[Document]:
        start = self._skip
        done = np.bincount(self.picks(consumer, 0, start), minlength=len(self.p)) if start else [0] * len(self.p)
        streams = [self._stream(i, int(done[i])) for i in range(len(self.p))]
        self.counts = [int(c) for c in done]
        k = start
        while True:
            block = self.picks(consumer, k, 1024)  # drawn in blocks: the same picks however far it runs
            for i in block:
                self.counts[i] += 1
                yield next(streams[i])
            k += len(block)


def mix_source_from_spec(rest: str, open_one: Callable[..., Source], common: dict) -> MixSource:
    """`SPEC@WEIGHT|SPEC@WEIGHT` -> MixSource (each SPEC any open_source form)."""
    items = [item.strip() for item in rest.split("|") if item.strip()]
    if not items:
        raise SourceSpecError("mix: give sources as SPEC@WEIGHT|SPEC@WEIGHT, e.g. mix:shapes:tasks=chat@3|data.jsonl@1")
    specs, weights = [], []
    for item in items:
        spec, at, weight = item.rpartition("@")
        if not at:
            spec, weight = item, "1"
        try:
            w = float(weight)
        except ValueError:
            raise SourceSpecError(f"mix: weight of {item!r} is not a number; write SPEC@2") from None
        if not w > 0:
            raise SourceSpecError(f"mix: weight of {item!r} must be > 0; drop the source to disable it")
        specs.append(spec)
        weights.append(w)
    sub = {k: v for k, v in common.items() if k not in ("rank", "world_size")}
    for spec in specs:
        open_one(spec, **sub)  # fail now, naming the bad spec, not at the first document
    factories = [lambda spec=spec: open_one(spec, **sub) for spec in specs]
    return MixSource(factories, weights, names=specs, **common)


__all__ = ["MixSource", "mix_source_from_spec"]
