"""One test per kind of bad input: skipped and counted with its location and reason, and
in strict mode raised as BadInputError with the same message. Plus the mode conversions,
checked by pixel value. All fixtures are generated in tmp_path."""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest

from mixmodal.data import bad_input
from mixmodal.data.bad_input import BadInputError, BadInputLog
from mixmodal.data.images import decode_image, to_rgb
from mixmodal.data.sources import JsonlSource, WebDatasetSource, write_webdataset
from mixmodal.documents import Document, Image, Text


# --- fixtures -------------------------------------------------------------------------

def encode(image: PIL.Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(size: int = 32, seed: int = 0) -> PIL.Image.Image:
    # Noise does not compress, so a cut through the file lands in the pixel data.
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand: lets a header claim any size, and makes 16-bit RGB."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw_rows)) + png_chunk(b"IEND", b"")
    )


GOOD = {"id": "good", "parts": [{"type": "text", "text": "a fine document"}]}


def write_lines(path, lines: list[bytes | dict | str]) -> None:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            if isinstance(line, str):
                line = line.encode("utf-8")
            f.write(line + b"\n")


def jsonl_with(tmp_path, bad_record: bytes | dict | str) -> str:
    """A JSONL file: a good line, the bad one on line 2, another good line."""
    path = tmp_path / "docs.jsonl"
    write_lines(path, [GOOD, bad_record, {**GOOD, "id": "good2"}])
    return str(path)


def image_record(tmp_path, data: bytes, name: str = "img.png", inline: bool = False) -> dict:
    if inline:
        return {"id": "bad", "parts": [{"type": "image", "base64": base64.b64encode(data).decode()}]}
    (tmp_path / name).write_bytes(data)
    return {"id": "bad", "parts": [{"type": "text", "text": "x"}, {"type": "image", "path": name}]}


def assert_skipped(make_source, reason: str, where: str, num_good: int = 2) -> list[Document]:
    """Lenient: the good records come through, one bad one is counted with `where` in
    the summary. Strict: BadInputError with the same location, reason and detail."""
    source = make_source(strict=False)
    docs = list(source)
    assert len(docs) == num_good
    assert dict(source.log.skipped) == {reason: 1}
    summary = source.summary()
    assert f"{reason}: 1" in summary and where in summary
    (example,) = source.log.examples[reason]  # "where: detail"
    with pytest.raises(BadInputError) as raised:
        list(make_source(strict=True))
    message = str(raised.value)
    assert f": {reason}: " in message and where in message
    assert message.replace(f": {reason}: ", ": ", 1).startswith(example)
    return docs


# --- documents JSONL ------------------------------------------------------------------

def test_malformed_json_line(tmp_path):
    path = jsonl_with(tmp_path, b'{"parts": [')
    assert_skipped(lambda **kw: JsonlSource(path, **kw), bad_input.MALFORMED_JSON, "docs.jsonl:2")


def test_schema_breaking_record(tmp_path):
    path = jsonl_with(tmp_path, {"parts": [{"type": "video", "url": "x"}]})
    assert_skipped(lambda **kw: JsonlSource(path, **kw), bad_input.BAD_SCHEMA, "docs.jsonl:2")
    source = JsonlSource(path)
    list(source)
    assert "parts[0]" in source.summary()  # the message says which part is wrong


def test_non_utf8_line(tmp_path):
    path = jsonl_with(tmp_path, b'{"parts": [{"type": "text", "text": "caf\xe9"}]}')  # latin-1
    assert_skipped(lambda **kw: JsonlSource(path, **kw), bad_input.NOT_UTF8, "docs.jsonl:2")


def test_missing_image_file(tmp_path):
    path = jsonl_with(tmp_path, {"parts": [{"type": "image", "path": "nowhere/missing.png"}]})
    assert_skipped(lambda **kw: JsonlSource(path, **kw), bad_input.MISSING_IMAGE, "docs.jsonl:2")
    source = JsonlSource(path)
    list(source)
    assert "missing.png" in source.summary()


@pytest.mark.parametrize("inline", [False, True], ids=["file", "base64"])
def test_corrupt_image_bytes(tmp_path, inline):
    path = jsonl_with(tmp_path, image_record(tmp_path, b"\x89PNG but not really" * 10, inline=inline))
    where = "docs.jsonl:2 parts[0].base64" if inline else "docs.jsonl:2"
    assert_skipped(lambda **kw: JsonlSource(path, **kw), bad_input.CORRUPT_IMAGE, where)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    data = encode(noise(), fmt)
    path = jsonl_with(tmp_path, image_record(tmp_path, data[: len(data) // 2], name=f"cut.{fmt.lower()}"))
    assert_skipped(lambda **kw: JsonlSource(path, **kw), bad_input.TRUNCATED_IMAGE, f"cut.{fmt.lower()}")
    assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_decompression_bomb_header(tmp_path):
    # 100000 x 100000 pixels claimed by a 100-byte file: Pillow's own hard error path.
    data = png_bytes(100_000, 100_000, 8, 2, b"")
    path = jsonl_with(tmp_path, image_record(tmp_path, data, name="bomb.png"))
    docs = assert_skipped(lambda **kw: JsonlSource(path, **kw), bad_input.TOO_MANY_PIXELS, "bomb.png")
    assert [d.id for d in docs] == ["good", "good2"]


def test_header_size_checked_before_decoding():
    # 10000 x 10000 is between Pillow's warning and error thresholds, so our check decides;
    # the empty pixel data would fail to decode, so getting TOO_MANY_PIXELS (and no
    # warning) shows the header was checked first.
    data = png_bytes(10_000, 10_000, 8, 2, b"")
    log = BadInputLog()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data, "bomb.png", log=log, max_pixels=64 * 2**20) is None
    assert dict(log.skipped) == {bad_input.TOO_MANY_PIXELS: 1}
    assert "raise max_pixels" in log.summary()


def test_large_but_cheap_image_over_max_pixels(tmp_path):
    data = encode(PIL.Image.new("RGB", (200, 100), "red"))
    path = jsonl_with(tmp_path, image_record(tmp_path, data, name="big.png"))
    assert_skipped(lambda **kw: JsonlSource(path, max_pixels=10_000, **kw), bad_input.TOO_MANY_PIXELS, "big.png")
    docs = list(JsonlSource(path, max_pixels=20_000))  # allowed once the limit is raised
    assert docs[1].images[0].size == (200, 100)


@pytest.mark.parametrize(
    "record",
    [{"parts": []}, {"parts": [{"type": "text", "text": " \n\t"}, {"type": "text", "text": ""}]}],
    ids=["no-parts", "blank-text"],
)
def test_empty_document(tmp_path, record):
    path = jsonl_with(tmp_path, record)
    assert_skipped(lambda **kw: JsonlSource(path, **kw), bad_input.EMPTY_DOCUMENT, "docs.jsonl:2")


def test_blank_lines_are_not_bad_input(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_lines(path, [GOOD, b"", b"   ", {**GOOD, "id": "b"}])
    source = JsonlSource(path, strict=True)
    assert [d.id for d in source] == ["good", "b"]
    assert source.log.num_skipped == 0


# --- WebDataset -----------------------------------------------------------------------

def write_tar(path, samples: list[dict]) -> str:
    from webdataset import TarWriter

    with TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def laion(key: str, caption: bytes = b"a caption", **extra) -> dict:
    return {"__key__": key, "png": encode(noise(8)), "txt": caption, **extra}


def test_non_utf8_wds_caption(tmp_path):
    tar = write_tar(tmp_path / "s.tar", [laion("a"), laion("b", caption=b"caf\xe9"), laion("c")])
    assert_skipped(lambda **kw: WebDatasetSource(tar, **kw), bad_input.NOT_UTF8, "s.tar:b")


@pytest.mark.parametrize("lacks", ["txt", "png"])
def test_wds_missing_caption_or_image(tmp_path, lacks):
    broken = laion("b")
    del broken[lacks]
    tar = write_tar(tmp_path / "s.tar", [laion("a"), broken, laion("c")])
    assert_skipped(lambda **kw: WebDatasetSource(tar, **kw), bad_input.MISSING_FIELD, "s.tar:b")


def test_wds_malformed_json_and_corrupt_image_member(tmp_path):
    samples = [laion("a"), laion("b", json=b"{not json"), {**laion("c"), "png": b"garbage"}, laion("d")]
    tar = write_tar(tmp_path / "s.tar", samples)
    source = WebDatasetSource(tar)
    assert [d.id for d in source] == ["a", "d"]
    assert dict(source.log.skipped) == {bad_input.MALFORMED_JSON: 1, bad_input.CORRUPT_IMAGE: 1}
    assert "s.tar:b.json" in source.summary() and "s.tar:c.png" in source.summary()


def test_wds_multipart_missing_member(tmp_path):
    record = {"parts": [{"type": "text", "text": "x"}, {"type": "image", "member": "1.png"}]}
    sample = {"__key__": "b", "0.png": encode(noise(8)), "json": json.dumps(record).encode()}
    tar = write_tar(tmp_path / "s.tar", [laion("a"), sample, laion("c")])
    assert_skipped(lambda **kw: WebDatasetSource(tar, **kw), bad_input.MISSING_FIELD, "s.tar:b")


def test_corrupt_tar_shard_among_good_ones(tmp_path):
    docs = [Document([Image(noise(16, seed=i)), Text(f"caption {i}")], id=f"d{i}") for i in range(9)]
    shards = write_webdataset(docs, tmp_path, shard_size=3)
    middle = shards[1].read_bytes()
    shards[1].write_bytes(middle[: len(middle) // 2])  # truncated inside a member
    garbage = tmp_path / "shard-000003.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    urls = [str(s) for s in shards] + [str(garbage)]

    source = WebDatasetSource(urls)
    ids = [d.id for d in source]
    assert ids[:3] == ["d0", "d1", "d2"] and ids[-3:] == ["d6", "d7", "d8"]  # the good shards
    assert set(ids) < {f"d{i}" for i in range(9)}  # the truncated shard yields only whole samples
    assert dict(source.log.skipped) == {bad_input.BAD_SHARD: 2}
    assert "shard-000001.tar" in source.summary() and "shard-000003.tar" in source.summary()
    with pytest.raises(BadInputError, match="shard-000001.tar: bad-shard: "):
        list(WebDatasetSource(urls, strict=True))


# --- mode conversions -----------------------------------------------------------------

def decode(image: PIL.Image.Image, fmt: str = "PNG", **options) -> tuple[np.ndarray, BadInputLog]:
    log = BadInputLog(strict=True)
    out = decode_image(encode(image, fmt, **options), "test", log=log)
    assert out.mode == "RGB"
    return np.asarray(out), log


def test_cmyk_to_rgb():
    cmyk = PIL.Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 255, 255, 0))  # red
    cmyk.putpixel((1, 0), (0, 0, 0, 0))  # white
    pixels, log = decode(cmyk, "TIFF")
    assert pixels.tolist() == [[[255, 0, 0], [255, 255, 255]]]
    assert log.converted == {"CMYK->RGB": 1}
    jpeg, _ = decode(PIL.Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert np.abs(jpeg.astype(int) - [255, 0, 0]).max() <= 8  # Adobe-inverted CMYK handled


def test_palette_to_rgb():
    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    pixels, log = decode(palette)
    assert pixels.tolist() == [[[10, 20, 30], [200, 100, 50]]]
    assert log.converted == {"P->RGB": 1}


def test_palette_with_transparency_to_rgb():
    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    pixels, log = decode(palette, transparency=0)  # index 0 is transparent
    assert pixels.tolist() == [[[255, 255, 255], [200, 100, 50]]]  # transparent -> white
    assert log.converted == {"P+transparency->RGB (alpha on white)": 1}


def test_rgba_composited_on_white():
    rgba = PIL.Image.new("RGBA", (3, 1))
    for x, value in enumerate([(0, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)]):
        rgba.putpixel((x, 0), value)
    pixels, log = decode(rgba)
    assert pixels[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert pixels[0, 1].tolist() == [0, 0, 255]  # opaque stays
    assert np.abs(pixels[0, 2].astype(int) - 127).max() <= 1  # half black over white
    assert log.converted == {"RGBA->RGB (alpha on white)": 1}


def test_la_composited_on_white():
    la = PIL.Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (60, 255))
    pixels, log = decode(la)
    assert pixels.tolist() == [[[255, 255, 255], [60, 60, 60]]]
    assert log.converted == {"LA->RGB (alpha on white)": 1}


def test_pa_and_grey_transparency_composited_on_white():
    log = BadInputLog()
    palette = PIL.Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    pa = palette.convert("PA")
    pa.putpixel((0, 0), (0, 0))
    assert np.asarray(to_rgb(pa, log)).tolist() == [[[255, 255, 255], [200, 100, 50]]]
    grey = PIL.Image.new("L", (2, 1))
    grey.putpixel((1, 0), 9)
    pixels, grey_log = decode(grey, transparency=0)  # a tRNS grey value, no alpha channel
    assert pixels.tolist() == [[[255, 255, 255], [9, 9, 9]]]
    assert log.converted == {"PA->RGB (alpha on white)": 1}
    assert grey_log.converted == {"L+transparency->RGB (alpha on white)": 1}


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_to_rgb(mode):
    grey = PIL.Image.new("L", (2, 1))
    grey.putpixel((1, 0), 255 if mode == "1" else 77)
    pixels, log = decode(grey.convert(mode) if mode == "1" else grey)
    assert pixels.tolist() == [[[0, 0, 0], [255, 255, 255] if mode == "1" else [77, 77, 77]]]
    assert log.converted == {f"{mode}->RGB": 1}


def test_16bit_grayscale_png_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    sixteen = PIL.Image.fromarray(values)
    assert sixteen.mode == "I;16"
    pixels, log = decode(sixteen)
    assert pixels[..., 0].tolist() == [[0, 1, 128, 255]]
    assert (pixels[..., 0] == pixels[..., 2]).all()
    (conversion,) = log.converted  # I;16 on current Pillow, I on older ones
    assert conversion in ("I;16->RGB", "I->RGB")


def test_16bit_big_endian_and_32bit_grey():
    log = BadInputLog()
    big_endian = PIL.Image.frombytes("I;16B", (2, 1), struct.pack(">HH", 65535, 32768))
    assert np.asarray(to_rgb(big_endian, log))[0, :, 0].tolist() == [255, 128]
    wide = PIL.Image.fromarray(np.array([[-100, 100]], dtype=np.int32))  # mode I, not 16-bit data
    assert np.asarray(to_rgb(wide, log))[0, :, 0].tolist() == [0, 255]


def test_16bit_rgb_png():
    row = b"\x00" + struct.pack(">HHHHHH", 65535, 32768, 0, 0, 0, 65535)
    out = decode_image(png_bytes(2, 1, 16, 2, row), "rgb16.png", log=BadInputLog(strict=True))
    assert np.asarray(out).tolist() == [[[255, 128, 0], [0, 0, 255]]]


def test_float_to_rgb():
    log = BadInputLog()
    unit = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(unit, log))[0, :, 0].tolist() == [0, 128, 255]
    assert log.converted == {"F->RGB": 1}


def test_exif_orientation_applied():
    tall = PIL.Image.new("RGB", (16, 8), "red")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    pixels, log = decode(tall, "JPEG", exif=exif.tobytes())
    assert pixels.shape == (16, 8, 3)
    assert log.converted == {"EXIF orientation applied": 1}


def test_rgb_passes_through_detached():
    log = BadInputLog(strict=True)
    out = decode_image(encode(noise(8)), "x.png", log=log)
    assert np.array_equal(np.asarray(out), np.asarray(noise(8)))
    assert not log.converted and getattr(out, "fp", None) is None


def test_truncated_gzip_jsonl_keeps_other_files(tmp_path):
    import gzip

    lines = b"".join(json.dumps({**GOOD, "id": f"z{i}"}).encode() + b"\n" for i in range(2000))
    packed = gzip.compress(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    write_lines(tmp_path / "b.jsonl", [GOOD])
    paths = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl"]
    source = JsonlSource(paths)
    ids = [d.id for d in source]
    assert 0 < len(ids) < 2001 and ids[-1] == "good"
    assert dict(source.log.skipped) == {bad_input.BAD_SHARD: 1}
    assert "a.jsonl.gz:" in source.summary()
    with pytest.raises(BadInputError, match="a.jsonl.gz:\\d+: bad-shard: "):
        list(JsonlSource(paths, strict=True))
