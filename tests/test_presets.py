"""Every YAML preset in configs/ resolves against the config it is meant for."""

from __future__ import annotations

import pathlib

import pytest

from mixmodal.config import build_config
from mixmodal.data.shapes import ShapesConfig
from mixmodal.demo import DemoConfig
from mixmodal.tokenizers.text import TextTokenizerConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
KINDS = {"data": ShapesConfig, "tokenizer": TextTokenizerConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_preset_resolves(path):
    cls = DemoConfig if path.name == "demo.yaml" else KINDS[path.parent.name]
    build_config(cls, path)


def test_demo_preset_equals_the_defaults():
    """configs/demo.yaml documents the defaults `make demo` runs with; they must not drift."""
    assert build_config(DemoConfig, CONFIGS / "demo.yaml") == DemoConfig()
