"""The fuzz corpus (issue 22): random and adversarial configs, generation settings, document records,
images, prompts and WebDataset shards through the public API. The rule: a clear error (ConfigError /
ValueError / MalformedRecord / a counted skip) or a result, never another exception, never a hang.
Damaged model, tokenizer, encoder and bank folders are tests/test_corruption.py's."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import PIL.Image
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixmodal.config import ConfigError, build_config, load_yaml
from mixmodal.data.bad_input import BadInputError, BadInputLog
from mixmodal.data.images import decode_image
from mixmodal.documents import MalformedRecord, record_to_document
from mixmodal.inference.config import GenerationConfig
from mixmodal.inference.generate import generation_config
from mixmodal.train.fusion import FusionTrainConfig

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
KEYS = ["trainer.steps", "trainer.lr", "trainer.batch_size", "trainer.warmup_steps", "trainer.ema_decay",
        "model.transformer.dim", "model.transformer.num_heads", "model.image.mode", "model.image.patch_size",
        "data.pipeline.seq_len", "data.pipeline.cond_dropout", "data.source", "diffusion.kind",
        "diffusion.num_timesteps", "loss.z_loss_weight", "eval.geneval_prompts", "trainer.precision", "nonsense.key"]


def _yaml_text(value) -> str:
    return json.dumps(value, allow_nan=True)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4))
def test_config_overrides_are_a_clear_error_or_a_config(pairs):
    overrides = [f"{k}={_yaml_text(v)}" for k, v in pairs]
    try:
        build_config(FusionTrainConfig, {"task": "fusion"}, overrides)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip() or "allowed" in str(e)


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "data", "trainer", "diffusion", "extra"]), values, max_size=4))
def test_config_sections_of_any_shape_are_a_clear_error_or_a_config(data):
    try:
        build_config(FusionTrainConfig, {"task": "fusion", **data}, [])
    except ConfigError:
        pass


def test_a_yaml_bomb_is_refused_not_expanded(tmp_path):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for k in range(1, 9):  # 10^9 leaves once expanded
        bomb.append(f"{'abcdefghi'[k]}: &{'abcdefghi'[k]} [" + ", ".join(f"*{'abcdefghi'[k - 1]}" for _ in range(10)) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\n")
    with pytest.raises(ConfigError, match="expands to"):
        load_yaml(path)
    small = tmp_path / "anchors.yaml"  # ordinary anchors are fine
    small.write_text("base: &base {dim: 64}\nmodel: {transformer: *base}\n")
    assert load_yaml(small)["model"]["transformer"] == {"dim": 64}


@FUZZ
@given(st.dictionaries(st.sampled_from(["mode", "max_new_tokens", "max_images", "diffusion_steps", "text.temperature",
                                        "text.top_p", "text.top_k", "image.temperature", "guidance.scale",
                                        "guidance.image_scale", "guidance.uncond", "stop", "sampler", "unknown"]),
                       scalars, max_size=5))
def test_generation_settings_are_a_clear_error_or_a_config(settings_):
    try:
        config = generation_config(overrides=[f"{k}={_yaml_text(v)}" for k, v in settings_.items()])
    except ConfigError:
        return
    assert isinstance(config, GenerationConfig)
    for params in (config.text, config.image):  # what survived is samplable
        assert math.isfinite(params.temperature) and params.temperature >= 0
        assert 0 < params.top_p <= 1
    assert config.max_new_tokens >= 1 and config.diffusion_steps >= 1


@pytest.mark.parametrize("override, says", [
    ("text.temperature=-1", "temperature"), ("text.temperature=.nan", "temperature"), ("text.top_p=0", "top_p"),
    ("diffusion_steps=0", "diffusion_steps"), ("max_new_tokens=0", "max_new_tokens"),
    ("max_new_tokens=1e400", "max_new_tokens"), ("guidance.scale=-3", "scale"),
])
def test_bad_generation_settings_name_the_field(override, says):
    with pytest.raises(ConfigError, match=says):
        generation_config(overrides=[override])


part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=20), scalars)}),
                 st.fixed_dictionaries({"type": st.sampled_from(["image", "video", None])},
                                       optional={"path": scalars, "base64": scalars}),
                 values)


@FUZZ
@given(st.one_of(values, st.fixed_dictionaries({}, optional={
    "parts": st.one_of(st.lists(part, max_size=4), values), "messages": st.one_of(st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "robot", 3])},
                              optional={"content": scalars, "parts": st.lists(part, max_size=3)}), max_size=3), values),
    "metadata": values, "id": scalars})))
def test_document_records_are_a_document_or_a_malformed_record(record):
    def load(data, origin):
        raise BadInputError(f"{origin}: no such image")

    try:
        doc = record_to_document(record, load, ".")
    except (MalformedRecord, BadInputError):
        return
    assert all(hasattr(p, "text") or hasattr(p, "image") for p in doc.parts)


def _encoded(image: PIL.Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


IMAGES = {
    "png rgb": _encoded(PIL.Image.new("RGB", (8, 8), (9, 9, 9)), "PNG"),
    "png palette": _encoded(PIL.Image.new("P", (8, 8)), "PNG"),
    "png 16-bit": _encoded(PIL.Image.fromarray(np.full((8, 8), 60000, dtype=np.uint16)), "PNG"),
    "png rgba": _encoded(PIL.Image.new("RGBA", (8, 8), (1, 2, 3, 0)), "PNG"),
    "png 1x1": _encoded(PIL.Image.new("RGB", (1, 1)), "PNG"),
    "png la": _encoded(PIL.Image.new("LA", (8, 8)), "PNG"),
    "png 1-bit": _encoded(PIL.Image.new("1", (8, 8)), "PNG"),
    "jpeg cmyk": _encoded(PIL.Image.new("CMYK", (8, 8)), "JPEG"),
    "jpeg gray": _encoded(PIL.Image.new("L", (8, 8)), "JPEG"),
    "gif": _encoded(PIL.Image.new("P", (8, 8)), "GIF"),
    "bmp": _encoded(PIL.Image.new("RGB", (8, 8)), "BMP"),
    "tiff float": _encoded(PIL.Image.fromarray(np.zeros((8, 8), dtype=np.float32)), "TIFF"),
    "webp": _encoded(PIL.Image.new("RGB", (8, 8)), "WEBP"),
    "ico": _encoded(PIL.Image.new("RGB", (16, 16)), "ICO"),
}


def _huge_header_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header; no real pixels)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


BAD_IMAGES = {
    "truncated png": IMAGES["png rgb"][:40],
    "empty": b"",
    "text": b"hello, not an image",
    "16k x 16k header": _huge_header_png(16384, 16384),
    "bomb 100k x 100k": _huge_header_png(100_000, 100_000),
    "zero width": _huge_header_png(0, 8),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_format_pillow_reads_becomes_rgb(name):
    log = BadInputLog()
    image = decode_image(IMAGES[name], name, log=log)
    assert image is not None and image.mode == "RGB", log.summary()


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_a_counted_skip_or_a_clear_strict_error(name):
    log = BadInputLog()
    assert decode_image(BAD_IMAGES[name], name, log=log, max_pixels=4096 * 4096) is None
    assert log.num_skipped == 1 and name in log.summary()
    with pytest.raises(BadInputError, match=name):
        decode_image(BAD_IMAGES[name], name, log=BadInputLog(strict=True), max_pixels=4096 * 4096)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_an_image_or_a_counted_skip(data):
    log = BadInputLog()
    image = decode_image(data, "fuzz", log=log, max_pixels=4096 * 4096)
    assert (image is None) == (log.num_skipped == 1)


# --- prompts through the command line ------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
    from tiny import save_engine_folder, tiny_engine

    out = tmp_path_factory.mktemp("fuzz") / "model"
    texts = (t for d in ShapesSource(ShapesConfig(resolution=32), num=50) for t in d.texts)
    save_engine_folder(tiny_engine("tokens", TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=280))), out,
                       max_length=256)
    return out


@pytest.mark.parametrize("prompt, error", [
    ("", None), ("\x01\x1b[31mred\x7f\u200b\r\t", None), ("<boi><eoi><eos><|end|><mask:0>" * 3, None),
    ("🟥🔺 \U0010ffff", None), (b"\xff\xfe not UTF-8 \xc3", "not valid UTF-8"), ("a red star " * 5000, "positions long"),
])
def test_adversarial_prompts_write_a_document_or_one_clear_line(model_folder, tmp_path, prompt, error):
    import subprocess
    import sys

    out = tmp_path / "gen"
    result = subprocess.run([sys.executable, "-m", "mixmodal", "generate", str(model_folder), "--prompt", prompt,
                             "--mode", "text", "--max-new-tokens", "4", "--out", str(out)],  # bytes: as the shell passes them
                            capture_output=True, text=True, errors="replace",
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if error is None:
        assert result.returncode == 0 and (out / "documents.jsonl").is_file()
        record = json.loads((out / "documents.jsonl").read_text().splitlines()[0])
        assert "parts" in record
    else:
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
        assert error in result.stderr and not out.exists()  # nothing half written


def test_special_token_strings_in_a_prompt_stay_text(model_folder):
    from mixmodal.inference.checkpoint import load_checkpoint

    engine = load_checkpoint(model_folder)
    ids = engine.text_tokenizer.encode("<boi><eos><|end|>")
    v = engine.vocab
    assert ids and not set(ids) & {v.boi, v.eos, v.end_of_turn, v.bos}  # only the layout places control ids


# --- damaged files behind every loader -------------------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_a_damaged_image_tokenizer_or_source_folder_is_one_line(tmp_path, damage):
    from mixmodal.interop.common import ConversionError, read_hf_state
    from mixmodal.tokenizers.image import load_image_tokenizer, save_image_tokenizer
    from tiny import tiny_image_tokenizer

    save_image_tokenizer(tiny_image_tokenizer("tokens"), tmp_path / "vq")
    weights = tmp_path / "vq" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "foreign": b"\x80\x04 a pickle" * 9}[damage])
    with pytest.raises(ValueError, match="model.safetensors") as e:
        load_image_tokenizer(tmp_path / "vq")
    assert "\n" not in str(e.value) and "re-save" in str(e.value)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(ConversionError, match="re-download or re-save"):
        read_hf_state(tmp_path / "hf", "ChameleonForConditionalGeneration")


# --- WebDataset shards: cut anywhere, empty, not a tar, bad members ----------------------------------------

def _wds_docs(n: int = 5) -> list:
    from mixmodal.documents import Document, Image, Text

    rng = np.random.default_rng(0)
    image = lambda: Image(PIL.Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)))  # noqa: E731
    return [Document([image(), Text(f"caption {i}")], id=f"d{i}") if i % 2  # LAION layout
            else Document([Text(f"story {i}"), image(), Text("then"), image()], id=f"d{i}")  # multi-part layout
            for i in range(n)]


@pytest.fixture(scope="module")
def wds_shard(tmp_path_factory):
    from mixmodal.data.sources.wds import write_webdataset

    import tarfile

    (shard,) = write_webdataset(_wds_docs(), tmp_path_factory.mktemp("wds"), shard_size=100)
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    members_end = last.offset_data + -(-last.size // 512) * 512  # then zero blocks to the end
    return shard.read_bytes(), members_end


def _read_shard(path, strict: bool = False):
    from mixmodal.data.sources import open_source

    source = open_source(f"wds:{path}", strict=strict)
    return [d.id for d in source], dict(source.log.skipped), source.summary()


def _assert_whole_prefix_or_counted(path, complete: bool) -> None:
    ids, skipped, summary = _read_shard(path)
    assert ids == [f"d{i}" for i in range(len(ids))]  # whole samples, in order: never a partial one
    if complete:
        assert len(ids) == 5 and not skipped
    else:
        assert skipped == {"bad-shard": 1} and str(path) in summary  # a cut shard is always counted
    try:
        assert _read_shard(path, strict=True)[0] == ids
    except BadInputError as e:
        assert str(path) in str(e) and "bad-shard" in str(e) and "re-download or re-write" in str(e)


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_shard_cut_anywhere_gives_whole_samples_and_a_counted_skip(wds_shard, tmp_path, data):
    """A download cut short ends at any byte: inside a member, inside or at a header, in the end blocks."""
    shard, members_end = wds_shard
    cut = data.draw(st.one_of(st.integers(0, len(shard)), st.integers(0, len(shard) // 512).map(lambda b: 512 * b)))
    path = tmp_path / "shard.tar"
    path.write_bytes(shard[:cut])
    # whole only when cut inside the end blocks, on a block boundary (nothing of the archive is lost)
    _assert_whole_prefix_or_counted(path, complete=cut == len(shard) or (cut % 512 == 0 and cut > members_end))


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_compressed_shard_cut_anywhere_is_counted_not_silently_short(wds_shard, tmp_path, data):
    import gzip

    packed = gzip.compress(wds_shard[0], mtime=0)
    cut = data.draw(st.integers(0, len(packed)))
    path = tmp_path / "shard.tar.gz"
    path.write_bytes(packed[:cut])
    _assert_whole_prefix_or_counted(path, complete=cut == len(packed))


def _tar(path, members: list[tuple[str, bytes]]):
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _png() -> bytes:
    return _encoded(PIL.Image.new("RGB", (8, 8), "blue"), "PNG")


def _laion(key: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", _png()), (f"{key}.txt", b"a blue square")]


WDS_CASES = {  # members around a good "a" and "c": (members of the middle, {reason: count}, ids that come through)
    "bad json": ([("b.png", _png()), ("b.txt", b"x"), ("b.json", b"{not json")], {"malformed-json": 1}, ["a", "c"]),
    "json not an object": ([("b.json", b"[1, 2]"), ("b.png", _png()), ("b.txt", b"x")], {"bad-schema": 1}, ["a", "c"]),
    "deep json": ([("b.json", b"[" * 100000)], {"malformed-json": 1}, ["a", "c"]),
    "missing image": ([("b.txt", b"a caption")], {"missing-field": 1}, ["a", "c"]),
    "missing caption": ([("b.png", _png())], {"missing-field": 1}, ["a", "c"]),
    "corrupt png": ([("b.png", _png()[:40]), ("b.txt", b"x")], {"corrupt-image": 1}, ["a", "c"]),
    "not an image": ([("b.png", b"GIF89a but not really"), ("b.txt", b"x")], {"corrupt-image": 1}, ["a", "c"]),
    "multi-part member missing": ([("b.json", json.dumps({"parts": [{"type": "image", "member": "0.png"}]}).encode())],
                                  {"missing-field": 1}, ["a", "c"]),
    "multi-part member escapes": ([("b.json", json.dumps({"parts": [{"type": "image", "member": "../../x.png"}]})
                                    .encode())], {"missing-field": 1}, ["a", "c"]),
    "unexpected extensions": ([("b.exe", b"MZ"), ("b.png", _png()), ("b.txt", b"x"), ("b.tar", b"nested"),
                               ("noext", b"z"), (".hidden", b"h")], {}, ["a", "b", "c"]),
    "only unexpected members": ([("b.weird.ext", b"?"), ("b.exe", b"MZ")], {"missing-field": 1}, ["a", "c"]),
    "upper-case extensions": ([("b.PNG", _png()), ("b.TXT", b"x")], {}, ["a", "b", "c"]),
    # two members with the same key and extension: ambiguous, so the sample is skipped, not the rest of the shard
    "duplicate member": ([("b.png", _png()), ("b.txt", b"x"), ("b.txt", b"y")], {"bad-schema": 1}, ["a", "c"]),
    "duplicate member by case": ([("b.png", _png()), ("b.PNG", _png()), ("b.txt", b"x")], {"bad-schema": 1},
                                 ["a", "c"]),
    "duplicate json of a multi-part sample": ([("b.json", json.dumps({"parts": [{"type": "text", "text": "one"}]})
                                                .encode()), ("b.json", b'{"parts": []}')], {"bad-schema": 1}, ["a", "c"]),
    "members named like the sample's fields": ([("b.__key__", b"x"), ("b.__url__", b"y"), ("b.png", _png()),
                                               ("b.txt", b"x")], {}, ["a", "b", "c"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(WDS_CASES))
def test_a_bad_member_is_one_counted_skip_or_a_strict_error(tmp_path, case):
    middle, reasons, ids = WDS_CASES[case]
    path = _tar(tmp_path / "s.tar", _laion("a") + middle + _laion("c"))
    got, skipped, summary = _read_shard(path)
    assert (got, skipped) == (ids, reasons)
    if reasons:
        assert f"{path}:b" in summary
        with pytest.raises(BadInputError, match=f"{path}:b.*: {next(iter(reasons))}: "):
            _read_shard(path, strict=True)
    else:
        assert _read_shard(path, strict=True)[0] == ids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", [b"", b"this is not a tar file\n" * 100, b"\x1f\x8b\x08\x00 not gzip" * 20,
                                     b"\0" * 100, b"BZh9 not bzip2"], ids=["empty", "text", "bad-gzip", "zeros", "bad-bz2"])
def test_a_shard_that_is_not_a_tar_is_one_counted_skip(tmp_path, content):
    path = tmp_path / "s.tar"
    path.write_bytes(content)
    ids, skipped, summary = _read_shard(path)
    assert ids == [] and skipped == {"bad-shard": 1} and str(path) in summary
    with pytest.raises(BadInputError, match="bad-shard: .*re-download or re-write the shard"):
        _read_shard(path, strict=True)


MEMBER_NAMES = ["a.png", "a.txt", "a.json", "b.jpg", "b.txt", "c.0.png", "c.json", "d", ".e", "f.exe", "g.PNG",
                "g.TXT", "dir/h.png", "dir/h.txt", "i.webp", "i.txt"]
PAYLOADS = [b"", b"caption", b"caf\xe9", b"{not json", b'{"id": 5}', b"[]",
            json.dumps({"parts": [{"type": "text", "text": "hi"}, {"type": "image", "member": "0.png"}]}).encode(),
            json.dumps({"parts": [{"type": "image", "member": "png"}]}).encode(), b"\x89PNG\r\n\x1a\n cut"]


@pytest.mark.timeout(120)
@FUZZ
@given(st.lists(st.tuples(st.sampled_from(MEMBER_NAMES), st.one_of(st.sampled_from(PAYLOADS), st.just(None))),
                max_size=10))
def test_random_members_are_documents_or_counted_skips(members):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = _tar(f"{folder}/s.tar", [(n, _png() if p is None else p) for n, p in members])
        ids, skipped, _ = _read_shard(path)
        assert all(isinstance(i, str) for i in ids)
        try:
            _read_shard(path, strict=True)
        except BadInputError as e:
            assert str(path) in str(e) and skipped
