"""Documents JSONL: one document per line (schema in documents.py and docs/data.md),
images as files relative to the JSONL file's folder or inline base64.

Sharded by line index (counted across files, blank lines included), so that each
consumer parses only its own lines. Lines are read as bytes and decoded one by one:
a line that is not UTF-8 costs that line, not the file.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import PIL.Image

from mixmodal.data.bad_input import BAD_SCHEMA, BAD_SHARD, MALFORMED_JSON, NOT_UTF8
from mixmodal.data.sources.base import ImageSkipped, Source, check_not_empty
from mixmodal.documents import Document, MalformedRecord, record_to_document


class JsonlSource(Source):
    """Documents JSONL files (one document per line, schema in documents.py) with images
    as files relative to each JSONL file's folder or inline base64.

    `paths`: a file, a folder holding `documents.jsonl`, a glob, or a list of them.
    Files ending in `.gz` are read through gzip.
    """

    def __init__(self, paths: str | os.PathLike | Iterable[str | os.PathLike], **kwargs) -> None:
        super().__init__(**kwargs)
        self.paths = _expand_jsonl_paths(paths)

    def __repr__(self) -> str:
        return f"JsonlSource({[str(p) for p in self.paths]}{self._sharding()})"

    def _documents(self, consumer: int, num_consumers: int) -> Iterator[Document]:
        index = -1  # across files, so that many small files still spread over consumers
        for file_index, path in enumerate(self.paths):
            opener = gzip.open if path.suffix == ".gz" else open
            line_number = 0
            # Bytes, not text: a line that is not UTF-8 must cost that line, not the file.
            try:
                with opener(path, "rb") as f:
                    for line_number, raw in enumerate(f, start=1):
                        index += 1
                        if index % num_consumers != consumer:
                            continue
                        doc = self._parse_line(raw, path, line_number)
                        if doc is not None:
                            yield doc
            except (OSError, EOFError) as e:  # a truncated or corrupt .gz; keep the other files
                if file_index % num_consumers == consumer:  # every consumer sees it; one counts it
                    detail = f"cannot be read from here on ({e}); re-create or re-download the file"
                    self.log.skip(f"{path}:{line_number + 1}", BAD_SHARD, detail)

    def _parse_line(self, raw: bytes, path: Path, line_number: int) -> Document | None:
        where = f"{path}:{line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.log.skip(where, NOT_UTF8, f"invalid UTF-8 at byte {e.start} of the line; re-encode the file as UTF-8")
            return None
        if line_number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark written by some editors
        line = line.rstrip("\r\n")  # so that JSON errors point into this line, not the next
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            detail = f"{e.msg} at column {e.colno}; each line must be one complete JSON object"
            self.log.skip(where, MALFORMED_JSON, detail)
            return None
        except RecursionError:
            self.log.skip(where, MALFORMED_JSON, "JSON nested too deeply to parse")
            return None

        def load_image(data: bytes | None, origin: str) -> PIL.Image.Image:
            image = self._decode(data, origin, where=f"{where} {origin}")
            if image is None:
                raise ImageSkipped
            return image

        try:
            doc = record_to_document(record, load_image, path.parent)
        except MalformedRecord as e:
            self.log.skip(where, BAD_SCHEMA, f"{e}; the schema is in docs/data.md")
            return None
        except ImageSkipped:
            return None
        return doc if check_not_empty(doc, where, self.log) else None


def _expand_jsonl_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for entry in paths:
        entry = os.fspath(entry)
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no JSONL file matches {entry!r}")
            found.extend(Path(m) for m in matches)
        elif os.path.isdir(entry):
            inside = Path(entry) / "documents.jsonl"
            if not inside.is_file():
                raise FileNotFoundError(f"folder {entry} has no documents.jsonl; name the JSONL file itself")
            found.append(inside)
        elif os.path.isfile(entry):
            found.append(Path(entry))
        else:
            raise FileNotFoundError(f"JSONL file {entry} does not exist")
    if not found:
        raise ValueError("JsonlSource needs at least one JSONL file")
    return found
