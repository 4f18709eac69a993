"""CM3Leon's selection rules: never self, near-copies and near-duplicates skipped, multimodal
first, k respected, query dropout only in training and reproducible, the encoder checked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from mixmodal.config import ConfigError, build_config
from mixmodal.documents import Document, Image, Text
from mixmodal.retrieval import bank as bank_module
from mixmodal.retrieval.bank import BankError, MemoryBank
from mixmodal.retrieval.select import Retriever, SelectionConfig, select

DIM = 8
TEXT_DIMS = 5  # "vec:..." texts live in the first 5 dims, image colours in the last 3


class VectorEmbedder:
    """The DocumentEmbedder protocol with embeddings chosen by the test: a text "vec:a,b,..."
    is that vector, other texts hash their words; a solid image is its colour in the last
    three dims; a document is the normalised mean of the two."""

    def __init__(self, path, dim: int = DIM) -> None:
        self.path = Path(path)
        self.dim = dim
        self.fingerprint = hashlib.sha256(self.path.name.encode()).hexdigest()
        self.calls: list[dict] = []

    def embed_texts(self, texts, batch_size=256, query_dropout=0.0, rng=None) -> np.ndarray:
        rows = []
        for text in texts:
            v = np.zeros(self.dim)
            if text.startswith("vec:"):
                values = [float(x) for x in text[4:].split(",")]
                v[: len(values)] = values
            else:
                words = text.split()
                if query_dropout > 0:
                    words = [w for w, r in zip(words, rng.random(len(words))) if r >= query_dropout] or words[:1]
                for w in words:
                    seed = int.from_bytes(hashlib.md5(w.encode()).digest()[:8], "little")
                    v[:TEXT_DIMS] += np.random.default_rng(seed).standard_normal(TEXT_DIMS)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, np.float32).reshape(len(texts), self.dim)

    def embed_images(self, images, batch_size=256) -> np.ndarray:
        rows = []
        for image in images:
            v = np.zeros(self.dim)
            v[TEXT_DIMS:] = np.asarray(image, np.float64)[0, 0]
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, np.float32).reshape(len(images), self.dim)

    def embed_documents(self, docs, batch_size=256, query_dropout=0.0, rng=None) -> np.ndarray:
        self.calls.append({"query_dropout": query_dropout, "rng": rng})
        rows = []
        for doc in docs:
            v = np.zeros(self.dim)
            if " ".join(doc.texts).strip():
                v += self.embed_texts([" ".join(doc.texts)], query_dropout=query_dropout, rng=rng)[0]
            if doc.images:
                v += self.embed_images(doc.images[:1])[0]
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, np.float32).reshape(len(docs), self.dim)


def vec(*values: float, colour: tuple[int, int, int] | None = None, id: str | None = None) -> Document:
    parts = [Text("vec:" + ",".join(str(v) for v in values))]
    if colour is not None:
        parts.append(Image(PIL.Image.new("RGB", (4, 4), colour)))
    return Document(parts, id=id)


def make_bank(tmp_path, docs, name="index") -> tuple[MemoryBank, VectorEmbedder]:
    embedder = VectorEmbedder(tmp_path / "enc_a")
    return MemoryBank.build(docs, embedder, tmp_path / name, progress=False), embedder


def query(embedder, *values: float) -> np.ndarray:
    return embedder.embed_documents([vec(*values)])


def test_never_self_even_at_similarity_one(tmp_path):
    q = vec(1, 0, 0, id="q")
    docs = [q, vec(1, 0, 0, id="same content, other source"), vec(0.8, 0.6, id="a"), vec(0.6, 0, 0.8, id="b")]
    bank, embedder = make_bank(tmp_path, docs)
    config = SelectionConfig(k=3, max_similarity=1.5, prefer_multimodal=False)  # >= 1: similarity rules off
    assert sorted(select(bank, embedder.embed_documents([q]), config)[0][:2]) == [0, 1]  # no key: itself first
    retriever = Retriever(bank, embedder, config)
    assert retriever.retrieve([q]) == [[2, 3]]
    assert [d.id for d in retriever.retrieve_documents([q])[0]] == ["a", "b"]
    assert retriever.retrieve([Document([Text(" ")]), q]) == [[], [2, 3]]  # an empty query retrieves nothing


def test_near_copies_and_near_duplicates_are_skipped(tmp_path):
    docs = [vec(0.95, 0.312, id="near copy of the query"), vec(0.8, 0.6, id="d1"),
            vec(0.79, 0.58, 0.2, id="near duplicate of d1"), vec(0.7, 0, 0, 0.714, id="d3")]
    bank, embedder = make_bank(tmp_path, docs)
    q = query(embedder, 1)
    cosines = bank.embeddings(range(4)) @ bank.embeddings(range(4)).T
    assert cosines[1, 2] > 0.9 and cosines[1, 3] < 0.9 and (bank.embeddings([0]) @ q.T) > 0.9
    assert select(bank, q, SelectionConfig(k=2)) == [[1, 3]]
    assert select(bank, q, SelectionConfig(k=3)) == [[1, 3]]  # fewer than k when the rules leave fewer
    assert select(bank, q, SelectionConfig(k=3, max_similarity=1.0)) == [[0, 1, 2]]


def test_multimodal_documents_come_first(tmp_path):
    docs = [vec(0.85, 0.527, id="text, closer"), vec(1, colour=(255, 0, 0), id="text+image, further"),
            vec(0.6, 0, 0.8, id="text, furthest")]
    bank, embedder = make_bank(tmp_path, docs)
    q = query(embedder, 1)
    scores, ids = bank.search(q, 3)
    assert ids[0].tolist() == [0, 1, 2]  # plain relevance puts the text-only document first
    assert select(bank, q, SelectionConfig(k=1)) == [[1]]
    assert select(bank, q, SelectionConfig(k=2)) == [[1, 0]]
    assert select(bank, q, SelectionConfig(k=2, prefer_multimodal=False)) == [[0, 1]]


def test_k_and_candidates(tmp_path):
    docs = [vec(*np.eye(TEXT_DIMS)[i]) for i in range(3)]
    bank, embedder = make_bank(tmp_path, docs)
    q = query(embedder, 0.5, 0.4, 0.3)
    assert [len(ids) for ids in select(bank, np.repeat(q, 2, 0), SelectionConfig(k=2))] == [2, 2]
    assert select(bank, q, SelectionConfig(k=5)) == [[0, 1, 2]]  # the bank is smaller than k
    assert select(bank, q, SelectionConfig(k=5, candidates=1)) == [[0]]
    assert select(bank, q, SelectionConfig(k=5), [bank.key(0)]) == [[1, 2]]
    assert select(bank, q[:0], SelectionConfig()) == []
    assert SelectionConfig(k=3).num_candidates == 24 and SelectionConfig(k=1).num_candidates == 16
    assert build_config(SelectionConfig, {"k": 4}, ["max_similarity=0.8"]).max_similarity == 0.8
    with pytest.raises(ConfigError, match="k must be >= 1"):
        build_config(SelectionConfig, {"k": 0})
    with pytest.raises(ValueError, match="query_dropout"):
        SelectionConfig(query_dropout=1.0)


def test_query_dropout_only_when_training_and_reproducible(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    docs = [Document([Text(" ".join(rng.choice(words, 6)))], id=f"t{i}") for i in range(40)]
    bank, embedder = make_bank(tmp_path, docs)
    retriever = Retriever(bank, embedder, SelectionConfig(k=2, query_dropout=0.5))
    queries = [Document([Text(" ".join(rng.choice(words, 10)))]) for _ in range(6)]

    plain = retriever.retrieve(queries)
    assert embedder.calls[-1]["query_dropout"] == 0.0 and retriever.retrieve(queries) == plain
    eval_embeddings = embedder.embed_documents(queries)

    runs = []
    for _ in range(2):
        runs.append(retriever.retrieve(queries, training=True, rng=np.random.default_rng(7)))
        assert embedder.calls[-1]["query_dropout"] == 0.5
        rng_used = embedder.calls[-1]["rng"]
        embedded = embedder.embed_documents(queries, query_dropout=0.5, rng=np.random.default_rng(7))
    assert runs[0] == runs[1] and isinstance(rng_used, np.random.Generator)
    assert not np.allclose(embedded, eval_embeddings)  # the tokens dropped change the queries
    other = [retriever.retrieve(queries, training=True, rng=np.random.default_rng(s)) for s in range(8, 12)]
    assert any(r != runs[0] for r in other + [plain])  # and, over seeds, what is retrieved
    with pytest.raises(ValueError, match="pass rng="):
        retriever.retrieve(queries, training=True)


def test_retriever_open_checks_the_encoder(tmp_path, monkeypatch):
    monkeypatch.setattr(bank_module, "load_document_embedder", lambda path, device="cpu": VectorEmbedder(path))
    bank, _ = make_bank(tmp_path, [vec(1), vec(0, 1), vec(0.5, 0.5, colour=(0, 0, 255))])
    retriever = Retriever.open(tmp_path / "index", SelectionConfig(k=1))
    assert retriever.embedder.path == tmp_path / "enc_a" and len(retriever.bank) == 3
    assert retriever.retrieve([vec(0.9, 0.1)]) == [[2]]
    with pytest.raises(BankError, match=r"built with encoder .*enc_a .*enc_b has .*pass the encoder"):
        Retriever.open(tmp_path / "index", encoder=tmp_path / "enc_b")
    with pytest.raises(BankError, match="fingerprint"):
        Retriever(bank, VectorEmbedder(tmp_path / "enc_b"), SelectionConfig())
