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

This module holds bank.json, `open`'s check and the build / add / reindex steps over all the
files; keys.npy and the store are store.py's, index.faiss is index.py's, the embedder's boundary
checks are embed.py's, and the write transaction (journal, lock, swap) is transaction.py's.

Consistency is what `open` checks: every file counts N rows, and the store file reaches where
offsets.npy ends. A bank is always the old one or the new one, whenever a writer is killed: the
build / add / reindex transaction, its commit journal (commit.json), write lock and folder swap
are transaction.py's (its docstring tells the steps).

Embeddings are normalised, so inner product is cosine similarity (CM3Leon §2.1 retrieves
by maximum inner product over mean-of-modalities CLIP embeddings).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mixmodal.documents import Document
from mixmodal.retrieval.embed import embedder_dim, load_document_embedder
from mixmodal.retrieval.errors import DISAGREE, BankError, build_hint, rebuild_hint
from mixmodal.retrieval.index import (KINDS, add_rows, apply_search_params, build_index, check_kind, load_index,
                                      search_index, write_index)
from mixmodal.retrieval.store import (DocumentStore, IngestStats, StoreWriter, assemble_embeddings, document_key,
                                      load_npy, load_store, save_npy)
from mixmodal.retrieval.transaction import (FILES, JOURNAL, NEW, REPLACED, commit, disk_error, exchange,
                                            finish_commit, move_into_place, moved_aside, recover, resolve,
                                            temporaries, tidy_siblings, unlink_quietly, why, write_json, write_lock)
from mixmodal.train import faults
from mixmodal.weights import sync_to_disk

FORMAT = 1
_exchange = exchange  # build's folder swap, looked up here when it runs (tests make it fail through this name)


class MemoryBank:
    """A FAISS index over normalised document embeddings, the documents, and the encoder's
    fingerprint. Build with `MemoryBank.build`, open (checked) with `MemoryBank.open`."""

    def __init__(self, path: Path, meta: dict, index, embeddings: np.ndarray, keys: np.ndarray,
                 offsets: np.ndarray, pending: str | None = None) -> None:
        self.path = path
        self.pending = pending  # an interrupted write the next writer will finish or roll back (read around)
        self._meta = meta
        self._index = index
        self._embeddings = embeddings  # memory-mapped
        self._store = DocumentStore(path, keys, offsets)
        self.notes: list[str] = []  # things a build decided for the user (an IVF fallen back to flat, ...)
        self.last_ingest = IngestStats()
        self._broken: str | None = None
        apply_search_params(self._index, self.kind, self._meta.get("index_params", {}))

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
        check_kind(kind)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tidy_siblings(out)
        _check_out_dir(out, overwrite)
        dim = embedder_dim(embedder)
        out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            (tmp / "store").mkdir()
            writer = StoreWriter(tmp, start_row=0, start_offset=0, dim=dim)
            stats = writer.write(_progress(docs, progress, "index"), embedder, batch_size)
            if stats.added == 0:
                raise BankError(f"no documents to index for {out}{' from ' + source if source else ''} "
                                f"({stats.skipped_empty} empty skipped): check the source")
            embeddings = assemble_embeddings(None, writer.raw_path, tmp / "embeddings.npy", dim)
            writer.raw_path.unlink()
            index, params, notes = build_index(embeddings, kind, nlist)
            del embeddings
            write_index(index, tmp / "index.faiss")
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
            write_json(tmp / "bank.json", meta)
            sync_to_disk(tmp, [tmp / name for name in FILES])
            faults.point("index:build")
            move_into_place(tmp, out, _exchange)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bank = cls.open(out)
        stats.seconds = time.perf_counter() - started
        bank.notes, bank.last_ingest = notes, stats
        return bank

    def add(self, docs: Iterable[Document], embedder, *, batch_size: int = 256, source: str = "",
            progress: bool = False) -> int:
        """Append documents without rebuilding (index.add; store, embeddings and keys appended), as one
        transaction (the module docstring): killed anywhere, the bank is the old one or the new one.
        Documents whose content is already in the bank (the same document_key) are skipped and counted
        (`last_ingest.skipped_present`), so running an add again after it was killed, committed or not,
        ends with the same bank. Refuses an encoder other than the bank's. Returns the number added."""
        self.check_embedder(embedder)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        with self._writing("add to"):
            return self._add(docs, embedder, batch_size, source, progress)

    def _add(self, docs: Iterable[Document], embedder, batch_size: int, source: str, progress: bool) -> int:
        on_disk = _read_meta(self.path)
        if on_disk.get("count") != len(self):
            raise BankError(f"{self.path}/bank.json counts {on_disk.get('count')} documents but this bank was opened "
                            f"with {len(self)}: another process changed it; open it again before adding")
        started = time.perf_counter()
        writer = StoreWriter(self.path, start_row=len(self), start_offset=self._store.end, dim=self.dim)
        new = {name: self.path / f"{name}{NEW}" for name in REPLACED}
        committed = False
        try:
            known = np.sort(np.asarray(self._store.key_rows["key"]))  # re-running an add adds nothing twice
            stats = writer.write(_progress(docs, progress, "add"), embedder, batch_size, known=known)
            del known
            if stats.added == 0:
                writer.raw_path.unlink(missing_ok=True)
                stats.seconds = time.perf_counter() - started
                self.last_ingest = stats
                return 0
            count = len(self) + stats.added
            embeddings = assemble_embeddings(self._embeddings, writer.raw_path, new["embeddings.npy"], self.dim)
            save_npy(new["keys.npy"], np.concatenate([np.asarray(self._store.key_rows), writer.keys()]))
            save_npy(new["store/offsets.npy"], np.concatenate([np.asarray(self._store.offsets[:-1]), writer.offsets()]))
            add_rows(self._index, embeddings, len(self), count)  # the in-memory index; reloaded from disk on failure
            del embeddings
            write_index(self._index, new["index.faiss"])
            meta = dict(on_disk)
            meta["count"] = count
            meta["modalities"] = {m: meta.get("modalities", {}).get(m, 0) + n for m, n in stats.modalities.items()}
            meta["skipped_empty"] = meta.get("skipped_empty", 0) + stats.skipped_empty
            meta["sources"] = list(meta.get("sources", [])) + ([source] if source else [])
            meta["updated"] = _now()
            write_json(new["bank.json"], meta)
            sync_to_disk(self.path, [*new.values(), self.path / "store" / "documents.jsonl"])
            faults.point("index:prepared")
            commit(self.path, list(new))  # the commit point: from here on the bank is the new one
            committed = True
            finish_commit(self.path)
            writer.raw_path.unlink(missing_ok=True)
        except BaseException as e:
            if committed:  # a failure while moving files into place: finish it (the next writer would)
                try:
                    finish_commit(self.path)
                except OSError:
                    pass
            else:  # nothing but the store's tail and temporaries have changed: remove them
                for p in (writer.raw_path, *new.values()):
                    unlink_quietly(p)
                try:
                    writer.truncate()
                except OSError:
                    pass  # a read-only folder: the tail stays, ignored by readers, cut by the next writer
            try:
                self._reload()
            except BankError as reload_error:  # cannot happen by the transaction's design; named if it does
                self._broken = str(reload_error)
            if disk_error(e, self.path):
                state = "the add is committed" if committed else "nothing was added: the bank is as it was"
                raise BankError(f"cannot write to {self.path} ({why(e)}): {state}; free "
                                "space on that disk or make the folder writable, then run `mixmodal index add` "
                                "again") from None
            raise
        self._reload()
        stats.seconds = time.perf_counter() - started
        self.last_ingest = stats
        return stats.added

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """This process as the bank's one writer (INDEX/write.lock), an interrupted write finished or rolled back
        first; a folder that cannot be written is one line."""
        try:
            with write_lock(self.path):
                if recover(self.path, _read_count):
                    self._reload()
                yield
        except OSError as e:
            if not disk_error(e, self.path):
                raise
            raise BankError(f"cannot {what} {self.path} ({why(e)}): nothing was "
                            "changed; free space on that disk or make the folder writable, then run it again") from None

    def reindex(self, kind: str, *, nlist: int | None = None) -> list[str]:
        """Rebuild index.faiss as another kind from embeddings.npy (no re-encoding), committed with bank.json as
        one transaction. Returns notes."""
        check_kind(kind)
        with self._writing("reindex"):
            index, params, notes = build_index(self._embeddings, kind, nlist)
            write_index(index, self.path / f"index.faiss{NEW}")
            meta = _read_meta(self.path)
            meta["kind"] = params.pop("kind")
            meta["index_params"] = params
            write_json(self.path / f"bank.json{NEW}", meta)
            sync_to_disk(self.path, [self.path / f"index.faiss{NEW}", self.path / f"bank.json{NEW}"])
            commit(self.path, ["index.faiss", "bank.json"])
            finish_commit(self.path)
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
        self._meta, self._index, self._embeddings, keys, offsets, self.pending = _load(self.path)
        self._store = DocumentStore(self.path, keys, offsets)  # an empty cache
        self._broken = None
        apply_search_params(self._index, self.kind, self._meta.get("index_params", {}))

    def check_embedder(self, embedder) -> None:
        """BankError unless `embedder` is the encoder this bank was built with (same weights)."""
        given = str(getattr(embedder, "fingerprint", ""))
        if given != self.encoder_fingerprint:
            raise BankError(
                f"{self.path} was built with encoder {self.encoder_path} "
                f"(fingerprint {self.encoder_fingerprint[:12]}...); "
                f"{getattr(embedder, 'path', 'the given encoder')} has {given[:12] or 'none'}...: pass the encoder "
                f"the index was built with (--encoder {self.encoder_path}), or rebuild the index with "
                f"{build_hint(self.path)}"
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
        return np.asarray(self._store.key_rows["has_text"])

    @property
    def has_image(self) -> np.ndarray:
        return np.asarray(self._store.key_rows["has_image"])

    def key(self, i: int) -> str:
        return self._store.key(i)

    def keys(self, ids) -> np.ndarray:
        """Content keys of `ids` as an array of 40-byte hex strings (bytes)."""
        return self._store.keys(ids)

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
        return search_index(self._index, q, k)

    def embeddings(self, ids) -> np.ndarray:
        """Rows of embeddings.npy, float32 [len(ids), D] (a copy)."""
        return np.asarray(self._embeddings[self._store.check_ids(ids)], dtype=np.float32)

    def document(self, i: int) -> Document:
        """Row i of the store (random access through offsets.npy; recent ones cached); a copy
        the caller may edit."""
        return self._store.document(i)

    def documents(self, ids) -> list[Document]:
        return [self._store.document(int(i)) for i in ids]


# --- files -----------------------------------------------------------------------------------

def _load(path: Path):
    """(meta, index, embeddings, keys, offsets, pending) of the bank at `path`, all checked to agree.
    A write being committed by another process can move a file between finding and opening it: tried
    again then."""
    for attempt in range(3):
        try:
            return _load_once(path)
        except FileNotFoundError as e:
            if attempt == 2:
                raise BankError(f"{e.filename or path}: a file of {path} vanished while it was read: another process "
                                "keeps writing to it; try again when it has finished") from None
            time.sleep(0.05 * (attempt + 1))


def _load_once(path: Path):
    rebuild = rebuild_hint(path)
    if not path.is_dir():
        raise BankError(f"{path}: no such index folder; {moved_aside(path) or 'build one with ' + build_hint(path)}")
    files, committing = resolve(path)
    meta = _read_meta(path, files["bank.json"])
    for name in FILES:
        if not files[name].is_file():
            raise BankError(f"{path / name} is missing: {path} is not a complete memory bank (an interrupted build, "
                            f"or files moved?); {rebuild}")
    count, dim = meta["count"], meta["dim"]
    index = load_index(path, count, dim, files["index.faiss"])
    embeddings = load_npy(files["embeddings.npy"], rebuild)
    if embeddings.dtype != np.float32 or embeddings.shape != (count, dim):
        raise BankError(f"{files['embeddings.npy']} is {embeddings.dtype} {embeddings.shape} but "
                        f"{path / 'index.faiss'} has {count} vectors of dim {dim}: {DISAGREE}; {rebuild}")
    keys, offsets, tail = load_store(path, count, files["keys.npy"], files["store/offsets.npy"])
    pending = None
    if committing:
        pending = (f"an add's commit ({path / JOURNAL}) is not finished (a writer is moving files into place, or was "
                   "killed doing so): read as the new bank; the next `mixmodal index add` finishes it")
    elif tail or temporaries(path):
        pending = (f"an add was interrupted before its commit: {tail} bytes after the last document of "
                   f"{path / 'store' / 'documents.jsonl'} and {len(temporaries(path))} temporary file(s) are not "
                   "part of the bank (or a writer is still at work); the next `mixmodal index add` removes them")
    return meta, index, embeddings, keys, offsets, pending



def _read_count(path: Path) -> int:
    return _read_meta(path)["count"]


def _read_meta(path: Path, file: Path | None = None) -> dict:
    file = path / "bank.json" if file is None else file
    if not file.is_file():
        hint = "" if any(path.iterdir()) else " (the folder is empty)"
        raise BankError(f"{path / 'bank.json'} is missing{hint}: {path} is not a memory bank; build one with "
                        f"{build_hint(path)}")
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
        raise BankError(f"{path}: no such index folder; {moved_aside(path) or 'build one with ' + build_hint(path)}")
    return _read_meta(path, resolve(path)[0]["bank.json"])



def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BankError(f"{out} is a file; choose a folder for the index with --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "bank.json").is_file() and not overwrite:
        raise BankError(f"{out} is a non-empty folder that is not a memory bank; choose another --out, or pass "
                        "overwrite=True (--overwrite) to replace it")



def _progress(docs: Iterable[Document], enabled: bool, desc: str) -> Iterable[Document]:
    if not enabled:
        return docs
    from tqdm import tqdm

    return tqdm(docs, desc=desc, unit="doc")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# load_document_embedder is imported for MemoryBank.load_embedder and is the seam the tests and
# `mixmodal index build` go through (patch mixmodal.retrieval.bank.load_document_embedder).
__all__ = ["BankError", "MemoryBank", "document_key", "load_document_embedder", "read_bank_json"]
