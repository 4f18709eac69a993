"""WebDataset tar shards: reading (two sample layouts) and writing.

    (a) LAION: KEY.jpg|jpeg|png|webp + KEY.txt caption + optional KEY.json metadata
    (b) multi-part: KEY.json = {"parts": [...], "metadata": ..., "id": ...} in the JSONL
        schema, image parts naming members ({"type": "image", "member": "0.png"} is
        stored as KEY.0.png), so one interleaved document is one sample.

Tars are read with webdataset's own iterators (`url_opener`, `tar_file_expander`) one shard
at a time, members grouped into samples as webdataset's `group_by_keys` does (`_group_by_keys`:
but a sample with two members of the same key and extension is skipped and counted, not the
rest of the shard), with a handler that records a broken shard in the BadInputLog and moves
on to the next one. A shard cut short is always such a broken shard,
never a quietly shorter one: a local tar must end in whole blocks with its end-of-archive
block, and a .tar.gz / .bz2 / .xz is decompressed by a reader that raises at a cut stream.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import PIL.Image

from mixmodal.data.bad_input import BAD_SCHEMA, BAD_SHARD, MALFORMED_JSON, MISSING_FIELD, NOT_UTF8
from mixmodal.data.sources.base import ImageSkipped, Source, check_not_empty
from mixmodal.documents import Document, Image, MalformedRecord, Text, record_to_document

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # LAION-style image members, by preference
_NO_RECORD = object()  # "this sample's json was bad and has been logged"


class WebDatasetSource(Source):
    """WebDataset tar shards in either layout (docs/data.md):

    (a) LAION: `KEY.jpg|jpeg|png|webp` + `KEY.txt` caption + optional `KEY.json` metadata
        -> Document([Image, Text(caption)]); a metadata "id" becomes Document.id.
    (b) multi-part: `KEY.json` = {"parts": [...], "metadata": ..., "id": ...} in the JSONL
        schema, image parts naming members: {"type": "image", "member": "0.png"} is
        stored as `KEY.0.png`.

    A sample's id defaults to its key. `urls`: a path, a brace pattern
    (`shards/{00000..00009}.tar`), `::`-joined patterns, or a list of them; anything
    webdataset's `gopen` opens (pipe:, http:) works, local files are checked up front.
    """

    def __init__(self, urls: str | os.PathLike | Iterable[str | os.PathLike], **kwargs) -> None:
        super().__init__(**kwargs)
        self.urls = expand_shard_urls(urls)
        missing = [u for u in self.urls if _is_local(u) and not os.path.isfile(u)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.urls)} tar shard(s) do not exist: {shown}; check the pattern"
            )

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.urls)} shard(s) from {self.urls[0]}{self._sharding()})"

    def _documents(self, consumer: int, num_consumers: int) -> Iterator[Document]:
        # Whole shards per consumer when there are enough (each consumer reads only its
        # tars); otherwise every consumer streams every shard and keeps every n-th sample,
        # so that no consumer is left with nothing.
        by_shard = len(self.urls) >= num_consumers
        sample_index = -1
        for shard_index, url in enumerate(self.urls):
            owner = shard_index % num_consumers == consumer
            if by_shard and not owner:
                continue
            for sample in self._samples(url, report_errors=owner):
                sample_index += 1
                if not by_shard and sample_index % num_consumers != consumer:
                    continue
                doc = self._sample_to_document(sample)
                if doc is not None:
                    yield doc

    def _samples(self, url: str, report_errors: bool) -> Iterator[dict]:
        """The samples of one shard, read by webdataset's own iterators, grouped by key."""
        from webdataset.tariterators import tar_file_expander, url_opener

        errors: list[Exception] = []

        def stop_shard(error: Exception) -> bool:
            # A tar stream cannot be resynchronised after an error: end this shard, keep
            # the others. Shards are expanded one by one, so a partial sample can never
            # merge with the next shard's first one.
            errors.append(error)
            return False

        opened = _strict_decompression(url_opener([{"url": url}], handler=stop_shard))
        files = tar_file_expander(opened, handler=stop_shard)
        pending = None  # hold one sample back: only after a clean end is the last one whole
        num_read = 0
        for sample in _group_by_keys(files, handler=stop_shard):
            if pending is not None:
                yield pending
                num_read += 1
            pending = sample
        # Python's tarfile ends quietly on a file cut at (or inside) a member header: a local shard must
        # also end as a tar does, else its last sample may be missing members (and later ones are gone).
        problem = (f"tar cannot be read ({_describe_tar_error(errors[0])})" if errors
                   else _cut_short(url) if _is_local(url) else None)
        if problem is None:
            if pending is not None:
                yield pending
            return
        if report_errors:
            dropped = f"; its last sample {pending['__key__']!r} was dropped as possibly incomplete" if pending else ""
            self.log.skip(url, BAD_SHARD, f"{problem} after {num_read} sample(s){dropped}; "
                                          "re-download or re-write the shard")

    def _sample_to_document(self, sample: dict) -> Document | None:
        key = sample["__key__"]
        where = f"{sample['__url__']}:{key}"
        if "__duplicates__" in sample:
            names = sample["__duplicates__"]
            self.log.skip(where, BAD_SCHEMA, f"{len(names)} member(s) repeat a name of the sample ({', '.join(names[:3])}"
                                             f"{', ...' if len(names) > 3 else ''}): which one is meant is ambiguous; "
                                             "re-write the shard with one member per key and extension")
            return None
        record = None
        if "json" in sample:
            record = self._parse_json_member(sample["json"], f"{where}.json")
            if record is _NO_RECORD:
                return None
        if record is not None and "parts" in record:
            return self._multipart_document(sample, record, where)
        return self._laion_document(sample, record, where)

    def _parse_json_member(self, data: bytes, where: str) -> dict | object:
        try:
            record = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            self.log.skip(where, NOT_UTF8, f"invalid UTF-8 at byte {e.start}; re-encode the member as UTF-8")
            return _NO_RECORD
        except (json.JSONDecodeError, RecursionError) as e:
            self.log.skip(where, MALFORMED_JSON, f"not valid JSON ({getattr(e, 'msg', e)})")
            return _NO_RECORD
        if not isinstance(record, dict):
            self.log.skip(where, BAD_SCHEMA, f"the json member must be an object, got {type(record).__name__}")
            return _NO_RECORD
        return record

    def _laion_document(self, sample: dict, metadata: dict | None, where: str) -> Document | None:
        members = _member_names(sample)
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            self.log.skip(
                where,
                MISSING_FIELD,
                f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)}) and no json with \"parts\"; members: {members}",
            )
            return None
        if "txt" not in sample:
            self.log.skip(where, MISSING_FIELD, f"no .txt caption member; members: {members}")
            return None
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            self.log.skip(f"{where}.txt", NOT_UTF8, f"invalid UTF-8 at byte {e.start}; re-encode the caption as UTF-8")
            return None
        image = self._decode(sample[ext], f"{where}.{ext}")
        if image is None:
            return None
        metadata = dict(metadata or {})
        doc_id = metadata.pop("id", None)
        parts = [Image(image, origin=f"{where}.{ext}"), Text(caption)]
        return Document(parts, metadata, sample["__key__"] if doc_id is None else str(doc_id))

    def _multipart_document(self, sample: dict, record: dict, where: str) -> Document | None:
        # Rewrite {"member": m} image parts as {"path": m} for record_to_document, with a
        # loader that serves those "paths" from the sample, never from the filesystem.
        parts = record["parts"]
        members: dict[str, str] = {}  # the origin record_to_document will pass -> member
        if isinstance(parts, list):
            rewritten = []
            for i, part in enumerate(parts):
                if isinstance(part, dict) and part.get("type") == "image":
                    if "path" in part:
                        self.log.skip(
                            where,
                            BAD_SCHEMA,
                            f'parts[{i}] has a "path"; inside a tar sample image parts name a member: '
                            '{"type": "image", "member": "0.png"}',
                        )
                        return None
                    if "member" in part:
                        member = part["member"]
                        if not isinstance(member, str) or member.lower() not in sample or member.lower() == "json":
                            self.log.skip(
                                where,
                                MISSING_FIELD,
                                f"parts[{i}] names member {member!r}, which the sample lacks; "
                                f"members: {_member_names(sample)}",
                            )
                            return None
                        members[str(Path(member))] = member.lower()
                        part = {"type": "image", "path": member}
                rewritten.append(part)
            record = {**record, "parts": rewritten}

        def load_image(data: bytes | None, origin: str) -> PIL.Image.Image:
            if data is None:
                member = members[origin]
                data, origin = sample[member], f"{where}.{member}"
            else:
                origin = f"{where} {origin}"
            image = self._decode(data, origin)
            if image is None:
                raise ImageSkipped
            return image

        try:
            doc = record_to_document(record, load_image, "")
        except MalformedRecord as e:
            self.log.skip(f"{where}.json", BAD_SCHEMA, f"{e}; the schema is in docs/data.md")
            return None
        except ImageSkipped:
            return None
        if not check_not_empty(doc, where, self.log):
            return None
        doc.parts = [
            Image(p.image, origin=f"{where}.{members[p.origin]}") if isinstance(p, Image) and p.origin in members else p
            for p in doc.parts
        ]
        if doc.id is None:
            doc.id = sample["__key__"]
        return doc


def _group_by_keys(files: Iterator[dict], handler) -> Iterator[dict]:
    """webdataset's `group_by_keys` (members with the same key, in a row, are one sample), except that a member
    repeating a key and extension already in the sample (two `b.txt`, or `b.png` and `b.PNG`) marks that sample
    `__duplicates__`, to be skipped and counted, where webdataset raises and the rest of the shard is lost."""
    from webdataset.tariterators import base_plus_ext, valid_sample

    current = None
    for member in files:
        try:
            if member == {}:
                if valid_sample(current):
                    yield current
                current = None
                continue
            name = member["fname"]
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            suffix = suffix.lower()
            if suffix.startswith("__"):  # would clash with the sample's own fields (__key__, __url__, ...)
                continue
            if current is None or prefix != current["__key__"]:
                if valid_sample(current):
                    yield current
                current = {"__key__": prefix, "__url__": member["__url__"]}
            if suffix in current:
                current.setdefault("__duplicates__", []).append(name)
            else:
                current[suffix] = member["data"]
        except Exception as error:  # noqa: BLE001 - what webdataset's own grouping hands its handler
            error.args = error.args + (member.get("stream") if isinstance(member, dict) else None,)
            if not handler(error):
                break
    if valid_sample(current):
        yield current


def expand_shard_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand brace patterns and `::` lists (webdataset's own expansion) into shard URLs."""
    from webdataset.shardlists import expand_urls

    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    expanded = [u for pattern in urls for u in expand_urls(os.fspath(pattern))]
    if not expanded:
        raise ValueError("WebDatasetSource needs at least one shard")
    return expanded


def write_webdataset(
    docs: Iterable[Document],
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    image_format: str = "png",
) -> list[Path]:
    """Write documents as tar shards `{prefix}-000000.tar`, ... of `shard_size` samples.

    Documents that are [Image, Text] go in the LAION layout (a), the rest in the
    multi-part layout (b). Keys are running numbers; ids live in the json member. PNG is
    lossless (`image_format="jpg"` or "webp" trades exactness for size). Each shard is
    written under a temporary name and renamed when complete; `{prefix}-NNNNNN.tar`
    shards left in `out_dir` by an earlier write are removed, so the folder holds exactly
    this dataset. Returns the shard paths.
    """
    from webdataset import TarWriter

    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    pil_format = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}.get(image_format)
    if pil_format is None:
        raise ValueError(f"image_format must be one of png, jpg, jpeg, webp; got {image_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    writer = file = None
    try:
        for index, doc in enumerate(docs):
            if index % shard_size == 0:
                if writer is not None:
                    written.append(_finish_shard(writer, file))
                path = out_dir / f"{prefix}-{len(written):06d}.tar"
                file = open(path.with_name(path.name + ".tmp"), "wb")
                writer = TarWriter(file, encoder=False, mtime=0)  # fixed mtime: same docs, same bytes
            writer.write(_document_to_sample(doc, f"{index:09d}", image_format, pil_format))
        if writer is not None:
            written.append(_finish_shard(writer, file))
    except BaseException:
        if file is not None and not file.closed:
            file.close()
            os.remove(file.name)
        raise
    # Shards of an earlier, longer write would be read as part of this dataset.
    for path in out_dir.glob(f"{glob.escape(prefix)}-*.tar"):
        if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", path.name) and path not in written:
            path.unlink()
    return written


def _finish_shard(writer, file) -> Path:
    writer.close()
    file.close()
    final = Path(file.name[: -len(".tmp")])
    os.replace(file.name, final)
    return final


def _document_to_sample(doc: Document, key: str, ext: str, pil_format: str) -> dict:
    def encode(image: PIL.Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=pil_format)
        return buffer.getvalue()

    def dumps(obj: dict) -> bytes:
        try:
            return json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except TypeError as e:
            raise ValueError(f"document {doc.id or key}: metadata is not JSON-serialisable ({e})") from None

    parts = doc.parts
    # A metadata key "id" or "parts" would be misread from a LAION json, so such
    # documents take the multi-part layout, which keeps metadata apart.
    if (
        len(parts) == 2
        and isinstance(parts[0], Image)
        and isinstance(parts[1], Text)
        and not {"id", "parts"} & doc.metadata.keys()
    ):
        metadata = dict(doc.metadata) if doc.id is None else {**doc.metadata, "id": doc.id}
        image, caption = encode(parts[0].image), parts[1].text.encode("utf-8")
        return {"__key__": key, ext: image, "txt": caption, "json": dumps(metadata)}
    sample: dict = {"__key__": key}
    record_parts = []
    for part in parts:
        if isinstance(part, Text):
            record_parts.append({"type": "text", "text": part.text})
        else:
            member = f"{len(sample) - 1}.{ext}"
            sample[member] = encode(part.image)
            record_parts.append({"type": "image", "member": member})
    record: dict = {"parts": record_parts}
    if doc.id is not None:
        record["id"] = doc.id
    if doc.metadata:
        record["metadata"] = doc.metadata
    sample["json"] = dumps(record)
    return sample


def _member_names(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _strict_decompression(sources: Iterator[dict]) -> Iterator[dict]:
    """Compressed shards (.tar.gz, .tar.bz2, .tar.xz) decompressed by Python's file readers, which raise
    EOFError on a stream cut short; tarfile's own stream mode would end there quietly, a short shard."""
    import bz2
    import gzip
    import lzma

    for source in sources:
        stream = source["stream"]
        head = stream.peek(6)[:6] if hasattr(stream, "peek") else b""
        if head.startswith(_COMPRESSED[0]):
            source["stream"] = gzip.GzipFile(fileobj=stream, mode="rb")
        elif head.startswith(_COMPRESSED[1]):
            source["stream"] = bz2.BZ2File(stream)
        elif head.startswith(_COMPRESSED[2]):
            source["stream"] = lzma.LZMAFile(stream)
        yield source


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: their readers check their own ends


def _cut_short(path: str) -> str | None:
    """Why the local uncompressed tar at `path` looks cut short (not whole 512-byte blocks, or no zero
    end-of-archive block last), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if f.read(6).startswith(_COMPRESSED):
                return None
            if size % 512:
                return f"tar ends inside a block ({size} bytes, not whole 512-byte tar blocks: cut short?)"
            f.seek(max(size - 512, 0))
            if f.read(512).strip(b"\0"):
                return f"tar ends without its end-of-archive block ({size} bytes: cut short?)"
    except OSError:
        return None
    return None


def _describe_tar_error(error: Exception) -> str:
    # webdataset appends " @ <stream object>" and the stream itself to the arguments.
    first = str(error.args[0]) if error.args else ""
    first = first.split(" @ ")[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
