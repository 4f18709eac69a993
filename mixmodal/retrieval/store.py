"""The memory bank's document store: what each row of the bank is, written and read back.

    INDEX/store/documents.jsonl  one record per row (documents.py schema); images as PNG files
                                 under store/images/, named by row
    INDEX/store/offsets.npy      int64 [N + 1]: byte offset of each line, then the file's size
    INDEX/keys.npy               per row: content key (document_key), has_text, has_image

StoreWriter appends rows (records, PNGs, keys, offsets) and their embeddings to a raw file
that assemble_embeddings turns into INDEX/embeddings.npy; DocumentStore reads row i back
by seeking to offsets[i] (recent rows cached); load_store checks that keys.npy, offsets.npy
and documents.jsonl agree on the count. Bytes of documents.jsonl after offsets.npy's end are
an add that never committed: not part of the bank (bank.py's transaction).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mixmodal.data.bad_input import BadInputError, BadInputLog
from mixmodal.data.images import decode_image
from mixmodal.documents import Document, MalformedRecord, Text, document_to_record, record_to_document
from mixmodal.retrieval.embed import embed_documents_checked
from mixmodal.retrieval.errors import DISAGREE, BankError, rebuild_hint
from mixmodal.train import faults

ROWS_PER_IMAGE_FOLDER = 1000  # store/images/00012/00012345_0.png: no folder of a million files
CACHE_SIZE = 256  # documents kept decoded by `document`
KEY_DTYPE = np.dtype([("key", "S40"), ("has_text", "?"), ("has_image", "?")])
COPY_CHUNK = 65536  # rows per copy into embeddings.npy


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


@dataclass
class IngestStats:
    """What one build or add took in."""

    added: int = 0
    skipped_empty: int = 0  # documents with neither an image nor non-blank text
    skipped_present: int = 0  # (add) documents whose content is already in the bank
    modalities: dict = field(default_factory=lambda: {"text+image": 0, "text": 0, "image": 0})
    seconds: float = 0.0


# --- writing ---------------------------------------------------------------------------------

class StoreWriter:
    """Appends documents to INDEX/store (records + PNGs) and their embeddings to a raw file."""

    def __init__(self, root: Path, *, start_row: int, start_offset: int, dim: int) -> None:
        self.root = root
        self.store = root / "store"
        self.row = start_row
        self.start_offset = start_offset
        self.position = start_offset
        self.dim = dim
        self.raw_path = root / "embeddings.raw-tmp"
        self._offsets: list[int] = []
        self._keys: list[tuple[bytes, bool, bool]] = []

    def write(self, docs: Iterable[Document], embedder, batch_size: int, known: np.ndarray | None = None
              ) -> IngestStats:
        """Append `docs` but empty ones and (given `known`, the sorted content keys already stored) those
        whose content is already there, all counted."""
        stats = IngestStats()
        with open(self.store / "documents.jsonl", "ab") as f, open(self.raw_path, "wb") as raw:
            if f.tell() != self.position:
                raise BankError(f"{self.store / 'documents.jsonl'} has {f.tell()} bytes but store/offsets.npy ends "
                                f"at {self.position}: the store changed since the bank was opened; open it again")
            for batch in _batches(docs, batch_size):
                kept = [d for d in batch if not d.is_empty()]
                stats.skipped_empty += len(batch) - len(kept)
                keys = [document_key(d).encode("ascii") for d in kept]
                if known is not None and len(known) and keys:
                    wanted = np.array(keys, dtype=known.dtype)
                    present = known[np.minimum(np.searchsorted(known, wanted), len(known) - 1)] == wanted
                    stats.skipped_present += int(present.sum())
                    kept = [d for d, p in zip(kept, present) if not p]
                    keys = [k for k, p in zip(keys, present) if not p]
                if not kept:
                    continue
                embedded = embed_documents_checked(embedder, kept, dim=self.dim, batch_size=batch_size)
                raw.write(embedded.tobytes())
                for doc, key in zip(kept, keys):
                    self._write_document(f, doc, stats, key)
                faults.point("index:store")  # the soak: killed with a batch appended, nothing committed
        return stats

    def _write_document(self, f, doc: Document, stats: IngestStats, key: bytes) -> None:
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
        self._keys.append((key, has_text, has_image))
        stats.modalities[modality(has_text, has_image)] += 1
        stats.added += 1
        self.row += 1

    def keys(self) -> np.ndarray:
        return np.array(self._keys, dtype=KEY_DTYPE)

    def offsets(self) -> np.ndarray:
        """Offsets of the rows written, then the end of the file: int64 [n + 1]."""
        return np.array(self._offsets + [self.position], dtype=np.int64)

    def truncate(self) -> None:
        """Cut documents.jsonl back to where this writer started (an add rolled back; the
        PNGs it wrote stay, unreferenced, and the next add overwrites them)."""
        with open(self.store / "documents.jsonl", "r+b") as f:
            f.truncate(self.start_offset)


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


def assemble_embeddings(old: np.ndarray | None, raw_path: Path, out: Path, dim: int) -> np.ndarray:
    """Write embeddings.npy = old rows + the raw file's rows, chunk by chunk (never all in memory)."""
    num_new = raw_path.stat().st_size // (4 * dim)
    num_old = 0 if old is None else len(old)
    target = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(num_old + num_new, dim))
    for start in range(0, num_old, COPY_CHUNK):
        stop = min(start + COPY_CHUNK, num_old)
        target[start:stop] = old[start:stop]
    if num_new:
        new = np.memmap(raw_path, dtype=np.float32, mode="r", shape=(num_new, dim))
        for start in range(0, num_new, COPY_CHUNK):
            stop = min(start + COPY_CHUNK, num_new)
            target[num_old + start : num_old + stop] = new[start:stop]
        del new
    target.flush()
    return target


def save_npy(file: Path, array: np.ndarray) -> None:
    with open(file, "wb") as f:  # np.save on a path would append .npy to our temporary names
        np.save(f, array)


# --- reading ---------------------------------------------------------------------------------

class DocumentStore:
    """INDEX/store and keys.npy read back, row by row: row i is documents.jsonl's bytes
    offsets[i]..offsets[i + 1] (and the PNGs it names); the CACHE_SIZE most recently read
    rows are kept decoded. Ids are checked against the row count."""

    def __init__(self, bank_path: Path, keys: np.ndarray, offsets: np.ndarray) -> None:
        self.bank_path = bank_path
        self.root = bank_path / "store"
        self.key_rows = keys  # memory-mapped, KEY_DTYPE
        self.offsets = offsets  # memory-mapped
        self._cache: OrderedDict[int, Document] = OrderedDict()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def end(self) -> int:
        """Where documents.jsonl ends (offsets.npy's last entry)."""
        return int(self.offsets[-1])

    def key(self, i: int) -> str:
        return self.key_rows["key"][self.check_id(i)].decode("ascii")

    def keys(self, ids) -> np.ndarray:
        return np.asarray(self.key_rows["key"][self.check_ids(ids)])

    def document(self, i: int) -> Document:
        """Row i, decoded (recent ones cached); a copy, which the caller may edit."""
        i = self.check_id(i)
        doc = self._cache.get(i)
        if doc is None:
            doc = self._read(i)
            self._cache[i] = doc
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return Document(list(doc.parts), dict(doc.metadata), doc.id)

    def check_id(self, i) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"store id {i} out of range for {self.bank_path} ({len(self)} documents)")
        return i

    def check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise IndexError(f"store id {bad} out of range for {self.bank_path} ({len(self)} documents; -1 marks "
                             "a missing search result: drop those first)")
        return ids

    def _read(self, i: int) -> Document:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        with open(self.root / "documents.jsonl", "rb") as f:
            f.seek(start)
            line = f.read(end - start)
        log = BadInputLog(strict=True)
        try:
            record = json.loads(line.decode("utf-8"))
            return record_to_document(record, lambda data, origin: decode_image(data, origin, log=log,
                                                                                max_pixels=2**40), self.root)
        except (ValueError, MalformedRecord, BadInputError) as e:
            raise BankError(f"{self.root / 'documents.jsonl'} row {i} (bytes {start}..{end}) cannot be read: {e}; "
                            f"the store is damaged: {rebuild_hint(self.bank_path)}") from None


def load_npy(file: Path, rebuild: str) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        raise BankError(f"{file} cannot be read ({e}); {rebuild}") from None


def load_store(path: Path, count: int, keys_file: Path | None = None,
               offsets_file: Path | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(keys, offsets, tail) of the bank at `path` (memory-mapped), checked to count `count` rows, and
    documents.jsonl checked to reach where offsets.npy ends. `tail`: bytes after that end, what an
    add interrupted before its commit appended (bank.py: not part of the bank; the next writer cuts
    them off). `keys_file` / `offsets_file`: the new ones of an add being committed."""
    rebuild = rebuild_hint(path)
    keys_file = path / "keys.npy" if keys_file is None else keys_file
    offsets_file = path / "store" / "offsets.npy" if offsets_file is None else offsets_file
    keys = load_npy(keys_file, rebuild)
    if keys.dtype != KEY_DTYPE or keys.shape != (count,):
        raise BankError(f"{keys_file} holds {keys.shape[0] if keys.ndim else 0} rows of {keys.dtype}, but "
                        f"{path / 'index.faiss'} has {count} vectors: {DISAGREE}; {rebuild}")
    offsets = load_npy(offsets_file, rebuild)
    if offsets.dtype != np.int64 or offsets.shape != (count + 1,):
        raise BankError(f"{offsets_file} has {len(offsets) - 1} rows but {path / 'index.faiss'} has "
                        f"{count} vectors: {DISAGREE}; {rebuild}")
    store = path / "store" / "documents.jsonl"
    size, end = store.stat().st_size, int(offsets[-1])
    if size < end:
        with open(store, "rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        raise BankError(f"{path / 'index.faiss'} has {count} vectors but the store has {lines} documents ({store}: "
                        f"{size} bytes; store/offsets.npy ends at {end}): the store disagrees with the index, it was cut short; "
                        f"{rebuild}")
    return keys, offsets, size - end


__all__ = ["KEY_DTYPE", "DocumentStore", "IngestStats", "StoreWriter", "assemble_embeddings", "document_key",
           "load_npy", "load_store", "modality", "save_npy"]
