"""CM3Leon's retrieval selection (CM3Leon §2.1 "Retrieval", after RA-CM3).

A query document is embedded like the bank's documents (mean of its text and image
embeddings); during training 20% of its text tokens are dropped first (query dropout,
which regularises training). From the bank's nearest `candidates`, k documents are chosen:

    never self       the query document itself (same content key) is never retrieved
    relevance        inner product with the query; candidates above `max_similarity` are
                     near-copies of the query and are dropped
    modality         documents with both text and image first (by relevance), then the rest
    diversity        a candidate more similar than `max_similarity` to an already chosen
                     one is skipped (greedy, best first)

Selection is deterministic: the same query embeddings give the same ids (ties broken by
store id); with query dropout, the same rng seed gives the same embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mixmodal.documents import Document
from mixmodal.retrieval.bank import MemoryBank
from mixmodal.retrieval.embed import embed_documents_checked
from mixmodal.retrieval.store import document_key


@dataclass
class SelectionConfig:
    k: int = 2  # documents per query (CM3Leon: 2)
    candidates: int = 0  # searched per query; 0 -> max(16, 8 * k)
    max_similarity: float = 0.9  # skip a candidate with cosine > this to the query or to a chosen one (>= 1: off)
    prefer_multimodal: bool = True  # documents with both text and image first (by relevance), then the rest
    query_dropout: float = 0.2  # training only: fraction of the query's text tokens dropped before embedding

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.candidates < 0:
            raise ValueError(f"candidates must be >= 0 (0: max(16, 8 * k)), got {self.candidates}")
        if not self.max_similarity > -1.0:  # >= 1 turns the near-copy and diversity rules off
            raise ValueError(f"max_similarity is a cosine similarity threshold above -1, got {self.max_similarity}")
        if not 0.0 <= self.query_dropout < 1.0:
            raise ValueError(f"query_dropout must be in [0, 1), got {self.query_dropout}")

    @property
    def num_candidates(self) -> int:
        return self.candidates or max(16, 8 * self.k)


def select(
    bank: MemoryBank,
    query_embeddings: np.ndarray,
    config: SelectionConfig,
    query_keys: Sequence[str | None] | None = None,
) -> list[list[int]]:
    """Per query, at most k store ids, best first (fewer when the rules leave fewer).

    `query_embeddings`: float32 [Q, D], normalised; `query_keys[q]`: document_key of query q
    (None: no self to exclude).
    """
    queries = np.asarray(query_embeddings, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"query_embeddings must be [Q, D], got shape {queries.shape}")
    if query_keys is not None and len(query_keys) != len(queries):
        raise ValueError(f"{len(query_keys)} query keys for {len(queries)} queries")
    if len(queries) == 0:
        return []
    scores, ids = bank.search(queries, min(config.num_candidates, len(bank)))  # (Q, C), (Q, C)
    has_text, has_image = bank.has_text, bank.has_image  # [N], views of the memory-mapped keys
    chosen_per_query = []
    for q in range(len(queries)):
        found = ids[q] >= 0
        candidates, relevance = ids[q][found], scores[q][found]
        keep = relevance <= config.max_similarity  # near-copies of the query teach nothing
        if query_keys is not None and query_keys[q] is not None:
            keep &= bank.keys(candidates) != query_keys[q].encode("ascii")
        candidates, relevance = candidates[keep], relevance[keep]
        if config.prefer_multimodal:
            later = ~(has_text[candidates] & has_image[candidates])
        else:
            later = np.zeros(len(candidates), bool)
        order = np.lexsort((candidates, -relevance, later))  # modality group, then relevance, then id
        candidates = candidates[order]
        embeddings = bank.embeddings(candidates)  # (C', D)
        chosen: list[int] = []
        for j in range(len(candidates)):
            if chosen and float(np.max(embeddings[chosen] @ embeddings[j])) > config.max_similarity:
                continue
            chosen.append(j)
            if len(chosen) == config.k:
                break
        chosen_per_query.append([int(candidates[j]) for j in chosen])
    return chosen_per_query


def nearest(bank: MemoryBank, embedder, query: Document, k: int, *, rules: bool = False) -> list[tuple[int, float]]:
    """The documents of `bank` nearest to one query document, best first, as (store id, cosine) pairs
    (what `mixmodal index query` prints): the k nearest by inner product, or with `rules` at most k
    chosen by CM3Leon's selection (never self, near-copies and near-duplicates skipped, multimodal
    first; SelectionConfig's defaults)."""
    embedding = embed_documents_checked(embedder, [query], dim=bank.dim)  # (1, D)
    if rules:
        ids = select(bank, embedding, SelectionConfig(k=k), [document_key(query)])[0]
        scores = (bank.embeddings(ids) @ embedding[0]).tolist() if ids else []
    else:
        found_scores, found_ids = bank.search(embedding, k)
        ids = [int(i) for i in found_ids[0] if i >= 0]
        scores = found_scores[0][: len(ids)].tolist()
    return list(zip(ids, scores))


class Retriever:
    """A bank, its encoder and the selection rules: documents in, retrieved store ids out."""

    def __init__(self, bank: MemoryBank, embedder, config: SelectionConfig | None = None, *,
                 batch_size: int = 256) -> None:
        bank.check_embedder(embedder)
        self.bank = bank
        self.embedder = embedder
        self.config = config or SelectionConfig()
        self.batch_size = batch_size

    @classmethod
    def open(cls, index_path: str | os.PathLike, config: SelectionConfig | None = None,
             encoder: str | os.PathLike | None = None, device: str = "cpu") -> "Retriever":
        """The bank at `index_path` with its encoder (bank.json's, or `encoder`; fingerprint checked)."""
        bank = MemoryBank.open(index_path)
        return cls(bank, bank.load_embedder(encoder, device=device), config)

    def retrieve(self, docs: Sequence[Document], *, training: bool = False,
                 rng: np.random.Generator | None = None) -> list[list[int]]:
        """Per document, the selected store ids (best first). With `training`, the queries'
        text tokens are dropped at rate config.query_dropout, drawn from `rng`."""
        dropout = self.config.query_dropout if training else 0.0
        if dropout > 0 and rng is None:
            raise ValueError("Retriever.retrieve(training=True) drops query tokens at random: pass "
                             "rng=np.random.Generator so that retrieval is reproducible")
        result: list[list[int]] = [[] for _ in docs]
        queries = [i for i, doc in enumerate(docs) if not doc.is_empty()]  # an empty query retrieves nothing
        if not queries:
            return result
        query_docs = [docs[i] for i in queries]
        kwargs = {"query_dropout": dropout, "rng": rng} if dropout > 0 else {}
        embeddings = embed_documents_checked(self.embedder, query_docs, dim=self.bank.dim,
                                             batch_size=self.batch_size, **kwargs)
        selected = select(self.bank, embeddings, self.config, [document_key(d) for d in query_docs])
        for i, ids in zip(queries, selected):
            result[i] = ids
        return result

    def retrieve_documents(self, docs: Sequence[Document], **kwargs) -> list[list[Document]]:
        return [self.bank.documents(ids) for ids in self.retrieve(docs, **kwargs)]


__all__ = ["Retriever", "SelectionConfig", "nearest", "select"]
