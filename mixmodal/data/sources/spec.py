"""`open_source(spec)`: one string names any source, for `mixmodal data show SOURCE`."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from mixmodal.data.images import DEFAULT_MAX_PIXELS
from mixmodal.data.sources.base import Source, SourceSpecError
from mixmodal.data.sources.coco import CocoCaptionsSource, default_coco_image_dir
from mixmodal.data.sources.jsonl import JsonlSource
from mixmodal.data.sources.mix import mix_source_from_spec
from mixmodal.data.sources.shapes_source import shapes_source_from_spec
from mixmodal.data.sources.wds import WebDatasetSource


SPEC_FORMS = """\
  path/to/documents.jsonl | 'data/*.jsonl'  documents JSONL (also jsonl:PATH)
  path/to/folder            a folder with documents.jsonl, or with *.tar shards
  shards/{00000..00009}.tar WebDataset shards: a .tar, a brace pattern, a::b (also wds:URLS)
  coco:ANNOTATIONS.json[?images=DIR][&captions=first|all]
                            COCO captions; images default to ../SPLIT for captions_SPLIT.json
  shapes | shapes:resolution=64,split=heldout,num=100,seed=0
                            the built-in procedural world (split and num, or ShapesConfig fields)
  mix:SPEC@WEIGHT|SPEC@WEIGHT
                            several sources sampled by weight, endless (e.g. SFT balancing)"""


def open_source(
    spec: str,
    *,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rank: int = 0,
    world_size: int = 1,
    **options,
) -> Source:
    """Open the source named by `spec` (forms in SPEC_FORMS); `options` go to its class."""
    common = dict(strict=strict, max_pixels=max_pixels, rank=rank, world_size=world_size, **options)
    if spec.startswith("mix:"):
        try:
            return mix_source_from_spec(spec[len("mix:"):], open_source, common)
        except (SourceSpecError, ValueError) as e:
            raise SourceSpecError(f"cannot open data source {spec!r}: {e}") from None
    if spec == "shapes" or spec.startswith("shapes:"):  # its errors list the allowed keys instead
        return shapes_source_from_spec(spec.partition(":")[2], common)
    try:
        if spec.startswith("coco:"):
            return _open_coco(spec[len("coco:") :], common)
        if spec.startswith("jsonl:"):
            return JsonlSource(spec[len("jsonl:") :], **common)
        if spec.startswith("wds:"):
            return WebDatasetSource(spec[len("wds:") :], **common)
        if _looks_like_shards(spec):
            return WebDatasetSource(spec, **common)
        if spec.endswith((".jsonl", ".jsonl.gz")) or (glob.has_magic(spec) and ".jsonl" in spec):
            return JsonlSource(spec, **common)
        if os.path.isdir(spec):
            if (Path(spec) / "documents.jsonl").is_file():
                return JsonlSource(spec, **common)
            shards = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
            if shards:
                return WebDatasetSource(shards, **common)
            raise SourceSpecError(f"folder {spec} has neither documents.jsonl nor *.tar shards")
        reason = "no such file or folder" if not os.path.exists(spec) else "not a recognised format"
        raise SourceSpecError(f"{spec}: {reason}")
    except (SourceSpecError, FileNotFoundError) as e:
        raise SourceSpecError(f"cannot open data source {spec!r}: {e}\naccepted forms:\n{SPEC_FORMS}") from None


def _looks_like_shards(spec: str) -> bool:
    brace_range = re.search(r"\{[^}]*\.\.[^}]*\}", spec) is not None
    return "::" in spec or brace_range or spec.endswith((".tar", ".tar.gz", ".tgz"))


def _open_coco(rest: str, common: dict) -> CocoCaptionsSource:
    path, _, query = rest.partition("?")
    annotations = Path(path)
    params: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        if not eq or key not in ("images", "captions"):
            raise SourceSpecError(f"coco: unknown option {pair!r}; allowed: images=DIR, captions=first|all")
        params[key] = value
    if not annotations.is_file():
        raise SourceSpecError(f"COCO annotations file {annotations} does not exist")
    image_dir = Path(params["images"]) if "images" in params else default_coco_image_dir(annotations)
    if "captions" in params:
        common = {**common, "captions": params["captions"]}
    return CocoCaptionsSource(annotations, image_dir, **common)
