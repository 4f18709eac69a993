"""`mixmodal data shapes | show | stats`: write, inspect and summarise datasets."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mixmodal.cli.common import (EPILOG_OVERRIDES, add_source_options, field_flags, no_overrides, report_bad_input,
                                 source_from, take)


def register(verbs: argparse._SubParsersAction) -> None:
    data = verbs.add_parser("data", help="write, inspect and summarise datasets", description="Write, inspect and summarise datasets.")
    data_verbs = data.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)

    p = data_verbs.add_parser("shapes", help="write documents from the built-in shapes world",
                              description="Write documents (captions, VQA, edits, stories) from the built-in "
                              "procedural shapes world, as documents JSONL + PNGs or WebDataset shards.",
                              epilog=EPILOG_OVERRIDES + " Fields: see ShapesConfig in docs/shapes.md.")
    p.add_argument("--num", type=int, required=True, help="number of documents")
    p.add_argument("--split", default="train", choices=["train", "heldout", "heldout-combos"],
                   help="train, heldout (unseen scenes) or heldout-combos (unseen shape-colour pairs)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels: 32, 48, 64 or 128 (default 64)")
    p.add_argument("--seed", type=int, default=None, help="seed of the train stream (held-out splits are fixed)")
    p.add_argument("--config", default=None, help="YAML preset for ShapesConfig (e.g. configs/data/shapes-64.yaml)")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "wds"], help="documents JSONL + PNGs, or WebDataset tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per WebDataset shard")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_shapes)

    p = data_verbs.add_parser("show", help="draw a contact sheet of a source's documents",
                              description="Draw a contact sheet: the first N documents of SOURCE, images with their text.")
    add_source_options(p)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--num", type=int, default=24, help="documents to show")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--thumb", type=int, default=96, help="thumbnail size in pixels")
    p.set_defaults(func=cmd_data_show)

    p = data_verbs.add_parser("stats", help="print statistics of a source",
                              description="Count documents, images, layouts, tasks and text length (tokens with --tokenizer).")
    add_source_options(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, to count text tokens")
    p.add_argument("--num", type=int, default=None, help="look at the first N documents only")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_data_stats)


def cmd_data_shapes(args: argparse.Namespace, overrides: list[str]) -> int:
    from tqdm import tqdm

    from mixmodal.config import build_config, save_config, to_dict
    from mixmodal.data.shapes import ShapesConfig, shapes_document
    from mixmodal.data.sources import write_webdataset
    from mixmodal.documents import write_jsonl

    flags = field_flags(args, resolution="resolution", seed="seed")
    config = build_config(ShapesConfig, args.config, flags + overrides)  # defaults <- YAML <- flags <- key=value
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    docs = (shapes_document(config, args.split, i) for i in range(args.num))
    docs = tqdm(docs, total=args.num, desc=f"shapes {args.split}", unit="doc", disable=args.quiet)
    if args.format == "jsonl":
        n = write_jsonl(docs, out / "documents.jsonl")
        written = str(out / "documents.jsonl")
    else:
        shards = write_webdataset(docs, out, shard_size=args.shard_size)
        n, written = args.num, f"{len(shards)} shard(s) in {out}"
    save_config({"shapes": to_dict(config), "split": args.split, "num": args.num, "format": args.format}, out)
    print(f"wrote {n} {args.split} documents ({config.resolution}px) -> {written} in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_data_show(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.data.show import contact_sheet

    no_overrides("data show", overrides)
    source = source_from(args)
    docs = list(take(source, args.num))
    sheet = contact_sheet(docs, columns=args.columns, thumb=args.thumb)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"contact sheet of {len(docs)} documents -> {out}")
    report_bad_input(source)
    return 0


def cmd_data_stats(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.data.stats import dataset_stats, format_stats

    no_overrides("data stats", overrides)
    tokenizer = None
    if args.tokenizer:
        from mixmodal.tokenizers.text import TextTokenizer

        tokenizer = TextTokenizer.load(args.tokenizer)
    source = source_from(args)
    stats = dataset_stats(take(source, args.num), tokenizer)
    stats["bad_input"] = source.log.to_dict()["skipped"]
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"{args.source}:")
        print(format_stats(stats))
        print(source.log.summary())
    return 0
