"""What several verbs share: SOURCE and its options, flags as config overrides, bad-input
summaries, verbs that take no overrides."""

from __future__ import annotations

import argparse

EPILOG_OVERRIDES = "Trailing key=value arguments override fields of the verb's config (e.g. max_objects=2)."


def add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="documents JSONL (file or folder), WebDataset shards "
                   "(*.tar, brace pattern or folder), coco:ANNOTATIONS.json?images=DIR, or shapes[:key=value,...]; "
                   "see docs/data.md")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping and counting it")
    p.add_argument("--max-pixels", type=int, default=None, help="images with more pixels are skipped (decompression-bomb guard)")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --compile: how the verbs that load an engine (generate, chat, serve) run it."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile'd blocks (needs a C++ compiler on a CPU; the first call "
                        "compiles for ~10-40 s, then each step is faster: docs/generation.md)")


def source_from(args: argparse.Namespace):
    """The source that add_source_options described (SOURCE, --strict, --max-pixels)."""
    from mixmodal.data.sources import open_source

    kwargs = {"strict": args.strict}
    if args.max_pixels is not None:
        kwargs["max_pixels"] = args.max_pixels
    return open_source(args.source, **kwargs)


def field_flags(args: argparse.Namespace, **fields: str) -> list[str]:
    """Command-line flags given by the user, as overrides of config fields (field=flag_dest)."""
    return [f"{field}={getattr(args, dest)}" for field, dest in fields.items() if getattr(args, dest) is not None]


def report_bad_input(source) -> None:
    if source.log.num_skipped or source.log.converted:
        print(source.log.summary())


def take(source, limit: int | None):
    for i, doc in enumerate(source):
        if limit is not None and i >= limit:
            return
        yield doc


def no_overrides(verb: str, overrides: list[str]) -> None:
    if overrides:
        raise SystemExit(f"mixmodal {verb}: unexpected arguments {' '.join(overrides)} (this verb takes no config overrides)")


def read_yaml(path: str) -> dict:
    from mixmodal.config import load_yaml

    return load_yaml(path) or {}
