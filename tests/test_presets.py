"""Every YAML preset in configs/ resolves against the config it is meant for."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from mixmodal.config import build_config
from mixmodal.data.shapes import ShapesConfig
from mixmodal.demo import DemoConfig
from mixmodal.tokenizers.image import build_image_tokenizer_config
from mixmodal.tokenizers.text import TextTokenizerConfig
from mixmodal.train.checkpoint import config_differences, plain_config
from mixmodal.train.run import load_run_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
KINDS = {"data": ShapesConfig, "tokenizer": TextTokenizerConfig}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A model folder for presets that fine-tune one (`init_from:`; the real one is a recipe's run)."""
    from mixmodal.data.sources import ShapesSource
    from mixmodal.tokenizers.text import TextTokenizer
    from tiny import save_engine_folder, tiny_engine

    out = {}
    texts = [t for doc in ShapesSource(ShapesConfig(resolution=32), num=50) for t in doc.texts]
    for mode in ("tokens", "latents"):
        out[mode] = tmp_path_factory.mktemp(mode) / "model"
        save_engine_folder(tiny_engine(mode, TextTokenizer.train(iter(texts), TextTokenizerConfig(vocab_size=280))),
                           out[mode])
    return out


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_preset_resolves(path, pretrained):
    if path.parent.relative_to(CONFIGS).as_posix() == "tokenizers/models":  # `kind: vq|vae` + fields
        build_image_tokenizer_config(path)
        return
    data = yaml.safe_load(path.read_text()) or {}
    if "task" in data:  # a run config for `mixmodal train`
        if data.get("init_from"):  # its architecture comes from the folder; a tiny one of the same image mode
            mode = "latents" if "latents" in data["init_from"] else "tokens"
            config = load_run_config(path, [f"init_from={pretrained[mode]}"])
            assert config.model.image.mode == mode and config.init_from
            return
        load_run_config(path)
        return
    cls = DemoConfig if path.name == "demo.yaml" else KINDS[path.parent.name]
    build_config(cls, path)


def test_demo_preset_equals_the_defaults():
    """configs/demo.yaml documents the defaults `make demo` runs with; they must not drift."""
    assert build_config(DemoConfig, CONFIGS / "demo.yaml") == DemoConfig()


@pytest.mark.parametrize("base, chat, differ", [
    ("tokens-48", "tokens-48-chat", {"data.source", "model.image.slot_embedding"}),
    ("latents-48", "latents-48-chat", {"data.source"}),
])
def test_chat_bases_are_their_recipes_but_for_the_named_fields(base, chat, differ):
    """The SFT bases copy their recipe file (configs have no inheritance): they must not drift from it."""
    a, b = (plain_config(load_run_config(CONFIGS / "recipes" / f"{n}.yaml")) for n in (base, chat))
    changed = config_differences(a, b)  # "key: old -> new"
    assert {line.split(":", 1)[0] for line in changed} == differ, changed
