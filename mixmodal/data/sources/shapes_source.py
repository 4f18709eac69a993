"""An adapter from the built-in procedural world (mixmodal.data.shapes) to a Source.

The world's contract: `shapes_document(config, split, index)` is a pure function, so a
consumer generates exactly its own indices. The world is imported late, inside the
class, so that this module imports whether or not that package is installed.
"""

from __future__ import annotations

import itertools
from typing import Iterator

from mixmodal.config import ConfigError, from_dict, merge, parse_overrides, to_dict
from mixmodal.data.sources.base import Source, SourceSpecError
from mixmodal.documents import Document

SHAPES_SPLITS = ("train", "heldout", "heldout-combos", "all")  # all: image tokenizers only


class ShapesSource(Source):
    """Documents of the procedural world: `shapes_document(config, split, index)` for
    index 0..num-1 (num=None: endless), each consumer generating only its own indices."""

    def __init__(self, config=None, split: str = "train", num: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if split not in SHAPES_SPLITS:
            raise ValueError(f"shapes split must be one of {', '.join(SHAPES_SPLITS)}; got {split!r}")
        if num is not None and num < 0:
            raise ValueError(f"num must be >= 0 or None (endless), got {num}")
        if config is None:
            from mixmodal.data.shapes import ShapesConfig  # imported late: an optional sibling

            config = ShapesConfig()
        self.config = config
        self.split = split
        self.num = num
        self._skip = 0

    def skip(self, n: int) -> int:
        """Start the next iteration after this consumer's first n documents, without
        generating them; returns how many were skipped (fewer if the split ends first)."""
        if self.num is not None:
            consumer, num_consumers = self.consumer()
            n = min(n, len(range(consumer, self.num, num_consumers)))
        self._skip = max(n, 0)
        return self._skip

    def __repr__(self) -> str:
        return f"ShapesSource({self.config}, split={self.split!r}, num={self.num}{self._sharding()})"

    def _documents(self, consumer: int, num_consumers: int) -> Iterator[Document]:
        from mixmodal.data.shapes import shapes_document  # imported late: an optional sibling

        first = consumer + self._skip * num_consumers
        if self.num is None:
            indices = itertools.count(first, num_consumers)
        else:
            indices = range(first, self.num, num_consumers)
        for index in indices:
            yield shapes_document(self.config, self.split, index)


def shapes_source_from_spec(rest: str, common: dict) -> ShapesSource:
    """`shapes:resolution=32,split=heldout,num=100,tasks=caption+vqa` -> ShapesSource.

    `split` and `num` select the documents; every other key is a ShapesConfig field,
    parsed and checked by mixmodal.config like a command-line override ("+" separates
    list items, since "," separates the pairs)."""
    try:
        from mixmodal.data.shapes import ShapesConfig  # imported late: an optional sibling
    except ImportError as e:
        raise SourceSpecError(f"the built-in shapes world is not available ({e})") from None
    for unused in ("strict", "max_pixels"):  # generated documents are never bad input
        common.pop(unused, None)
    config = common.pop("config", None) or ShapesConfig()
    pairs = [pair.strip() for pair in rest.split(",") if pair.strip()]
    overrides = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise SourceSpecError(f"shapes: expected key=value, got {pair!r}")
        if key == "split":
            common["split"] = value
        elif key == "num":
            common["num"] = None if value.lower() in ("none", "null") else _int(value, key)
        else:
            overrides.append(f"{key}={value.replace('+', ',')}")
    try:
        config = from_dict(ShapesConfig, merge(to_dict(config), parse_overrides(overrides)), "shapes")
        return ShapesSource(config, **common)
    except (ConfigError, ValueError) as e:
        raise SourceSpecError(f"{e} (split and num are also accepted)") from None


def _int(value: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SourceSpecError(f"shapes: {key} must be an integer, got {value!r}") from None
