"""The memory bank: a FAISS inner-product index over document embeddings, plus the documents.

An index directory (one writer at a time):

    INDEX/bank.json              format, count, dim, kind, metric, encoder {path, fingerprint},
                                 sources, created, modalities, index_params (nlist/nprobe, efSearch)
    INDEX/index.faiss            vector i is store row i (ids 0..N-1, in order)
    INDEX/embeddings.npy         float32 [N, D], L2-normalised: selection's diversity check reads
                                 it, and `add` / `reindex` need no re-encoding
    INDEX/keys.npy               per row: content key (document_key), has_text, has_image
    INDEX/store/documents.jsonl  one record per row (documents.py schema); images as PNG files
                                 under store/images/, named by row
    INDEX/store/offsets.npy      int64 [N + 1]: byte offset of each line, then the file's size

Consistency is what `open` checks: every file counts N rows, and the store file ends where
offsets.npy says. `build` writes a sibling temporary folder and renames it into place;
`add` appends to the store, then replaces the other files one by one, bank.json last, so an
interrupted add leaves counts that disagree (refused by `open`) rather than a bank that is
silently wrong. An add interrupted before that point (while encoding) is rolled back.

Embeddings are normalised, so inner product is cosine similarity (CM3Leon §2.1 retrieves
by maximum inner product over mean-of-modalities CLIP embeddings).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from mixmodal.documents import Document, Text, document_to_record, record_to_document

FORMAT = 1
KINDS = ("flat", "ivf", "hnsw")
HNSW_M = 32  # neighbours per node: FAISS's usual choice for a high-recall graph
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # candidates kept while searching; FAISS uses max(efSearch, k)
MIN_POINTS_PER_LIST = 39  # FAISS k-means wants >= 39 training points per centroid
TRAIN_POINTS_PER_LIST = 256  # ... and samples down to 256 per centroid anyway
ROWS_PER_IMAGE_FOLDER = 1000  # store/images/00012/00012345_0.png: no folder of a million files
CACHE_SIZE = 256  # documents kept decoded by `document`
_KEY_DTYPE = np.dtype([("key", "S40"), ("has_text", "?"), ("has_image", "?")])
_FILES = ("bank.json", "index.faiss", "embeddings.npy", "keys.npy", "store/documents.jsonl", "store/offsets.npy")
_ADD_CHUNK = 65536  # rows per copy / index.add call


class BankError(ValueError):
    """A memory bank that cannot be used as asked; the message names the file and the fix."""


def document_key(doc: Document) -> str:
    """A stable identity of the document's content: sha1 over its text parts and each
    image's size and RGB bytes, in order. Not `doc.id`: the same content read from another
    source must match, so that a query never retrieves itself."""
    h = hashlib.sha1()
    for part in doc.parts:
        if isinstance(part, Text):
            data = part.text.encode("utf-8")
            h.update(b"T" + len(data).to_bytes(8, "little") + data)
        else:
            width, height = part.image.size
            h.update(b"I" + width.to_bytes(4, "little") + height.to_bytes(4, "little") + part.image.tobytes())
    return h.hexdigest()


def modality(has_text: bool, has_image: bool) -> str:
    return "text+image" if has_text and has_image else ("text" if has_text else "image")


def load_document_embedder(path: str | os.PathLike, device: str = "cpu"):
    """DocumentEmbedder.from_pretrained(path) (one place, so tests can swap in a fake)."""
    from mixmodal.retrieval.encoder import DocumentEmbedder

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


@dataclass
class IngestStats:
    """What one build or add took in."""

    added: int = 0
    skipped_empty: int = 0  # documents with neither an image nor non-blank text
    modalities: dict = field(default_factory=lambda: {"text+image": 0, "text": 0, "image": 0})
    seconds: float = 0.0


class MemoryBank:
    """A FAISS index over normalised document embeddings, the documents, and the encoder's
    fingerprint. Build with `MemoryBank.build`, open (checked) with `MemoryBank.open`."""

    def __init__(self, path: Path, meta: dict, index, embeddings: np.ndarray, keys: np.ndarray,
                 offsets: np.ndarray) -> None:
        self.path = path
        self._meta = meta
        self._index = index
        self._embeddings = embeddings  # memory-mapped
        self._keys = keys
        self._offsets = offsets
        self._cache: OrderedDict[int, Document] = OrderedDict()
        self.notes: list[str] = []  # things a build decided for the user (an IVF fallen back to flat, ...)
        self.last_ingest = IngestStats()
        self._broken: str | None = None
        self._apply_search_params()

    # --- building -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        docs: Iterable[Document],
        embedder,
        out: str | os.PathLike,
        *,
        kind: str = "flat",
        batch_size: int = 256,
        source: str = "",
        progress: bool = True,
        nlist: int | None = None,
        overwrite: bool = False,
    ) -> "MemoryBank":
        """Embed `docs` (streamed in batches of `batch_size`) and write a bank to `out`.

        `out` may be missing, empty, or an existing bank (replaced once the new one is
        complete); anything else is refused unless `overwrite`. Documents with neither text
        nor image are skipped and counted (`bank.last_ingest`).
        """
        out = Path(out)
        _check_kind(kind)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_out_dir(out, overwrite)
        dim = _embedder_dim(embedder)
        out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
        try:
            (tmp / "store").mkdir()
            writer = _StoreWriter(tmp, start_row=0, start_offset=0, dim=dim)
            stats = writer.write(_progress(docs, progress, "index"), embedder, batch_size)
            if stats.added == 0:
                raise BankError(f"no documents to index for {out}{' from ' + source if source else ''} "
                                f"({stats.skipped_empty} empty skipped): check the source")
            embeddings = _assemble_embeddings(None, writer.raw_path, tmp / "embeddings.npy", dim)
            writer.raw_path.unlink()
            index, params, notes = _build_index(embeddings, kind, nlist)
            del embeddings
            faiss = _faiss()
            faiss.write_index(index, str(tmp / "index.faiss"))
            np.save(tmp / "keys.npy", writer.keys())
            np.save(tmp / "store" / "offsets.npy", writer.offsets())
            meta = {
                "format": FORMAT,
                "count": stats.added,
                "dim": dim,
                "kind": params["kind"],
                "metric": "inner_product",
                "encoder": {"path": str(Path(embedder.path).resolve()), "fingerprint": str(embedder.fingerprint)},
                "sources": [source] if source else [],
                "created": _now(),
                "modalities": stats.modalities,
                "skipped_empty": stats.skipped_empty,
                "index_params": {k: v for k, v in params.items() if k != "kind"},
            }
            _write_json(tmp / "bank.json", meta)
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bank = cls.open(out)
        stats.seconds = time.perf_counter() - started
        bank.notes, bank.last_ingest = notes, stats
        return bank

    def add(self, docs: Iterable[Document], embedder, *, batch_size: int = 256, source: str = "",
            progress: bool = False) -> int:
        """Append documents without rebuilding (index.add; store, embeddings and keys appended).
        Refuses an encoder other than the bank's. Returns the number added."""
        self.check_embedder(embedder)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        on_disk = _read_meta(self.path)
        if on_disk.get("count") != len(self):
            raise BankError(f"{self.path}/bank.json counts {on_disk.get('count')} documents but this bank was opened "
                            f"with {len(self)}: another process changed it; open it again before adding")
        started = time.perf_counter()
        old_end = int(self._offsets[-1])
        writer = _StoreWriter(self.path, start_row=len(self), start_offset=old_end, dim=self.dim)
        committing = False
        tmp_files: list[Path] = [writer.raw_path]
        try:
            stats = writer.write(_progress(docs, progress, "add"), embedder, batch_size)
            if stats.added == 0:
                writer.raw_path.unlink(missing_ok=True)
                stats.seconds = time.perf_counter() - started
                self.last_ingest = stats
                return 0
            count = len(self) + stats.added
            new = {name: self.path / f"{name}.add-tmp" for name in ("embeddings.npy", "keys.npy", "store/offsets.npy",
                                                                     "index.faiss", "bank.json")}
            tmp_files += list(new.values())
            embeddings = _assemble_embeddings(self._embeddings, writer.raw_path, new["embeddings.npy"], self.dim)
            _save_npy(new["keys.npy"], np.concatenate([np.asarray(self._keys), writer.keys()]))
            _save_npy(new["store/offsets.npy"], np.concatenate([np.asarray(self._offsets[:-1]), writer.offsets()]))
            for start in range(len(self), count, _ADD_CHUNK):  # the in-memory index; reloaded from disk on failure
                self._index.add(np.ascontiguousarray(embeddings[start : min(start + _ADD_CHUNK, count)]))
            del embeddings
            _faiss().write_index(self._index, str(new["index.faiss"]))
            meta = dict(on_disk)
            meta["count"] = count
            meta["modalities"] = {m: meta.get("modalities", {}).get(m, 0) + n for m, n in stats.modalities.items()}
            meta["skipped_empty"] = meta.get("skipped_empty", 0) + stats.skipped_empty
            meta["sources"] = list(meta.get("sources", [])) + ([source] if source else [])
            meta["updated"] = _now()
            _write_json(new["bank.json"], meta)
            committing = True  # from here on a crash leaves counts that disagree; open() refuses them
            for name, tmp_path in new.items():
                os.replace(tmp_path, self.path / name)
            writer.raw_path.unlink(missing_ok=True)
        except BaseException:
            for p in tmp_files:
                p.unlink(missing_ok=True)
            if not committing:  # nothing but the store's tail has changed: cut it off again
                with open(self.path / "store" / "documents.jsonl", "r+b") as f:
                    f.truncate(old_end)
            try:
                self._reload()
            except BankError as e:  # interrupted while replacing files: this bank is unusable until rebuilt
                self._broken = str(e)
            raise
        self._reload()
        stats.seconds = time.perf_counter() - started
        self.last_ingest = stats
        return stats.added

    def reindex(self, kind: str, *, nlist: int | None = None) -> list[str]:
        """Rebuild index.faiss as another kind from embeddings.npy (no re-encoding). Returns notes."""
        _check_kind(kind)
        index, params, notes = _build_index(self._embeddings, kind, nlist)
        tmp = self.path / "index.faiss.reindex-tmp"
        _faiss().write_index(index, str(tmp))
        meta = _read_meta(self.path)
        meta["kind"] = params.pop("kind")
        meta["index_params"] = params
        os.replace(tmp, self.path / "index.faiss")
        _write_json(self.path / "bank.json", meta)
        self._reload()
        return notes

    # --- opening and checking ---------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, embedder=None) -> "MemoryBank":
        """Open a bank, checking that its files agree (and, given `embedder`, that it is the
        encoder the bank was built with)."""
        path = Path(path)
        bank = cls(path, *_load(path))
        if embedder is not None:
            bank.check_embedder(embedder)
        return bank

    def __getstate__(self) -> dict:  # FAISS indexes do not pickle: a worker process reopens the files
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], *_load(state["path"]))

    def _reload(self) -> None:
        self._meta, self._index, self._embeddings, self._keys, self._offsets = _load(self.path)
        self._cache.clear()
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        params = self._meta.get("index_params", {})
        if self.kind == "ivf":
            self._index.nprobe = int(params.get("nprobe", 1))
        elif self.kind == "hnsw":
            self._index.hnsw.efSearch = int(params.get("ef_search", HNSW_EF_SEARCH))

    def check_embedder(self, embedder) -> None:
        """BankError unless `embedder` is the encoder this bank was built with (same weights)."""
        given = str(getattr(embedder, "fingerprint", ""))
        if given != self.encoder_fingerprint:
            raise BankError(
                f"{self.path} was built with encoder {self.encoder_path} "
                f"(fingerprint {self.encoder_fingerprint[:12]}...); "
                f"{getattr(embedder, 'path', 'the given encoder')} has {given[:12] or 'none'}...: pass the encoder "
                f"the index was built with (--encoder {self.encoder_path}), or rebuild the index with "
                f"`mixmodal index build SOURCE --encoder DIR --out {self.path}`"
            )
        if int(getattr(embedder, "dim", -1)) != self.dim:
            raise BankError(f"{self.path} holds {self.dim}-dim embeddings but encoder {embedder.path} gives "
                            f"{embedder.dim}-dim ones: pass the encoder the index was built with ({self.encoder_path})")

    def load_embedder(self, path: str | os.PathLike | None = None, device: str = "cpu"):
        """The bank's encoder (bank.json's path, or `path`), its fingerprint checked."""
        where = Path(path) if path is not None else self.encoder_path
        try:
            embedder = load_document_embedder(where, device=device)
        except (ValueError, FileNotFoundError) as e:
            origin = "" if path is not None else f" (the encoder recorded in {self.path}/bank.json)"
            raise BankError(f"cannot load encoder {where}{origin}: {e}; pass --encoder DIR with the encoder the "
                            f"index was built with (fingerprint {self.encoder_fingerprint[:12]}...)") from None
        self.check_embedder(embedder)
        return embedder

    # --- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._meta["count"])

    def __repr__(self) -> str:
        return f"MemoryBank({str(self.path)!r}, count={len(self)}, dim={self.dim}, kind={self.kind!r})"

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def kind(self) -> str:
        return self._meta["kind"]

    @property
    def meta(self) -> dict:
        """A copy of bank.json."""
        return json.loads(json.dumps(self._meta))

    @property
    def encoder_path(self) -> Path:
        return Path(self._meta["encoder"]["path"])

    @property
    def encoder_fingerprint(self) -> str:
        return str(self._meta["encoder"]["fingerprint"])

    @property
    def has_text(self) -> np.ndarray:
        return np.asarray(self._keys["has_text"])

    @property
    def has_image(self) -> np.ndarray:
        return np.asarray(self._keys["has_image"])

    def key(self, i: int) -> str:
        return self._keys["key"][self._check_id(i)].decode("ascii")

    def keys(self, ids) -> np.ndarray:
        """Content keys of `ids` as an array of 40-byte hex strings (bytes)."""
        return np.asarray(self._keys["key"][self._check_ids(ids)])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores [Q, k] float32, ids [Q, k] int64); -1 ids and -inf
        scores where the bank has fewer than k documents (or the index finds fewer)."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise BankError(f"queries of shape {tuple(np.shape(queries))} do not match {self.path}, which holds "
                            f"{self.dim}-dim embeddings: embed them with the bank's encoder ({self.encoder_path})")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._broken:
            raise BankError(f"a failed add left {self.path} inconsistent: {self._broken}")
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        scores, ids = self._index.search(np.ascontiguousarray(q), k)  # (Q, k), (Q, k)
        scores = scores.astype(np.float32)
        ids = ids.astype(np.int64)
        scores[ids < 0] = -np.inf
        return scores, ids

    def embeddings(self, ids) -> np.ndarray:
        """Rows of embeddings.npy, float32 [len(ids), D] (a copy)."""
        return np.asarray(self._embeddings[self._check_ids(ids)], dtype=np.float32)

    def document(self, i: int) -> Document:
        """Row i of the store (random access through offsets.npy; recent ones cached)."""
        i = self._check_id(i)
        doc = self._cache.get(i)
        if doc is None:
            doc = self._read_document(i)
            self._cache[i] = doc
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return Document(list(doc.parts), dict(doc.metadata), doc.id)  # callers may edit their copy

    def documents(self, ids) -> list[Document]:
        return [self.document(int(i)) for i in ids]

    def _read_document(self, i: int) -> Document:
        from mixmodal.data.bad_input import BadInputError, BadInputLog
        from mixmodal.data.images import decode_image
        from mixmodal.documents import MalformedRecord

        store = self.path / "store"
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        with open(store / "documents.jsonl", "rb") as f:
            f.seek(start)
            line = f.read(end - start)
        log = BadInputLog(strict=True)
        try:
            record = json.loads(line.decode("utf-8"))
            return record_to_document(record, lambda data, origin: decode_image(data, origin, log=log,
                                                                                max_pixels=2**40), store)
        except (ValueError, MalformedRecord, BadInputError) as e:
            raise BankError(f"{store / 'documents.jsonl'} row {i} (bytes {start}..{end}) cannot be read: {e}; "
                            f"the store is damaged: rebuild with `mixmodal index build SOURCE --encoder DIR --out {self.path}`"
                            ) from None

    def _check_id(self, i) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"store id {i} out of range for {self.path} ({len(self)} documents)")
        return i

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise IndexError(f"store id {bad} out of range for {self.path} ({len(self)} documents; -1 marks "
                             "a missing search result: drop those first)")
        return ids


# --- writing the store ---------------------------------------------------------------------

class _StoreWriter:
    """Appends documents to INDEX/store (records + PNGs) and their embeddings to a raw file."""

    def __init__(self, root: Path, *, start_row: int, start_offset: int, dim: int) -> None:
        self.root = root
        self.store = root / "store"
        self.row = start_row
        self.position = start_offset
        self.dim = dim
        self.raw_path = root / "embeddings.raw-tmp"
        self._offsets: list[int] = []
        self._keys: list[tuple[bytes, bool, bool]] = []

    def write(self, docs: Iterable[Document], embedder, batch_size: int) -> IngestStats:
        stats = IngestStats()
        with open(self.store / "documents.jsonl", "ab") as f, open(self.raw_path, "wb") as raw:
            if f.tell() != self.position:
                raise BankError(f"{self.store / 'documents.jsonl'} has {f.tell()} bytes but store/offsets.npy ends "
                                f"at {self.position}: the store changed since the bank was opened; open it again")
            for batch in _batches(docs, batch_size):
                kept = [d for d in batch if not d.is_empty()]
                stats.skipped_empty += len(batch) - len(kept)
                if not kept:
                    continue
                embedded = embed_documents_checked(embedder, kept, dim=self.dim, batch_size=batch_size)
                raw.write(embedded.tobytes())
                for doc in kept:
                    self._write_document(f, doc, stats)
        return stats

    def _write_document(self, f, doc: Document, stats: IngestStats) -> None:
        image_dir = None
        if doc.num_images:
            image_dir = self.store / "images" / f"{self.row // ROWS_PER_IMAGE_FOLDER:05d}"
            image_dir.mkdir(parents=True, exist_ok=True)
        record = document_to_record(doc, image_dir, self.store, f"{self.row:08d}", "png")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        f.write(line)
        self._offsets.append(self.position)
        self.position += len(line)
        has_text = any(t.strip() for t in doc.texts)
        has_image = doc.num_images > 0
        self._keys.append((document_key(doc).encode("ascii"), has_text, has_image))
        stats.modalities[modality(has_text, has_image)] += 1
        stats.added += 1
        self.row += 1

    def keys(self) -> np.ndarray:
        return np.array(self._keys, dtype=_KEY_DTYPE)

    def offsets(self) -> np.ndarray:
        """Offsets of the rows written, then the end of the file: int64 [n + 1]."""
        return np.array(self._offsets + [self.position], dtype=np.int64)


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        if not isinstance(doc, Document):
            raise TypeError(f"the memory bank indexes Documents, got {type(doc).__name__}")
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _assemble_embeddings(old: np.ndarray | None, raw_path: Path, out: Path, dim: int) -> np.ndarray:
    """Write embeddings.npy = old rows + the raw file's rows, chunk by chunk (never all in memory)."""
    num_new = raw_path.stat().st_size // (4 * dim)
    num_old = 0 if old is None else len(old)
    target = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(num_old + num_new, dim))
    for start in range(0, num_old, _ADD_CHUNK):
        stop = min(start + _ADD_CHUNK, num_old)
        target[start:stop] = old[start:stop]
    if num_new:
        new = np.memmap(raw_path, dtype=np.float32, mode="r", shape=(num_new, dim))
        for start in range(0, num_new, _ADD_CHUNK):
            stop = min(start + _ADD_CHUNK, num_new)
            target[num_old + start : num_old + stop] = new[start:stop]
        del new
    target.flush()
    return target


# --- the FAISS index -----------------------------------------------------------------------

def _faiss():
    try:
        import faiss
    except ImportError:
        raise BankError("the memory bank needs FAISS: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def _build_index(embeddings: np.ndarray, kind: str, nlist: int | None):
    """An index of `kind` holding `embeddings` in row order. Returns (index, params, notes)."""
    faiss = _faiss()
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
    for start in range(0, n, _ADD_CHUNK):
        index.add(np.ascontiguousarray(embeddings[start : start + _ADD_CHUNK], dtype=np.float32))
    return index, params, notes


# --- files -----------------------------------------------------------------------------------

def _load(path: Path):
    """(meta, index, embeddings, keys, offsets) of the bank at `path`, all checked to agree."""
    rebuild = f"rebuild with `mixmodal index build SOURCE --encoder DIR --out {path}`"
    if not path.is_dir():
        raise BankError(f"{path}: no such index folder; build one with `mixmodal index build SOURCE --encoder DIR "
                        f"--out {path}`")
    meta = _read_meta(path)
    for name in _FILES:
        if not (path / name).is_file():
            raise BankError(f"{path / name} is missing: {path} is not a complete memory bank (an interrupted build, "
                            f"or files moved?); {rebuild}")
    count, dim = meta["count"], meta["dim"]
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as e:
        raise BankError(f"{path / 'index.faiss'} cannot be read by FAISS ({str(e).strip().splitlines()[-1]}); "
                        f"{rebuild}") from None
    disagree = "the index and its store disagree (an interrupted `index add`?)"
    if index.d != dim:
        raise BankError(f"{path / 'index.faiss'} holds {index.d}-dim vectors but {path / 'bank.json'} says dim {dim}: "
                        f"{rebuild}")
    if index.ntotal != count:
        raise BankError(f"{path / 'index.faiss'} has {index.ntotal} vectors but {path / 'bank.json'} counts {count} "
                        f"documents: {disagree}; {rebuild}")
    embeddings = _load_npy(path / "embeddings.npy", rebuild)
    if embeddings.dtype != np.float32 or embeddings.shape != (count, dim):
        raise BankError(f"{path / 'embeddings.npy'} is {embeddings.dtype} {embeddings.shape} but "
                        f"{path / 'index.faiss'} has {count} vectors of dim {dim}: {disagree}; {rebuild}")
    keys = _load_npy(path / "keys.npy", rebuild)
    if keys.dtype != _KEY_DTYPE or keys.shape != (count,):
        raise BankError(f"{path / 'keys.npy'} holds {keys.shape[0] if keys.ndim else 0} rows of {keys.dtype}, but "
                        f"{path / 'index.faiss'} has {count} vectors: {disagree}; {rebuild}")
    offsets = _load_npy(path / "store" / "offsets.npy", rebuild)
    if offsets.dtype != np.int64 or offsets.shape != (count + 1,):
        raise BankError(f"{path / 'store' / 'offsets.npy'} has {len(offsets) - 1} rows but {path / 'index.faiss'} has "
                        f"{count} vectors: {disagree}; {rebuild}")
    store = path / "store" / "documents.jsonl"
    size, end = store.stat().st_size, int(offsets[-1])
    if size != end:
        with open(store, "rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        fix = rebuild
        if size > end:
            fix = (f"truncate {store} to {end} bytes (`truncate -s {end} {store}`) to drop the unfinished add, "
                   f"or {rebuild}")
        raise BankError(f"{path / 'index.faiss'} has {count} vectors but {path / 'store'} has {lines} documents "
                        f"({size} bytes; store/offsets.npy ends at {end}): {disagree}; {fix}")
    return meta, index, embeddings, keys, offsets


def _read_meta(path: Path) -> dict:
    file = path / "bank.json"
    if not file.is_file():
        hint = "" if any(path.iterdir()) else " (the folder is empty)"
        raise BankError(f"{file} is missing{hint}: {path} is not a memory bank; build one with "
                        f"`mixmodal index build SOURCE --encoder DIR --out {path}`")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BankError(f"{file} is not valid JSON ({e}); rebuild the index with `mixmodal index build`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise BankError(f"{file} has format {got!r}; this version of mixmodal reads format {FORMAT}: "
                        "rebuild the index with `mixmodal index build`")
    for name, kind in (("count", int), ("dim", int), ("kind", str), ("encoder", dict)):
        if not isinstance(meta.get(name), kind):
            raise BankError(f"{file} has no valid {name!r} field; rebuild the index with `mixmodal index build`")
    if meta["kind"] not in KINDS or not {"path", "fingerprint"} <= set(meta["encoder"]):
        raise BankError(f"{file}: kind must be one of {', '.join(KINDS)} and encoder must hold path and fingerprint; "
                        "rebuild the index with `mixmodal index build`")
    return meta


def read_bank_json(path: str | os.PathLike) -> dict:
    """bank.json of the bank at `path` (checked for its fields only; `MemoryBank.open` checks the rest)."""
    path = Path(path)
    if not path.is_dir():
        raise BankError(f"{path}: no such index folder; build one with `mixmodal index build SOURCE --encoder DIR "
                        f"--out {path}`")
    return _read_meta(path)


def _load_npy(file: Path, rebuild: str) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise BankError(f"{file} cannot be read ({e}); {rebuild}") from None


def _save_npy(file: Path, array: np.ndarray) -> None:
    with open(file, "wb") as f:  # np.save on a path would append .npy to our temporary names
        np.save(f, array)


def _write_json(file: Path, data: dict) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, file)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise BankError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)} (flat: exact; ivf: inverted "
                        "lists, for millions of documents; hnsw: a graph, fast and memory-hungry)")


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BankError(f"{out} is a file; choose a folder for the index with --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "bank.json").is_file() and not overwrite:
        raise BankError(f"{out} is a non-empty folder that is not a memory bank; choose another --out, or pass "
                        "overwrite=True (--overwrite) to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an old `out` is moved aside first and removed last."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _embedder_dim(embedder) -> int:
    for name in ("dim", "path", "fingerprint", "embed_documents"):
        if not hasattr(embedder, name):
            raise TypeError(f"the embedder {type(embedder).__name__} has no {name!r}; pass a DocumentEmbedder "
                            "(mixmodal.retrieval.encoder)")
    return int(embedder.dim)


def _progress(docs: Iterable[Document], enabled: bool, desc: str) -> Iterable[Document]:
    if not enabled:
        return docs
    from tqdm import tqdm

    return tqdm(docs, desc=desc, unit="doc")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = ["KINDS", "BankError", "IngestStats", "MemoryBank", "document_key", "embed_documents_checked",
           "load_document_embedder", "modality", "read_bank_json"]
