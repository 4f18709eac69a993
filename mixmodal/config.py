"""Typed configs: dataclasses, YAML presets, dotlist overrides, validation.

Each component owns a dataclass next to its code (e.g. `ShapesConfig` in
data/shapes); run configs nest them. Values are resolved as

    dataclass defaults  <-  YAML preset  <-  command-line overrides (`model.dim=256`)

and checked on the way in: an unknown key or a value of the wrong type fails with the
key's full path, what was given and what is allowed. The resolved config is written into
the run directory as `config.yaml`, so a run can always be reproduced from its folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be accepted; the message names the full key path."""


class _Raw(str):
    """A value typed on the command line: kept as text for `str` fields, parsed as YAML otherwise."""


# --- building ----------------------------------------------------------------------------

def build_config(
    cls: type[T],
    preset: str | os.PathLike | dict | None = None,
    overrides: typing.Sequence[str] = (),
) -> T:
    """Resolve `cls` defaults <- YAML preset (path or dict) <- dotlist overrides."""
    data: dict = {}
    if isinstance(preset, dict):
        data = preset
    elif preset is not None:
        data = load_yaml(preset)
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # a binary file, or one damaged on disk
        raise ConfigError(f"{path} is not UTF-8 text (an undecodable byte at offset {e.start}): it is not a "
                          "config file, or it is damaged") from None
    try:
        size = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if size > MAX_YAML_VALUES:
            raise ConfigError(f"{path} expands to {size:,} values through its anchors and aliases (more than "
                              f"{MAX_YAML_VALUES:,}): a config is never that large; remove the nested aliases")
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:  # one line: PyYAML's message spans several
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


MAX_YAML_VALUES = 100_000  # nodes of a config once its aliases are expanded (a "billion laughs" file has 10^9)


def _expanded_size(root) -> int:
    """How many nodes a composed YAML document has with every alias expanded, counted without
    expanding (each node once, memoised): a file of nested aliases is refused before it is built."""
    if root is None:
        return 0
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        kids = ([k for pair in node.value for k in pair] if isinstance(node, yaml.MappingNode)
                else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if children_done or not kids:
            sizes[id(node)] = 1 + sum(sizes.get(id(k), 0) for k in kids)
        else:
            stack.append((node, True))
            stack += [(k, False) for k in kids if id(k) not in sizes]
    return sizes[id(root)]


def relative_to_config(value: str | os.PathLike, config_dir: str | os.PathLike) -> Path:
    """A path named inside a config file: relative to that file's folder when it exists
    there, else as given (relative to the working directory)."""
    path = Path(value)
    beside = Path(config_dir) / path
    return beside if not path.is_absolute() and beside.exists() else path


def parse_overrides(overrides: typing.Sequence[str]) -> dict:
    """['model.dim=256', 'data.tasks=[caption,vqa]'] -> {'model': {'dim': '256'}, ...}."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. model.dim=256)")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[leaf] = _Raw(value)
    return out


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, checking keys and types."""
    where = path or "<root>"
    if isinstance(data, _Raw):
        data = _parse_raw(data, where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{_join(path, key)}: unknown key{hint}; allowed keys of {cls.__name__}: {', '.join(fields)}"
            )
    kwargs = {k: _convert(hints[k], v, _join(path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _parse_raw(value: _Raw, where: str) -> Any:
    try:
        return yaml.safe_load(str(value)) if str(value) != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse {str(value)!r} ({e})") from None


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if isinstance(value, _Raw) and str(value).lower() in ("null", "none", "~") and type(None) in args:
            return None
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: may not be null; expected {_type_name(tp)}")
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(arm, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if isinstance(value, _Raw):
        if tp is str:
            return str(value)
        value = _parse_raw(value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; allowed values: {', '.join(repr(a) for a in args)}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) and tp is not str:
            value = [v.strip() for v in value.split(",")] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        value_tp = args[1] if len(args) == 2 else Any  # an override's values are parsed as YAML, as anywhere else
        return {k: _convert(value_tp, v, _join(path, k)) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r} (quote it in YAML)")
    raise ConfigError(f"{path}: unsupported config type {_type_name(tp)}")


# --- writing -----------------------------------------------------------------------------

def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain nested dict/list/scalars, suitable for YAML and JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run directory (atomically)."""
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path)
    return path
