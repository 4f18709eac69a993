"""Readers that turn data on disk (or the built-in world) into a stream of Documents.

Every reader is a `Source`: a `torch.utils.data.IterableDataset` yielding `Document`s,
with a `log` (BadInputLog) that skips and counts bad records, and explicit data-parallel
sharding (`rank`, `world_size`) combined inside `__iter__` with the DataLoader worker it
runs in (base.py). The formats, layouts, spec strings and the bad-input policy are in
docs/data.md.

    JsonlSource          jsonl.py           documents JSONL + image files or base64
    WebDatasetSource     wds.py             tar shards, LAION layout or multi-part
    write_webdataset     wds.py             Documents -> tar shards
    CocoCaptionsSource   coco.py            COCO captions annotations + image folder
    ShapesSource         shapes_source.py   the built-in procedural world
    MixSource            mix.py             several sources sampled by weight (mix:A@3|B@1)
    open_source          spec.py            any of them from one string, for the CLI
"""

from mixmodal.data.sources.base import Source, SourceSpecError
from mixmodal.data.sources.coco import CocoCaptionsSource, CocoFormatError
from mixmodal.data.sources.jsonl import JsonlSource
from mixmodal.data.sources.mix import MixSource
from mixmodal.data.sources.shapes_source import SHAPES_SPLITS, ShapesSource
from mixmodal.data.sources.spec import SPEC_FORMS, open_source
from mixmodal.data.sources.wds import IMAGE_EXTENSIONS, WebDatasetSource, expand_shard_urls, write_webdataset

__all__ = [
    "IMAGE_EXTENSIONS", "SHAPES_SPLITS", "SPEC_FORMS",
    "CocoCaptionsSource", "CocoFormatError", "JsonlSource", "MixSource", "ShapesSource", "Source", "SourceSpecError",
    "WebDatasetSource", "expand_shard_urls", "open_source", "write_webdataset",
]
