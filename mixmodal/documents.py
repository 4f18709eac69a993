"""Documents: ordered Text and Image parts plus metadata, and their JSONL schema.

The JSONL schema (docs/data.md), one document per line:

    {"id": "coco-391895",
     "parts": [{"type": "text", "text": "A man riding a bike."},
               {"type": "image", "path": "images/391895.jpg"},          # relative to the JSONL file
               {"type": "image", "base64": "iVBORw0KGgo..."}],          # or inline PNG/JPEG bytes
     "metadata": {"source": "coco"}}                                     # optional, any JSON

A conversation may be written with "messages" instead of "parts" (data/chat.py):
{"messages": [{"role": "user", "parts": [...]}, {"role": "assistant", "content": "..."}]};
it is read as the turns' parts in order plus metadata["turns"] = [[role, number of parts], ...].

Reading JSONL robustly (skipping and counting bad lines) is `mixmodal.data.sources`;
this module defines the types and the record <-> Document mapping.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Union

import PIL.Image

from mixmodal.data.chat import messages_to_parts, parts_to_messages, turns_of


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True, eq=False)
class Image:
    """An RGB image. `origin` says where it came from (file path, shard member) for messages."""

    image: PIL.Image.Image
    origin: str | None = None

    def __post_init__(self) -> None:
        if self.image.mode != "RGB":
            raise ValueError(
                f"Image parts hold RGB images, got mode {self.image.mode!r}"
                f"{' from ' + self.origin if self.origin else ''}; "
                "load images through mixmodal.data.images.decode_image, which converts them"
            )

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


Part = Union[Text, Image]


@dataclass
class Document:
    parts: list[Part]
    metadata: dict = field(default_factory=dict)
    id: str | None = None

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.parts if isinstance(p, Text)]

    @property
    def images(self) -> list[PIL.Image.Image]:
        return [p.image for p in self.parts if isinstance(p, Image)]

    @property
    def num_images(self) -> int:
        return sum(isinstance(p, Image) for p in self.parts)

    def is_empty(self) -> bool:
        """True when the document has no image and no non-blank text."""
        return not any(isinstance(p, Image) or p.text.strip() for p in self.parts)

    def __repr__(self) -> str:
        shown = []
        for p in self.parts:
            if isinstance(p, Text):
                t = p.text if len(p.text) <= 40 else p.text[:37] + "..."
                shown.append(f"Text({t!r})")
            else:
                shown.append(f"Image({p.image.size[0]}x{p.image.size[1]})")
        return f"Document(id={self.id!r}, parts=[{', '.join(shown)}])"


class MalformedRecord(ValueError):
    """A JSONL record that does not follow the schema; the message says what is wrong."""


def record_to_document(
    record: object,
    load_image: Callable[[bytes | None, str], PIL.Image.Image],
    base_dir: str | os.PathLike,
) -> Document:
    """Build a Document from one parsed JSON record.

    `load_image(data, origin)` decodes an image: `data` is the bytes for inline images, or
    None for a path, in which case `origin` is the resolved file path. It raises on a bad
    image; so does this function (MalformedRecord) on a record that breaks the schema.
    """
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object per line, got {type(record).__name__}")
    turns = None
    if "messages" in record:
        if "parts" in record:
            raise MalformedRecord('a record has "parts" or "messages" (a conversation), not both')
        try:
            parts_in, turns = messages_to_parts(record["messages"])
        except ValueError as e:
            raise MalformedRecord(str(e)) from None
    else:
        parts_in = record.get("parts")
    if not isinstance(parts_in, list):
        raise MalformedRecord('missing "parts": a list of {"type": "text"|"image", ...} objects '
                              '(or "messages", a conversation)')
    parts: list[Part] = []
    for i, part in enumerate(parts_in):
        where = f"parts[{i}]"
        if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
            raise MalformedRecord(f'{where} must be an object with "type": "text" or "image"')
        if part["type"] == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise MalformedRecord(f'{where} is a text part without a "text" string')
            parts.append(Text(text))
        elif "path" in part:
            if not isinstance(part["path"], str):
                raise MalformedRecord(f'{where}.path must be a string')
            path = Path(base_dir) / part["path"]
            parts.append(Image(load_image(None, str(path)), origin=str(path)))
        elif "base64" in part:
            try:
                data = base64.b64decode(part["base64"], validate=True)
            except (ValueError, TypeError) as e:
                raise MalformedRecord(f"{where}.base64 is not valid base64 ({e})") from None
            parts.append(Image(load_image(data, f"{where}.base64"), origin=f"{where}.base64"))
        else:
            raise MalformedRecord(f'{where} is an image part without "path" or "base64"')
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise MalformedRecord('"metadata" must be a JSON object')
    metadata = dict(metadata)
    if turns is not None:
        metadata["turns"] = turns
    else:
        try:
            turns_of(metadata, len(parts))  # "turns" given by hand in metadata: check them too
        except ValueError as e:
            raise MalformedRecord(str(e)) from None
    doc_id = record.get("id")
    return Document(parts, metadata, None if doc_id is None else str(doc_id))


def document_to_record(
    doc: Document,
    image_dir: str | os.PathLike | None,
    base_dir: str | os.PathLike,
    image_stem: str,
    image_format: str = "png",
) -> dict:
    """Map a Document to a JSON record. Images are written to `image_dir` as files named
    `{image_stem}_{k}.{image_format}` referenced relative to `base_dir`, or inlined as
    base64 when `image_dir` is None."""
    parts = []
    k = 0
    for part in doc.parts:
        if isinstance(part, Text):
            parts.append({"type": "text", "text": part.text})
            continue
        if image_dir is None:
            buf = io.BytesIO()
            part.image.save(buf, format=image_format.upper().replace("JPG", "JPEG"))
            parts.append({"type": "image", "base64": base64.b64encode(buf.getvalue()).decode("ascii")})
        else:
            path = Path(image_dir) / f"{image_stem}_{k}.{image_format}"
            part.image.save(path)
            parts.append({"type": "image", "path": os.path.relpath(path, base_dir)})
        k += 1
    record: dict = {"parts": parts}
    metadata = dict(doc.metadata)
    if metadata.get("turns") is not None:  # a conversation: written in the messages form
        record = {"messages": parts_to_messages(parts, metadata.pop("turns"))}
    if doc.id is not None:
        record["id"] = doc.id
    if metadata:
        record["metadata"] = metadata
    return record


def write_jsonl(
    docs: Iterable[Document],
    path: str | os.PathLike,
    image_dir: str | os.PathLike | None = "images",
    image_format: str = "png",
) -> int:
    """Write documents as JSONL with their images as files under `image_dir` (relative to
    the JSONL's folder; None inlines them as base64). Returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images_at = None
    if image_dir is not None:
        images_at = path.parent / image_dir
        images_at.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            stem = _safe_stem(doc.id) if doc.id is not None else f"{i:08d}"
            rec = document_to_record(doc, images_at, path.parent, stem, image_format)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _safe_stem(doc_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in doc_id)[:120] or "doc"
