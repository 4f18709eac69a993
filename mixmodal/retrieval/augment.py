"""Retrieval-augmented training data (CM3Leon §2.1, RA-CM3): the `data.retrieval` section of
a fusion run and the augmenter the pipeline calls once per chunk of documents.

For every training document the memory bank is searched with the document itself as the
query (its text with 20% of the tokens dropped, CM3Leon's query dropout, and its images),
and k documents are selected by relevance, modality and diversity, never the document
itself (select.py). The pipeline prepends them (data/pipeline.py: `<bos> r1 <eos> <bos> r2
<eos> <bos> document <eos>`, one attention segment).

Throughput: a chunk costs one batched dual-encoder forward and one FAISS search; the
retrieved documents are tokenized and their images encoded by the run's image tokenizer
once per bank document - all of them before training starts (`precompute`, when the bank
fits in `cache_size`), else on first use - and then served from an in-memory cache. `benchmarks/retrieval_train.py`
measures the overhead against the same run without retrieval.

Reproducibility: the query dropout of a chunk draws from a stream seeded by (seed, rank,
index of the chunk's first document), and chunks always start at multiples of the chunk
size, so a resumed run retrieves exactly what the straight run did.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mixmodal.documents import Document


@dataclass
class RetrievalConfig:
    index: str = ""  # a memory bank (`mixmodal index build`); empty: no retrieval
    encoder: str = ""  # the dual encoder; empty: the one the index records (its fingerprint is checked either way)
    k: int = 2  # documents prepended to each training document (CM3Leon: 2)
    query_dropout: float = 0.2  # training documents only: fraction of query text tokens dropped
    max_similarity: float = 0.9  # diversity: skip candidates this similar to the query or to a chosen one
    prefer_multimodal: bool = True  # documents with both text and image first
    candidates: int = 0  # searched per query; 0: max(16, 8k)
    alpha: float = 1.0  # loss weight of the retrieved documents' tokens (1: loss on all tokens; RA-CM3: 0.1)
    cache_size: int = 200_000  # retrieved documents kept tokenized and encoded in memory
    precompute: bool = True  # encode the whole bank once before training (when it fits in cache_size)

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"data.retrieval.k must be >= 0, got {self.k}")
        if not 0.0 <= self.query_dropout < 1.0:
            raise ValueError(f"data.retrieval.query_dropout must be in [0, 1), got {self.query_dropout}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"data.retrieval.alpha must be in [0, 1], got {self.alpha}")
        if self.cache_size < 0:
            raise ValueError(f"data.retrieval.cache_size must be >= 0, got {self.cache_size}")

    @property
    def enabled(self) -> bool:
        return bool(self.index) and self.k > 0

    def selection(self):
        from mixmodal.retrieval.select import SelectionConfig  # late: select brings torch; this module does not

        return SelectionConfig(k=self.k, candidates=self.candidates, max_similarity=self.max_similarity,
                               prefer_multimodal=self.prefer_multimodal, query_dropout=self.query_dropout)


class RetrievalAugmenter:
    """chunk of (index, Document) -> per document, the Encoded retrieved documents (best first)."""

    def __init__(self, config: RetrievalConfig, encoder, *, seed: int = 0, rank: int = 0, device="cpu",
                 retriever=None) -> None:
        self.config = config
        self.alpha = config.alpha
        self.encoder = encoder  # pipeline.DocumentEncoder: text BPE + the run's image tokenizer
        self.seed, self.rank = seed, rank
        if retriever is None:
            from mixmodal.retrieval.select import Retriever  # late: as in RetrievalConfig.selection

            retriever = Retriever.open(config.index, config.selection(), encoder=config.encoder or None, device=device)
        self.retriever = retriever
        self._cache: OrderedDict[int, object] = OrderedDict()
        self.precompute_seconds = 0.0
        size = len(retriever.bank) if hasattr(retriever.bank, "__len__") else None
        if config.precompute and size is not None and size <= config.cache_size:
            started = time.perf_counter()
            for start in range(0, size, 256):
                self._encoded(range(start, min(start + 256, size)))
            self.precompute_seconds = time.perf_counter() - started

    def retrieve(self, chunk: Sequence[tuple[int, Document]], training: bool) -> list[list]:
        rng = np.random.default_rng([self.seed, self.rank, chunk[0][0], 0x5EA7C4]) if training else None
        ids = self.retriever.retrieve([doc for _, doc in chunk], training=training, rng=rng)
        return [[enc for enc in self._encoded(row)] for row in ids]

    def _encoded(self, ids: Sequence[int]) -> list:
        missing = [i for i in dict.fromkeys(ids) if i not in self._cache]
        if missing:
            docs = self.retriever.bank.documents(missing)
            for i, enc in zip(missing, self.encoder.encode(list(zip(missing, docs)))):
                self._cache[i] = enc
        out = []
        for i in ids:
            self._cache.move_to_end(i)
            out.append(self._cache[i])
        while len(self._cache) > max(self.config.cache_size, len(ids)):
            self._cache.popitem(last=False)
        return out


__all__ = ["RetrievalAugmenter", "RetrievalConfig"]
