"""Typed configs: presets, dotlist overrides, and errors that name the key and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from mixmodal.config import ConfigError, build_config, from_dict, parse_overrides, save_config, to_dict


@dataclass
class ModelConfig:
    dim: int = 64
    dropout: float = 0.0
    qk_norm: bool = True
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    name: str = "tiny"
    tasks: list[str] = field(default_factory=lambda: ["caption"])
    max_len: int | None = None

    def __post_init__(self):
        if self.dim % 2:
            raise ValueError(f"dim must be even, got {self.dim}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0


def test_defaults_yaml_overrides_precedence(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  dim: 128\n  dropout: 0.1\nseed: 3\n")
    cfg = build_config(RunConfig, preset, ["model.dim=256", "model.tasks=[caption,vqa]", "model.max_len=null"])
    assert cfg.model.dim == 256  # override beats YAML
    assert cfg.model.dropout == 0.1  # YAML beats default
    assert cfg.seed == 3
    assert cfg.model.qk_norm is True  # default kept
    assert cfg.model.tasks == ["caption", "vqa"]
    assert cfg.model.max_len is None


def test_string_override_keeps_text_and_numbers_are_parsed():
    cfg = build_config(RunConfig, None, ["model.name=2024", "model.dropout=1e-1", "model.max_len=77", "model.tasks=a,b"])
    assert cfg.model.name == "2024"
    assert cfg.model.dropout == pytest.approx(0.1)
    assert cfg.model.max_len == 77
    assert cfg.model.tasks == ["a", "b"]


def test_unknown_key_names_full_path_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        build_config(RunConfig, None, ["model.dimm=3"])
    msg = str(e.value)
    assert "model.dimm" in msg and "unknown key (did you mean 'dim'?); allowed keys of ModelConfig" in msg and "dropout" in msg


def test_unknown_key_in_yaml(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("modle:\n  dim: 128\n")
    with pytest.raises(ConfigError, match=r"modle: unknown key \(did you mean 'model'\?\)"):
        build_config(RunConfig, preset)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.dim=abc", r"model\.dim: expected an integer, got 'abc'"),
        ("model.dim=1.5", r"model\.dim: expected an integer"),
        ("model.qk_norm=maybe", r"model\.qk_norm: expected true or false"),
        ("model.dropout=high", r"model\.dropout: expected a number"),
        ("model.norm=batchnorm", r"model\.norm: 'batchnorm' is not allowed; allowed values: 'rmsnorm', 'layernorm'"),
        ("model.tasks=[a, {b: 2}]", r"model\.tasks\[1\]: expected a string"),
        ("seed=", r"seed: expected an integer"),
    ],
)
def test_wrong_types_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config(RunConfig, None, [override])


def test_post_init_validation_is_prefixed_with_the_path():
    with pytest.raises(ConfigError, match=r"model: dim must be even, got 3"):
        build_config(RunConfig, None, ["model.dim=3"])


@pytest.mark.parametrize("bad", ["model.dim", "=3", "model..dim=3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides([bad])


def test_yaml_preset_must_be_a_mapping(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(RunConfig, preset)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(RunConfig, tmp_path / "missing.yaml")


def test_resolved_config_round_trips_through_the_run_dir(tmp_path):
    cfg = build_config(RunConfig, None, ["model.dim=32", "model.norm=layernorm"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    again = from_dict(RunConfig, yaml.safe_load(path.read_text()))
    assert again == cfg
    assert to_dict(again)["model"]["norm"] == "layernorm"
