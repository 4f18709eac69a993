"""The memory bank's FAISS index (INDEX/index.faiss): building one of a kind, its search
parameters, reading it back (checked against bank.json), adding rows, searching.

Vector i is store row i: rows are added in order and never removed, so FAISS's ids 0..N-1
are the store's. The metric is inner product; embeddings are L2-normalised, so it is cosine
similarity.

    flat   exact (IndexFlatIP); fast up to about a million documents
    ivf    inverted lists (IndexIVFFlat): nlist = 4 sqrt(N), trained on a fixed sample, nprobe
           = max(8, nlist / 8); fewer lists when N is small, flat when too small for any
    hnsw   a graph (IndexHNSWFlat): M = 32, efConstruction = 80, efSearch = 128
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mixmodal.retrieval.errors import DISAGREE, BankError, rebuild_hint

KINDS = ("flat", "ivf", "hnsw")
HNSW_M = 32  # neighbours per node: FAISS's usual choice for a high-recall graph
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # candidates kept while searching; FAISS uses max(efSearch, k)
MIN_POINTS_PER_LIST = 39  # FAISS k-means wants >= 39 training points per centroid
TRAIN_POINTS_PER_LIST = 256  # ... and samples down to 256 per centroid anyway
ADD_CHUNK = 65536  # rows per index.add call


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise BankError("the memory bank needs FAISS: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise BankError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)} (flat: exact; ivf: inverted "
                        "lists, for millions of documents; hnsw: a graph, fast and memory-hungry)")


def build_index(embeddings: np.ndarray, kind: str, nlist: int | None):
    """An index of `kind` holding `embeddings` in row order. Returns (index, params, notes)."""
    faiss = faiss_module()
    n, dim = embeddings.shape
    notes: list[str] = []
    params: dict = {"kind": kind}
    if kind == "ivf":
        most = n // MIN_POINTS_PER_LIST
        if nlist is not None:
            if nlist < 1 or nlist > most:
                fewer = f"pass --nlist {most} or less, or " if most >= 1 else ""
                raise BankError(f"an IVF index with nlist={nlist} needs at least {MIN_POINTS_PER_LIST * max(nlist, 1)} "
                                f"documents to train its lists, and this bank has {n}: {fewer}use --kind flat "
                                "(exact, and fast at this size)")
        elif most < 1:
            notes.append(f"{n} documents are too few to train an IVF index (it needs {MIN_POINTS_PER_LIST} per list); "
                         "built a flat (exact) index instead: rebuild with --kind ivf when the bank has grown")
            kind = params["kind"] = "flat"
        else:
            nlist = min(max(1, round(4 * math.sqrt(n))), most)
            wanted = max(1, round(4 * math.sqrt(n)))
            if nlist < wanted:
                notes.append(f"IVF: {nlist} lists instead of 4*sqrt(N) = {wanted}: training needs "
                             f"{MIN_POINTS_PER_LIST} documents per list and this bank has {n}")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params.update(m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=HNSW_EF_SEARCH)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        num_train = min(n, nlist * TRAIN_POINTS_PER_LIST)
        # A fixed sample, so the same embeddings give the same lists.
        rows = np.sort(np.random.default_rng(0).choice(n, num_train, replace=False)) if num_train < n else slice(None)
        index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))
        nprobe = min(nlist, max(8, nlist // 8))
        params.update(nlist=nlist, nprobe=nprobe)
    add_rows(index, embeddings, 0, n)
    return index, params, notes


def add_rows(index, embeddings: np.ndarray, start: int, stop: int) -> None:
    """index.add(embeddings[start:stop]), chunk by chunk (the ids continue index.ntotal)."""
    for first in range(start, stop, ADD_CHUNK):
        index.add(np.ascontiguousarray(embeddings[first : min(first + ADD_CHUNK, stop)], dtype=np.float32))


def write_index(index, file: Path) -> None:
    try:
        faiss_module().write_index(index, str(file))
    except RuntimeError as e:  # FAISS's own error for a failed fwrite: a full or read-only disk
        raise BankError(f"cannot write {file} (FAISS: {str(e).strip().splitlines()[-1]}): is its disk full or "
                        "read-only? Nothing was changed; free space or make the folder writable, then run it again"
                        ) from None


def apply_search_params(index, kind: str, params: dict) -> None:
    """Set what FAISS does not keep in index.faiss: nprobe (ivf), efSearch (hnsw)."""
    if kind == "ivf":
        index.nprobe = int(params.get("nprobe", 1))
    elif kind == "hnsw":
        index.hnsw.efSearch = int(params.get("ef_search", HNSW_EF_SEARCH))


def load_index(path: Path, count: int, dim: int, file: Path | None = None):
    """path/index.faiss (or `file`: the new one of an add being committed), checked to hold `count`
    vectors of `dim` (bank.json's)."""
    rebuild = rebuild_hint(path)
    faiss = faiss_module()
    file = path / "index.faiss" if file is None else file
    if not file.is_file():  # FAISS would name neither the file nor the fix
        raise FileNotFoundError(f"{file} is missing")
    try:
        index = faiss.read_index(str(file))
    except RuntimeError as e:
        raise BankError(f"{file} cannot be read by FAISS ({str(e).strip().splitlines()[-1]}); {rebuild}") from None
    if index.d != dim:
        raise BankError(f"{file} holds {index.d}-dim vectors but {path / 'bank.json'} says dim {dim}: {rebuild}")
    if index.ntotal != count:
        raise BankError(f"{file} has {index.ntotal} vectors but {path / 'bank.json'} counts {count} "
                        f"documents: {DISAGREE}; {rebuild}")
    return index


def search_index(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of `queries` (float32 [Q, D], Q >= 1): (scores [Q, k] float32, ids [Q, k] int64),
    -1 ids and -inf scores where the index finds fewer than k."""
    scores, ids = index.search(np.ascontiguousarray(queries), k)  # (Q, k), (Q, k)
    scores = scores.astype(np.float32)
    ids = ids.astype(np.int64)
    scores[ids < 0] = -np.inf
    return scores, ids


__all__ = ["KINDS", "add_rows", "apply_search_params", "build_index", "check_kind", "faiss_module", "load_index",
           "search_index", "write_index"]
