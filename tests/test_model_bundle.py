"""The model bundle (model/bundle.py, issue 21): one module owns the model folder; loading it checks the
folder's manifest once and hashes each file at most once; the engine is built from the Bundle; nothing in
the bundle's imports reaches the engine or training."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixmodal import weights
from mixmodal.inference.config import GenerationConfig
from mixmodal.inference.engine import Engine
from mixmodal.model.bundle import Bundle, load_bundle
from mixmodal.weights import ManifestError


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
    from tiny import save_engine_folder, tiny_engine

    texts = (t for d in ShapesSource(ShapesConfig(resolution=32), num=50) for t in d.texts)
    tokenizer = TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=280))
    out = tmp_path_factory.mktemp("run") / "model"
    save_engine_folder(tiny_engine("latents", tokenizer), out, max_length=200,
                       retrieval={"index": "bank", "encoder": "enc", "k": 2})
    weights.write_manifest(out)
    return out


def _hashes(monkeypatch) -> collections.Counter:
    calls: collections.Counter = collections.Counter()
    file_sha256 = weights.file_sha256

    def counting(path):
        calls[Path(path).resolve()] += 1
        return file_sha256(path)

    monkeypatch.setattr(weights, "file_sha256", counting)
    return calls


def test_a_load_hashes_every_file_once(folder, monkeypatch):
    calls = _hashes(monkeypatch)
    Engine.from_pretrained(folder.parent)  # the run directory: its model/
    listed = {(folder / name).resolve() for name in weights.read_manifest(folder)["files"]}
    assert set(calls) == listed  # every listed file (the tokenizers' included) was checked ...
    assert max(calls.values()) == 1, {str(p): n for p, n in calls.items() if n > 1}  # ... and hashed once


def test_a_folder_manifest_that_does_not_list_a_tokenizer_leaves_its_own_manifest_checked(folder, tmp_path,
                                                                                          monkeypatch):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    weights.write_manifest(copy, ["config.yaml", "model.safetensors"])  # the tokenizers are not listed
    tokenizer = copy / "text_tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("<bos>", "<BOS>", 1))  # same size: only a hash tells
    with pytest.raises(ManifestError, match="tokenizer.json does not match its SHA-256"):
        load_bundle(copy)


def test_the_bundle_holds_what_the_folder_says(folder):
    bundle = load_bundle(folder, dtype=torch.float32)
    assert isinstance(bundle, Bundle) and bundle.folder == folder
    assert bundle.max_length == 200 and bundle.diffusion is not None and bundle.image_tokenizer is not None
    assert bundle.retrieval == {"index": "bank", "encoder": "enc", "k": 2}
    assert (bundle.image_generation, bundle.chat_template, bundle.image_preprocessing) == (True, None, "mixmodal")
    engine = Engine.from_bundle(bundle)
    assert engine.checkpoint == str(folder) and engine.max_length == 200 and engine.dtype is torch.float32


def test_from_pretrained_and_the_old_load_checkpoint_generate_the_same(folder):
    from mixmodal.inference.checkpoint import load_checkpoint

    config = GenerationConfig(mode="interleaved", max_new_tokens=40, diffusion_steps=3)
    a = Engine.from_pretrained(folder).generate(["a red circle", "a"], config, seed=3)
    b = load_checkpoint(folder).generate(["a red circle", "a"], config, seed=3)
    for x, y in zip(a, b):
        assert x.document.texts == y.document.texts
        assert [i.tobytes() for i in x.document.images] == [i.tobytes() for i in y.document.images]


def test_a_missing_image_tokenizer_is_an_error_only_when_required(folder, tmp_path):
    import shutil

    from mixmodal.model.bundle import BundleError

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "image_tokenizer")
    weights.write_manifest(copy)
    with pytest.raises(BundleError, match="has no image_tokenizer/ folder"):
        load_bundle(copy)
    assert load_bundle(copy, require_image_tokenizer=False).image_tokenizer is None


def test_the_bundle_reaches_neither_the_engine_nor_training():
    code = ("import sys, mixmodal.model.bundle; "
            "print(sorted(m for m in sys.modules if m.startswith(('mixmodal.inference', 'mixmodal.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
