"""Command-line flags that are aliases of config keys, declared once.

A `Flag` names a keyword (`image_cfg`), the option it becomes (`--image-cfg`) and the config
keys it sets (`guidance.image_scale`). From one table come both the argparse options of a verb
and the translation of given values into `key=value` overrides, which are applied before the
user's own overrides (so `mixmodal generate --cfg 3 guidance.scale=5` guides at 5).

GENERATION_FLAGS are the `GenerationConfig` flags of `mixmodal generate` and `mixmodal chat`,
and the keywords of `mixmodal.generate(...)` and `generation_config(...)` (inference/generate.py,
serve/app.py). The table lives here, not in inference/, because importing anything under
inference/ loads torch, and `mixmodal --help` builds every verb's parser.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence


class Flag(NamedTuple):  # not a dataclass: 20x cheaper to define, and this module loads on every `mixmodal --help`
    """`--NAME` on the command line, keyword NAME in Python: sets each of `keys` to its value."""

    name: str  # the keyword and argparse dest; the option is --name with "-" for "_"
    keys: tuple[str, ...]  # the dotted config keys it sets, in order
    help: str = ""
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_to(self, parser: argparse.ArgumentParser, help: str | None = None) -> None:
        """An optional argument, default None: not given, the config's own default stands."""
        kwargs: dict[str, Any] = {"default": None, "help": self.help if help is None else help}
        if self.type is not None:
            kwargs["type"] = self.type
        if self.choices is not None:
            kwargs["choices"] = list(self.choices)
        parser.add_argument(self.option, **kwargs)


GENERATION_FLAGS: tuple[Flag, ...] = (
    Flag("mode", ("mode",), "what the output may hold (default interleaved)",
         choices=("text", "image", "interleaved", "free")),
    Flag("cfg", ("guidance.scale",), "classifier-free guidance scale (default 1: off)", float),
    Flag("image_cfg", ("guidance.image_scale",),
         "image-conditioning guidance scale: three streams, for editing (InstructPix2Pix)", float),
    Flag("steps", ("diffusion_steps",), "denoising steps per image (latent mode; default 50)", int),
    Flag("max_new_tokens", ("max_new_tokens",), "positions to write at most (default 512)", int),
    Flag("max_images", ("max_images",), "images to write at most (default 1)", int),
    Flag("temperature", ("text.temperature", "image.temperature"), "for text and image codes (0 = greedy)", float),
)


def _by_name(table: Sequence[Flag]) -> dict[str, Flag]:
    return {flag.name: flag for flag in table}


def add_flags(parser: argparse.ArgumentParser, table: Sequence[Flag], names: Iterable[str] | None = None,
              help: Mapping[str, str] | None = None) -> None:
    """Add the flags `names` of `table` (default: all, in table order) to `parser`; `help`
    rewords some for a verb (e.g. `mixmodal chat`: "what a reply may hold")."""
    flags = _by_name(table)
    for name in (names if names is not None else flags):
        flags[name].add_to(parser, (help or {}).get(name))


def given(args: argparse.Namespace, table: Sequence[Flag]) -> dict[str, Any]:
    """The values of the table's flags a parser holds (None where not given), by keyword."""
    return {flag.name: getattr(args, flag.name) for flag in table if hasattr(args, flag.name)}


def flag_overrides(table: Sequence[Flag], values: Mapping[str, Any], caller: str) -> list[str]:
    """`key=value` overrides for the flags given (value not None), in table order; a keyword the
    table does not hold is a TypeError, as for a Python signature."""
    flags = _by_name(table)
    for name in values:
        if name not in flags:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r} "
                            f"(its flag keywords: {', '.join(flags)})")
    return [f"{key}={values[flag.name]}" for flag in table if values.get(flag.name) is not None for key in flag.keys]


__all__ = ["Flag", "GENERATION_FLAGS", "add_flags", "flag_overrides", "given"]
