import io
import json
import re

import numpy as np
import PIL.Image
import pytest

from mixmodal.documents import Document, Image, Text, record_to_document
from mixmodal.inference.output import render_html, save_generation


def _img(colour, size=(8, 8)):
    return Image(PIL.Image.new("RGB", size, colour))


def _load(data, origin):
    with (io.BytesIO(data) if data is not None else open(origin, "rb")) as f:
        image = PIL.Image.open(f)
        image.load()
    return image.convert("RGB")


def _same_pixels(a, b):
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def docs():
    prompts = [
        Document([Text("Draw a red square <script>alert(1)</script>"), _img((0, 0, 255))]),
        Document([Text("Two cats & a dog")]),
    ]
    results = [
        Document(
            [Text("Here:\nline two <b>"), _img((255, 0, 0)), Text("and & more"), _img((0, 255, 0), (32, 32))],
            metadata={"finish_reason": "eos", "seed": 1234, "timings": {"total_s": 0.25}},
            id="gen-0",
        ),
        Document([_img((10, 20, 30), (64, 64)), Text("<script>bad()</script>")], metadata={"seed": 99}),
    ]
    return prompts, results


def test_save_generation_round_trips(tmp_path, docs):
    prompts, results = docs
    files = save_generation(results, tmp_path / "out", prompts=prompts, settings={"checkpoint": "ck.pt"})
    assert files.out_dir == tmp_path / "out"
    assert files.jsonl.is_file() and files.html.is_file()
    names = [p.relative_to(files.out_dir).as_posix() for p in files.images]
    assert names == ["images/0000_0.png", "images/0000_1.png", "images/0001_0.png"]
    assert all(p.is_file() for p in files.images)
    assert not list(files.out_dir.glob("*.tmp"))

    records = [json.loads(line) for line in files.jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(results)
    for record, want, prompt in zip(records, results, prompts):
        got = record_to_document(record, _load, files.out_dir)
        assert got.texts == want.texts and got.id == want.id
        assert len(got.images) == len(want.images)
        assert all(_same_pixels(a, b) for a, b in zip(got.images, want.images))
        for key, value in want.metadata.items():
            assert got.metadata[key] == value
        # The prompt travels in the record, images inlined.
        prompt_record = record["metadata"]["prompt"]
        assert all("path" not in p for p in prompt_record["parts"])
        got_prompt = record_to_document(prompt_record, _load, files.out_dir)
        assert got_prompt.texts == prompt.texts
        assert all(_same_pixels(a, b) for a, b in zip(got_prompt.images, prompt.images))
    assert "prompt" not in results[0].metadata  # the caller's documents are not modified


def test_html_is_self_contained_and_escaped(tmp_path, docs):
    prompts, results = docs
    settings = {"checkpoint": "runs/x/ck.pt", "mode": "interleaved", "cfg": 3.0}
    page = save_generation(results, tmp_path, prompts=prompts, settings=settings).html.read_text(encoding="utf-8")
    assert page == render_html(results, prompts=prompts, settings=settings)

    n_images = sum(d.num_images for d in prompts + results)
    assert page.count("<img") == n_images == page.count('src="data:image/png;base64,')
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Two cats &amp; a dog" in page and "and &amp; more" in page
    assert "Here:\nline two &lt;b&gt;" in page
    assert "pre-wrap" in page and "pixelated" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    for shown in ("finish_reason", "eos", "1234", "total_s", "0.25", "99", "runs/x/ck.pt", "interleaved", "gen-0"):
        assert shown in page
    assert "image 1 (32x32)" in page and "prompt image 0" in page


def test_overwrites_existing_output(tmp_path, docs):
    _, results = docs
    save_generation(results, tmp_path)
    files = save_generation(results[1:], tmp_path, title="again")
    assert len(files.jsonl.read_text(encoding="utf-8").splitlines()) == 1
    assert "again" in files.html.read_text(encoding="utf-8")


def test_out_dir_that_is_a_file(tmp_path, docs):
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="pick a directory") as e:
        save_generation(docs[1], path)
    assert str(path) in str(e.value)


def test_empty_results_still_write_a_page(tmp_path):
    files = save_generation([], tmp_path / "empty")
    assert files.jsonl.read_text(encoding="utf-8") == "" and files.images == []
    assert "No documents were generated" in files.html.read_text(encoding="utf-8")


def test_prompt_count_must_match(tmp_path, docs):
    prompts, results = docs
    with pytest.raises(ValueError, match="one prompt per result"):
        save_generation(results, tmp_path, prompts=prompts[:1])
