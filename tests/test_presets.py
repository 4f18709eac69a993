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
from mixmodal.train.run import load_run_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
KINDS = {"data": ShapesConfig, "tokenizer": TextTokenizerConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_preset_resolves(path):
    if path.parent.relative_to(CONFIGS).as_posix() == "tokenizers/models":  # `kind: vq|vae` + fields
        build_image_tokenizer_config(path)
        return
    if "task" in (yaml.safe_load(path.read_text()) or {}):  # a run config for `mixmodal train`
        load_run_config(path)
        return
    cls = DemoConfig if path.name == "demo.yaml" else KINDS[path.parent.name]
    build_config(cls, path)


def test_demo_preset_equals_the_defaults():
    """configs/demo.yaml documents the defaults `make demo` runs with; they must not drift."""
    assert build_config(DemoConfig, CONFIGS / "demo.yaml") == DemoConfig()
