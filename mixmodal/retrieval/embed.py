"""The document embedder at the memory bank's boundary: loading one, checking that an object
is one, and checking what it returns (shape, finite, L2-normalised).

An embedder is anything with `dim`, `path`, `fingerprint` and `embed_documents(docs,
batch_size, ...)`: a DocumentEmbedder (document_embedder.py), or a fake in the tests.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mixmodal.documents import Document
from mixmodal.retrieval.errors import BankError


def load_document_embedder(path: str | os.PathLike, device: str = "cpu"):
    """DocumentEmbedder.from_pretrained(path) (one place, so tests can swap in a fake)."""
    from mixmodal.retrieval.document_embedder import DocumentEmbedder  # torch only when an encoder is loaded

    return DocumentEmbedder.from_pretrained(path, device=device)


def embed_documents_checked(embedder, docs: Sequence[Document], *, dim: int, batch_size: int = 256,
                            **kwargs) -> np.ndarray:
    """embedder.embed_documents(docs), checked at the boundary: float32 [len(docs), dim],
    finite, L2-normalised (re-normalised when slightly off)."""
    out = np.asarray(embedder.embed_documents(list(docs), batch_size=batch_size, **kwargs), dtype=np.float32)
    where = f"the encoder {getattr(embedder, 'path', type(embedder).__name__)}"
    if out.shape != (len(docs), dim):
        raise BankError(f"{where} returned embeddings of shape {out.shape} for {len(docs)} documents; "
                        f"expected ({len(docs)}, {dim}): is it the encoder this index expects?")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms < 1e-6):
        raise BankError(f"{where} returned non-finite or zero embeddings; check its weights (NaN after training?)")
    return np.ascontiguousarray(out / norms, dtype=np.float32)


def embedder_dim(embedder) -> int:
    """`embedder.dim`, after checking that it has what the bank uses (TypeError otherwise)."""
    for name in ("dim", "path", "fingerprint", "embed_documents"):
        if not hasattr(embedder, name):
            raise TypeError(f"the embedder {type(embedder).__name__} has no {name!r}; pass a DocumentEmbedder "
                            "(mixmodal.retrieval.document_embedder)")
    return int(embedder.dim)


__all__ = ["embed_documents_checked", "embedder_dim", "load_document_embedder"]
