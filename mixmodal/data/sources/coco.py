"""COCO captions: the annotations JSON plus the image folder.

The annotations file is parsed once, at construction, in the main process: a file that
is not JSON or not the COCO layout is a hard error (nothing could be read at all), while
a malformed entry, an image without captions, or a missing or bad image file is skipped
and counted. Sharded by image index.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

from mixmodal.data.bad_input import BAD_SCHEMA, MISSING_FIELD
from mixmodal.data.sources.base import Source, SourceSpecError
from mixmodal.documents import Document, Image, Text


class CocoFormatError(ValueError):
    """The annotations file cannot be used at all (not JSON, or not the COCO layout)."""


class CocoCaptionsSource(Source):
    """COCO captions: `{"images": [{"id", "file_name", ...}], "annotations": [{"image_id",
    "caption"}, ...]}` plus the image folder.

    captions="first": one Document per image, [Image, Text(first caption in annotation
    order)], metadata {"coco_id", "file_name", "captions": all references}.
    captions="all": one Document per (image, caption), metadata adds "caption_index".
    Captions are stripped of surrounding whitespace. Sharded by image index.
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        image_dir: str | os.PathLike,
        captions: str = "first",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if captions not in ("first", "all"):
            raise ValueError(f'captions must be "first" or "all", got {captions!r}')
        self.annotations = Path(annotations)
        self.image_dir = Path(image_dir)
        self.captions = captions
        if not self.annotations.is_file():
            raise FileNotFoundError(f"COCO annotations file {self.annotations} does not exist")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder {self.image_dir} does not exist")
        # Parsed here, in the main process, so that a broken file fails before any
        # DataLoader worker starts; workers receive the parsed index.
        self._images, self._captions, self._bad_entries = _read_coco(self.annotations)

    def __repr__(self) -> str:
        return (
            f"CocoCaptionsSource({self.annotations}, images={self.image_dir}, "
            f"{len(self._images)} images, captions={self.captions!r}{self._sharding()})"
        )

    def _documents(self, consumer: int, num_consumers: int) -> Iterator[Document]:
        if consumer == 0:  # entries of the shared annotations file: counted once overall
            for where, detail in self._bad_entries:
                self.log.skip(where, BAD_SCHEMA, detail)
        for index, (image_id, file_name) in enumerate(self._images):
            if index % num_consumers != consumer:
                continue
            path = self.image_dir / file_name
            captions = self._captions.get(image_id)
            if not captions:
                self.log.skip(str(path), MISSING_FIELD, f"no caption for image id {image_id} in {self.annotations}")
                continue
            image = self._decode(None, str(path))
            if image is None:
                continue
            metadata = {"coco_id": image_id, "file_name": file_name, "captions": captions}
            if self.captions == "first":
                yield Document([Image(image, origin=str(path)), Text(captions[0])], metadata, f"coco-{image_id}")
                continue
            for k, caption in enumerate(captions):
                # The image object is shared by these documents; PIL operations copy.
                parts = [Image(image, origin=str(path)), Text(caption)]
                yield Document(parts, {**metadata, "caption_index": k}, f"coco-{image_id}-{k}")


def _read_coco(path: Path) -> tuple[list[tuple[object, str]], dict[object, list[str]], list[tuple[str, str]]]:
    """Parse and index an annotations file: (images, captions by image id, bad entries)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CocoFormatError(
            f"{path}: not a readable JSON file ({e}); nothing can be read from it, so this is an error "
            "rather than a skip: re-download the annotations"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise CocoFormatError(f'{path}: not COCO captions: expected an object with "images" and "annotations" lists')
    bad: list[tuple[str, str]] = []
    images: list[tuple[object, str]] = []
    known: set = set()
    for i, entry in enumerate(data["images"]):
        if not _has_fields(entry, id_field="id", text_field="file_name"):
            bad.append((f"{path}:images[{i}]", 'an image entry needs an "id" and a "file_name" string'))
            continue
        images.append((entry["id"], entry["file_name"]))
        known.add(entry["id"])
    captions: dict[object, list[str]] = {}
    for i, entry in enumerate(data["annotations"]):
        if not _has_fields(entry, id_field="image_id", text_field="caption"):
            bad.append((f"{path}:annotations[{i}]", 'an annotation needs an "image_id" and a "caption" string'))
            continue
        if entry["image_id"] not in known:
            bad.append((f"{path}:annotations[{i}]", f"image_id {entry['image_id']!r} is not in \"images\""))
            continue
        caption = entry["caption"].strip()
        if caption:
            captions.setdefault(entry["image_id"], []).append(caption)
    return images, captions, bad


def _has_fields(entry: object, id_field: str, text_field: str) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get(text_field), str):
        return False
    value = entry.get(id_field)
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def default_coco_image_dir(annotations: Path) -> Path:
    """The COCO download layout: annotations/captions_val2017.json next to val2017/."""
    candidates = []
    split = re.fullmatch(r"captions_(\w+)\.json", annotations.name)
    if split:
        candidates += [annotations.parent.parent / split.group(1), annotations.parent / split.group(1)]
    candidates.append(annotations.parent / "images")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise SourceSpecError(f"no image folder found next to {annotations} (tried {tried}); add ?images=DIR")
