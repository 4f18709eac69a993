"""The memory bank: build / open / search / add against brute force, the store round trip,
every refusal naming its file and fix, and `mixmodal index ...`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from mixmodal.cli import main
from mixmodal.documents import Document, Image, Text, write_jsonl
from mixmodal.retrieval import bank as bank_module
from mixmodal.retrieval.bank import BankError, MemoryBank, document_key

WORDS = [f"word{i}" for i in range(40)]


class HashEmbedder:
    """The DocumentEmbedder protocol without a model: words hash to fixed random vectors,
    images project their four quadrant colours; the fingerprint comes from the folder name."""

    def __init__(self, path, dim: int = 32) -> None:
        self.path = Path(path)
        self.dim = dim
        self.fingerprint = hashlib.sha256(f"{self.path.name}:{dim}".encode()).hexdigest()
        self._projection = np.random.default_rng(0).standard_normal((12, dim))

    def _word(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.md5(word.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def embed_texts(self, texts, batch_size=256, query_dropout=0.0, rng=None) -> np.ndarray:
        rows = []
        for text in texts:
            words = text.split()
            if query_dropout > 0:
                kept = [w for w, r in zip(words, rng.random(len(words))) if r >= query_dropout]
                words = kept or words[:1]
            v = sum(self._word(w) for w in words)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, np.float32).reshape(len(texts), self.dim)

    def embed_images(self, images, batch_size=256) -> np.ndarray:
        rows = []
        for image in images:
            a = np.asarray(image, np.float32) / 255.0
            h, w = a.shape[0] // 2, a.shape[1] // 2
            quadrants = [a[:h, :w], a[:h, w:], a[h:, :w], a[h:, w:]]
            v = np.concatenate([q.reshape(-1, 3).mean(0) - 0.5 for q in quadrants]) @ self._projection
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, np.float32).reshape(len(images), self.dim)

    def embed_documents(self, docs, batch_size=256, query_dropout=0.0, rng=None) -> np.ndarray:
        rows = []
        for doc in docs:
            v = np.zeros(self.dim)
            text = " ".join(doc.texts)
            if text.strip():
                v += self.embed_texts([text], query_dropout=query_dropout, rng=rng)[0]
            if doc.images:
                images = self.embed_images(doc.images).sum(0)
                v += images / np.linalg.norm(images)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, np.float32).reshape(len(docs), self.dim)


def quadrant_image(rng: np.random.Generator, size: int = 8) -> PIL.Image.Image:
    colours = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    return PIL.Image.fromarray(np.kron(colours, np.ones((size // 2, size // 2, 1), np.uint8)), "RGB")


def make_docs(n: int, seed: int = 0, start: int = 0) -> list[Document]:
    """Text+image, text-only and image-only documents in turn, all different."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(start, start + n):
        text = f"doc{i} " + " ".join(rng.choice(WORDS, 4))
        parts = {0: [Text(text), Image(quadrant_image(rng))], 1: [Text(text)], 2: [Image(quadrant_image(rng))]}[i % 3]
        docs.append(Document(parts, {"n": i}, f"d{i}"))
    return docs


@pytest.fixture
def encoder_dirs(tmp_path):
    dirs = {name: tmp_path / name for name in ("enc_a", "enc_b")}
    for d in dirs.values():
        d.mkdir()
    return dirs


def build(tmp_path, docs, kind="flat", name="index", **kw) -> MemoryBank:
    return MemoryBank.build(docs, HashEmbedder(tmp_path / "enc_a"), tmp_path / name, kind=kind, progress=False,
                            batch_size=16, **kw)


def assert_same_document(got: Document, want: Document) -> None:
    assert got.id == want.id and got.metadata == want.metadata and len(got.parts) == len(want.parts)
    for g, w in zip(got.parts, want.parts):
        assert type(g) is type(w)
        if isinstance(w, Text):
            assert g.text == w.text
        else:
            assert np.array_equal(np.asarray(g.image), np.asarray(w.image))


# --- build, open, search, documents -------------------------------------------------------

def test_build_flat_matches_brute_force_and_round_trips(tmp_path):
    docs = make_docs(45)
    empty = Document([Text("   ")], id="blank")
    bank = build(tmp_path, docs[:20] + [empty] + docs[20:])
    assert len(bank) == 45 and bank.last_ingest.skipped_empty == 1
    meta = json.loads((tmp_path / "index" / "bank.json").read_text())
    assert meta["format"] == 1 and meta["count"] == 45 and meta["dim"] == 32 and meta["kind"] == "flat"
    assert meta["modalities"] == {"text+image": 15, "text": 15, "image": 15} and meta["skipped_empty"] == 1
    assert meta["encoder"] == {"path": str((tmp_path / "enc_a").resolve()),
                               "fingerprint": HashEmbedder(tmp_path / "enc_a").fingerprint}
    assert not list(tmp_path.glob("index.tmp-*")), "the temporary build folder is renamed into place"

    bank = MemoryBank.open(tmp_path / "index", embedder=HashEmbedder(tmp_path / "enc_a"))
    embeddings = HashEmbedder(tmp_path / "enc_a").embed_documents(docs)
    np.testing.assert_allclose(bank.embeddings(range(45)), embeddings, atol=1e-6)
    queries = HashEmbedder(tmp_path / "enc_a").embed_texts(["word1 word2", "word3", "doc7 word9"])
    scores, ids = bank.search(queries, 5)
    brute = queries @ embeddings.T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :5], atol=1e-5)
    assert ids.dtype == np.int64 and scores.dtype == np.float32

    scores, ids = bank.search(queries[:1], 50)  # more than the bank holds
    assert (ids[0, 45:] == -1).all() and np.isinf(scores[0, 45:]).all() and (ids[0, :45] >= 0).all()

    for i in (0, 1, 2, 44):  # text+image, text only, image only
        assert_same_document(bank.document(i), docs[i])
    assert [d.id for d in bank.documents([3, 1])] == ["d3", "d1"]
    assert bank.has_text.tolist() == [i % 3 != 2 for i in range(45)]
    assert bank.has_image.tolist() == [i % 3 != 1 for i in range(45)]
    assert bank.key(5) == document_key(docs[5])
    with pytest.raises(IndexError, match="out of range"):
        bank.embeddings([-1])


def test_document_key_is_content_not_id():
    image = quadrant_image(np.random.default_rng(1))
    a = Document([Text("a cat"), Image(image)], id="x")
    same = Document([Text("a cat"), Image(image.copy())], {"source": "other"}, id="y")
    pixel = np.asarray(image).copy()
    pixel[0, 0, 0] ^= 1
    assert document_key(a) == document_key(same)
    assert document_key(a) != document_key(Document([Text("a cat"), Image(PIL.Image.fromarray(pixel))]))
    assert document_key(a) != document_key(Document([Image(image), Text("a cat")]))  # order counts


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_themselves(tmp_path, kind):
    docs = make_docs(300, seed=3)
    bank = build(tmp_path, docs, kind=kind)
    assert bank.kind == kind
    params = bank.meta["index_params"]
    if kind == "ivf":
        assert params["nlist"] == 300 // 39 and 1 <= params["nprobe"] <= params["nlist"] and bank.notes
        assert bank._index.nprobe == params["nprobe"]  # set again on open
    else:
        assert bank._index.hnsw.efSearch == params["ef_search"]
    scores, ids = bank.search(bank.embeddings(range(300)), 1)
    assert (ids[:, 0] == np.arange(300)).mean() >= 0.99

    added = bank.add(make_docs(30, seed=4, start=300), HashEmbedder(tmp_path / "enc_a"))
    assert added == 30 and len(MemoryBank.open(tmp_path / "index")) == 330
    _, ids = bank.search(bank.embeddings(range(300, 330)), 1)
    assert (ids[:, 0] == np.arange(300, 330)).mean() >= 0.95


def test_ivf_too_small_falls_back_or_refuses(tmp_path):
    bank = build(tmp_path, make_docs(20), kind="ivf")
    assert bank.kind == "flat" and "too few" in bank.notes[0]
    with pytest.raises(BankError, match=r"nlist=8 needs at least 312 documents.*--nlist 2 or less"):
        build(tmp_path, make_docs(90), kind="ivf", name="ivf2", nlist=8)


def test_add_appends_without_rebuilding(tmp_path):
    first, more = make_docs(30), make_docs(12, seed=9, start=30)
    bank = build(tmp_path, first, source="first.jsonl")
    index_before = (tmp_path / "index" / "index.faiss").stat().st_mtime_ns
    added = bank.add(more[:6] + [Document([])] + more[6:], HashEmbedder(tmp_path / "enc_a"), source="more.jsonl")
    assert added == 12 and len(bank) == 42 and bank.last_ingest.skipped_empty == 1
    assert (tmp_path / "index" / "index.faiss").stat().st_mtime_ns >= index_before

    reopened = MemoryBank.open(tmp_path / "index")
    meta = reopened.meta
    assert meta["count"] == 42 and meta["sources"] == ["first.jsonl", "more.jsonl"]
    assert sum(meta["modalities"].values()) == 42 and meta["skipped_empty"] == 1
    queries = HashEmbedder(tmp_path / "enc_a").embed_documents(more)
    _, ids = reopened.search(queries, 1)
    assert ids[:, 0].tolist() == list(range(30, 42))
    for i in (0, 29, 30, 41):
        assert_same_document(reopened.document(i), (first + more)[i])


def test_interrupted_add_is_rolled_back(tmp_path):
    bank = build(tmp_path, make_docs(20))
    size = (tmp_path / "index" / "store" / "documents.jsonl").stat().st_size

    def docs_then_interrupt():
        yield from make_docs(20, seed=5, start=20)  # a full batch is written to the store first
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bank.add(docs_then_interrupt(), HashEmbedder(tmp_path / "enc_a"))
    assert (tmp_path / "index" / "store" / "documents.jsonl").stat().st_size == size
    assert len(MemoryBank.open(tmp_path / "index")) == 20 and len(bank) == 20
    assert not list((tmp_path / "index").glob("*tmp*"))


def test_build_refuses_a_folder_that_is_not_a_bank_and_replaces_a_bank(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(BankError, match="not a memory bank; choose another --out"):
        build(tmp_path, make_docs(3), name="taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    build(tmp_path, make_docs(5))
    assert len(build(tmp_path, make_docs(3))) == 3
    with pytest.raises(BankError, match="no documents to index"):
        build(tmp_path, [Document([Text(" ")])], name="empty")
    assert not (tmp_path / "empty").exists()


# --- refusals ---------------------------------------------------------------------------------

@pytest.fixture
def small_bank(tmp_path):
    build(tmp_path, make_docs(12))
    return tmp_path / "index"


def test_refuses_store_shorter_than_index(small_bank):
    store = small_bank / "store" / "documents.jsonl"
    lines = store.read_bytes().splitlines(keepends=True)
    store.write_bytes(b"".join(lines[:-2]))
    with pytest.raises(BankError) as e:
        MemoryBank.open(small_bank)
    message = str(e.value)
    assert "index.faiss has 12 vectors" in message and "store has 10 documents" in message
    assert "disagree" in message and "mixmodal index build" in message


def test_an_add_cut_before_its_commit_reads_as_the_old_bank(small_bank):
    """What a killed `index add` leaves before its commit (the store's tail, temporaries) is not the bank:
    readers skip it without writing, and the next add rolls it back before its own."""
    store = small_bank / "store" / "documents.jsonl"
    size = store.stat().st_size
    with open(store, "ab") as f:
        f.write(b'{"parts": [{"type": "text", "text": "half"}]}\n')
    (small_bank / "keys.npy.add-tmp").write_bytes(b"half-written")
    bank = MemoryBank.open(small_bank)
    assert len(bank) == 12 and "interrupted before its commit" in bank.pending
    assert store.stat().st_size > size and (small_bank / "keys.npy.add-tmp").exists()  # opening writes nothing
    assert bank.add(make_docs(2, start=12), HashEmbedder(small_bank.parent / "enc_a")) == 2
    assert len(bank) == 14 and bank.pending is None and not (small_bank / "keys.npy.add-tmp").exists()
    assert_same_document(MemoryBank.open(small_bank).document(12), make_docs(2, start=12)[0])
    # the same add again (as after a kill past its commit): nothing is added twice
    again = make_docs(2, start=12) + make_docs(1, seed=3, start=15)
    assert bank.add(again, HashEmbedder(small_bank.parent / "enc_a")) == 1
    assert len(bank) == 15 and bank.last_ingest.skipped_present == 2


def test_refuses_counts_that_disagree(small_bank):
    meta = json.loads((small_bank / "bank.json").read_text())
    np.save(small_bank / "embeddings.npy", np.zeros((11, 32), np.float32))
    with pytest.raises(BankError, match=r"embeddings.npy is float32 \(11, 32\).*12 vectors.*index build"):
        MemoryBank.open(small_bank)
    meta["count"] = 13
    (small_bank / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(BankError, match=r"index.faiss has 12 vectors but .*bank.json counts 13"):
        MemoryBank.open(small_bank)


@pytest.mark.parametrize("name", ["index.faiss", "embeddings.npy", "keys.npy", "store/offsets.npy", "bank.json"])
def test_refuses_missing_files(small_bank, name):
    (small_bank / name).unlink()
    with pytest.raises(BankError, match=rf"{name}.* is missing.*mixmodal index build"):
        MemoryBank.open(small_bank)


def test_refuses_missing_folder_and_wrong_encoder(tmp_path, small_bank):
    with pytest.raises(BankError, match=r"nope: no such index folder; build one with `mixmodal index build"):
        MemoryBank.open(tmp_path / "nope")
    other = HashEmbedder(tmp_path / "enc_b")
    with pytest.raises(BankError) as e:
        MemoryBank.open(small_bank, embedder=other)
    message = str(e.value)
    assert str(tmp_path / "enc_a") in message and other.fingerprint[:12] in message
    assert "pass the encoder the index was built with" in message
    bank = MemoryBank.open(small_bank)
    with pytest.raises(BankError, match="built with encoder"):
        bank.add(make_docs(2), other)
    assert len(MemoryBank.open(small_bank)) == 12

    narrow = HashEmbedder(tmp_path / "enc_a")
    narrow.dim = 16  # same weights file, other width: a broken encoder folder
    with pytest.raises(BankError, match=r"holds 32-dim embeddings but encoder .*enc_a gives 16-dim"):
        MemoryBank.open(small_bank, embedder=narrow)
    with pytest.raises(BankError, match=r"queries of shape \(2, 16\) do not match .*32-dim"):
        bank.search(np.zeros((2, 16), np.float32), 3)


def test_load_embedder_checks_the_fingerprint(tmp_path, small_bank, monkeypatch):
    monkeypatch.setattr(bank_module, "load_document_embedder", lambda path, device="cpu": HashEmbedder(path))
    bank = MemoryBank.open(small_bank)
    assert bank.load_embedder().fingerprint == bank.encoder_fingerprint
    with pytest.raises(BankError, match=r"was built with encoder .*enc_a .*enc_b has"):
        bank.load_embedder(tmp_path / "enc_b")


# --- the CLI ----------------------------------------------------------------------------------

@pytest.fixture
def cli_data(tmp_path, monkeypatch):
    monkeypatch.setattr(bank_module, "load_document_embedder", lambda path, device="cpu": HashEmbedder(path))
    for name in ("enc_a", "enc_b"):
        (tmp_path / name).mkdir()
    docs = make_docs(24)
    write_jsonl(docs[:18], tmp_path / "data" / "documents.jsonl")
    write_jsonl(docs[18:], tmp_path / "more" / "documents.jsonl")
    with open(tmp_path / "data" / "documents.jsonl", "a") as f:
        f.write("{not json\n")
    docs[2].images[0].save(tmp_path / "query.png")
    return tmp_path, docs


def test_cli_build_query_add_info(cli_data, capsys):
    tmp_path, docs = cli_data
    index = str(tmp_path / "index")
    assert main(["index", "build", str(tmp_path / "data"), "--encoder", str(tmp_path / "enc_a"), "--out", index,
                 "--quiet", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "indexed 18 documents (6 text+image, 6 text, 6 image) into a flat index" in out
    assert "skipped 1 bad input, 0 empty" in out and "malformed-json: 1" in out

    assert main(["index", "query", index, "--text", docs[4].texts[0], "--k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["1", "1.0000", "#4"] and "text" in lines[0]

    assert main(["index", "query", index, "--image", str(tmp_path / "query.png"), "--k", "2", "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["rank"] for r in results] == [1, 2] and results[0]["id"] == 2 and results[0]["modalities"] == "image"
    assert Path(results[0]["images"][0]).is_file() and results[0]["doc_id"] == "d2"

    assert main(["index", "query", index, "--image", str(tmp_path / "query.png"), "--k", "2", "--json",
                 "--select"]) == 0
    selected = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert selected and all(r["id"] != 2 for r in selected)  # the query's own content is never selected

    assert main(["index", "add", index, str(tmp_path / "more"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "added 6 documents (2 text+image, 2 text, 2 image) (24 in all)" in out

    assert main(["index", "info", index]) == 0
    out = capsys.readouterr().out
    assert "24 documents, dim 32, flat index" in out and "check:      ok" in out and "more" in out

    (tmp_path / "index" / "embeddings.npy").unlink()
    assert main(["index", "info", index]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_cli_errors_are_one_line(cli_data, capsys):
    tmp_path, _ = cli_data
    index = str(tmp_path / "index")
    assert main(["index", "build", str(tmp_path / "data"), "--encoder", str(tmp_path / "enc_a"), "--out", index,
                 "--quiet"]) == 0
    capsys.readouterr()
    for argv, expected in [
        (["index", "query", index, "--text", "word1", "--encoder", str(tmp_path / "enc_b")], "fingerprint"),
        (["index", "add", index, str(tmp_path / "more"), "--encoder", str(tmp_path / "enc_b")], "fingerprint"),
        (["index", "info", str(tmp_path / "missing")], "no such index folder"),
        (["index", "query", str(tmp_path / "missing"), "--text", "x"], "mixmodal index build"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"mixmodal index {argv[1]}: error: ") and expected in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- with the real dual encoder -----------------------------------------------------------------

def save_tiny_encoder(out: Path, seed: int) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mixmodal.retrieval.document_embedder import save_dual_encoder
    from mixmodal.retrieval.encoder import DualEncoder, DualEncoderConfig, TextTowerConfig, VisionTowerConfig

    names = ["<pad>", "<bos>", "<eos>", "<unk>", *WORDS]
    tokenizer = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tower = dict(dim=16, num_layers=1, num_heads=2, mlp_dim=32)
    config = DualEncoderConfig(embed_dim=16, text=TextTowerConfig(vocab_size=len(names), max_length=16, **tower),
                               vision=VisionTowerConfig(image_size=8, patch_size=4, **tower))
    torch.manual_seed(seed)
    return save_dual_encoder(DualEncoder(config), tokenizer, out)


def test_real_encoder_builds_a_bank_and_retrieves(tmp_path):
    from mixmodal.retrieval.document_embedder import DocumentEmbedder
    from mixmodal.retrieval.select import Retriever, SelectionConfig

    encoder = save_tiny_encoder(tmp_path / "encoder", seed=0)
    save_tiny_encoder(tmp_path / "other", seed=1)
    docs = make_docs(30)
    bank = MemoryBank.build(docs, DocumentEmbedder.from_pretrained(encoder), tmp_path / "index", progress=False)
    assert len(bank) == 30 and bank.dim == 16
    retriever = Retriever.open(tmp_path / "index", SelectionConfig(k=2, max_similarity=1.5))
    assert retriever.embedder.fingerprint == bank.encoder_fingerprint
    assert bank.search(retriever.embedder.embed_documents(docs[:5]), 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    retrieved = retriever.retrieve(docs[:5])
    assert all(len(ids) == 2 and i not in ids for i, ids in enumerate(retrieved))  # never itself
    with pytest.raises(BankError, match="fingerprint"):
        Retriever.open(tmp_path / "index", encoder=tmp_path / "other")
    (tmp_path / "encoder" / "model.safetensors").unlink()
    with pytest.raises(BankError, match=r"cannot load encoder .*encoder \(the encoder recorded in .*bank.json\)"):
        MemoryBank.open(tmp_path / "index").load_embedder()


def test_add_interrupted_while_replacing_files_is_finished(tmp_path, monkeypatch):
    """A failure after the commit point (commit.json written) moves the rest into place: the new bank."""
    bank = build(tmp_path, make_docs(12))
    real_replace, calls = bank_module.os.replace, []

    def replace_then_crash(src, dst):
        calls.append(dst)
        if str(dst).endswith("embeddings.npy"):  # the first file the commit moves into place
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(bank_module.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="disk full"):
        bank.add(make_docs(4, seed=3, start=12), HashEmbedder(tmp_path / "enc_a"))
    monkeypatch.setattr(bank_module.os, "replace", real_replace)
    reopened = MemoryBank.open(tmp_path / "index")  # read through commit.json: the new files not yet moved
    assert len(reopened) == 16 and "commit" in reopened.pending and (tmp_path / "index" / "commit.json").exists()
    assert len(bank) == 16 and bank.search(bank.embeddings([13]), 1)[1][0, 0] == 13
    assert reopened.add(make_docs(1, start=16), HashEmbedder(tmp_path / "enc_a")) == 1  # finishes it first
    assert len(MemoryBank.open(tmp_path / "index")) == 17 and not (tmp_path / "index" / "commit.json").exists()


def test_pickles_by_reopening(tmp_path):
    import pickle

    bank = build(tmp_path, make_docs(6))
    copy = pickle.loads(pickle.dumps(bank))
    assert len(copy) == 6 and copy.path == bank.path
    np.testing.assert_array_equal(copy.search(bank.embeddings([4]), 2)[1], bank.search(bank.embeddings([4]), 2)[1])


def test_reindex_changes_kind_without_re_encoding(tmp_path):
    bank = build(tmp_path, make_docs(80))
    queries = bank.embeddings(range(0, 80, 7))
    _, flat_ids = bank.search(queries, 3)
    assert bank.reindex("hnsw") == [] and bank.kind == "hnsw"
    reopened = MemoryBank.open(tmp_path / "index")
    assert reopened.kind == "hnsw" and reopened.meta["index_params"]["ef_search"] > 0
    np.testing.assert_array_equal(reopened.search(queries, 3)[1], flat_ids)
