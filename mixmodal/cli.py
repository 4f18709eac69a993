"""`mixmodal VERB [SUBVERB] POSITIONAL --options key=value...`

Every verb is a short function below; trailing `key=value` arguments are dotlist
overrides of the verb's typed config (see mixmodal/config.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

EPILOG_OVERRIDES = "Trailing key=value arguments override fields of the verb's config (e.g. max_objects=2)."


# --- data ---------------------------------------------------------------------------------

def cmd_data_shapes(args: argparse.Namespace, overrides: list[str]) -> int:
    from tqdm import tqdm

    from mixmodal.config import build_config, save_config, to_dict
    from mixmodal.data.shapes import ShapesConfig, shapes_document
    from mixmodal.data.sources import write_webdataset
    from mixmodal.documents import write_jsonl

    flags = _flags(args, resolution="resolution", seed="seed")
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


def _open(args: argparse.Namespace):
    from mixmodal.data.sources import open_source

    kwargs = {"strict": args.strict}
    if args.max_pixels is not None:
        kwargs["max_pixels"] = args.max_pixels
    return open_source(args.source, **kwargs)


def _flags(args: argparse.Namespace, **fields: str) -> list[str]:
    """Command-line flags given by the user, as overrides of config fields (field=flag_dest)."""
    return [f"{field}={getattr(args, dest)}" for field, dest in fields.items() if getattr(args, dest) is not None]


def _report_bad_input(source) -> None:
    if source.log.num_skipped or source.log.converted:
        print(source.log.summary())


def _take(source, limit: int | None):
    for i, doc in enumerate(source):
        if limit is not None and i >= limit:
            return
        yield doc


def cmd_data_show(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.data.show import contact_sheet

    _no_overrides("data show", overrides)
    source = _open(args)
    docs = list(_take(source, args.num))
    sheet = contact_sheet(docs, columns=args.columns, thumb=args.thumb)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"contact sheet of {len(docs)} documents -> {out}")
    _report_bad_input(source)
    return 0


def cmd_data_stats(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.data.stats import dataset_stats, format_stats

    _no_overrides("data stats", overrides)
    tokenizer = None
    if args.tokenizer:
        from mixmodal.tokenizers.text import TextTokenizer

        tokenizer = TextTokenizer.load(args.tokenizer)
    source = _open(args)
    stats = dataset_stats(_take(source, args.num), tokenizer)
    stats["bad_input"] = source.log.to_dict()["skipped"]
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"{args.source}:")
        print(format_stats(stats))
        print(source.log.summary())
    return 0


# --- tokenizer ------------------------------------------------------------------------------

def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.config import build_config, save_config, to_dict
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig

    flags = _flags(args, vocab_size="vocab_size", min_frequency="min_frequency", max_texts="max_texts")
    config = build_config(TextTokenizerConfig, args.config, flags + overrides)  # defaults <- YAML <- flags <- key=value
    source = _open(args)
    started = time.perf_counter()
    texts = (p for doc in source for p in doc.texts)
    tokenizer = TextTokenizer.train(texts, config)
    path = tokenizer.save(args.out)
    save_config({"text_tokenizer": to_dict(config), "source": args.source}, args.out)
    print(f"trained byte-level BPE: {tokenizer.vocab_size} ids -> {path} in {time.perf_counter() - started:.1f}s")
    _report_bad_input(source)
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.tokenizers.text import TextTokenizer

    _no_overrides("tokenizer encode", overrides)
    tokenizer = TextTokenizer.load(args.tokenizer)
    ids = tokenizer.encode(args.text)
    print(json.dumps({"ids": ids, "tokens": [tokenizer.id_to_token(i) for i in ids]}, ensure_ascii=False))
    return 0


def _no_overrides(verb: str, overrides: list[str]) -> None:
    if overrides:
        raise SystemExit(f"mixmodal {verb}: unexpected arguments {' '.join(overrides)} (this verb takes no config overrides)")


# --- parser -------------------------------------------------------------------------------

def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="documents JSONL (file or folder), WebDataset shards "
                   "(*.tar, brace pattern or folder), coco:ANNOTATIONS.json?images=DIR, or shapes[:key=value,...]; "
                   "see docs/data.md")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping and counting it")
    p.add_argument("--max-pixels", type=int, default=None, help="images with more pixels are skipped (decompression-bomb guard)")


def build_parser() -> argparse.ArgumentParser:
    from mixmodal import __version__

    parser = argparse.ArgumentParser(
        prog="mixmodal",
        description="Mixed-modal early-fusion models (CM3Leon, Chameleon, Transfusion): data, tokenizers, training, generation.",
        epilog="Run `mixmodal VERB --help` for each verb.",
    )
    parser.add_argument("--version", action="version", version=f"mixmodal {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    data = verbs.add_parser("data", help="write, inspect and summarise datasets", description="Write, inspect and summarise datasets.")
    data_verbs = data.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)

    p = data_verbs.add_parser("shapes", help="write documents from the built-in shapes world",
                              description="Write documents (captions, VQA, edits, stories) from the built-in "
                              "procedural shapes world, as documents JSONL + PNGs or WebDataset shards.",
                              epilog=EPILOG_OVERRIDES + " Fields: see ShapesConfig in docs/shapes.md.")
    p.add_argument("--num", type=int, required=True, help="number of documents")
    p.add_argument("--split", default="train", choices=["train", "heldout", "heldout-combos"],
                   help="train, heldout (unseen scenes) or heldout-combos (unseen shape-colour pairs)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels: 32, 64 or 128 (default 64)")
    p.add_argument("--seed", type=int, default=None, help="seed of the train stream (held-out splits are fixed)")
    p.add_argument("--config", default=None, help="YAML preset for ShapesConfig (e.g. configs/data/shapes-64.yaml)")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "wds"], help="documents JSONL + PNGs, or WebDataset tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per WebDataset shard")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_shapes)

    p = data_verbs.add_parser("show", help="draw a contact sheet of a source's documents",
                              description="Draw a contact sheet: the first N documents of SOURCE, images with their text.")
    _add_source_options(p)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--num", type=int, default=24, help="documents to show")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--thumb", type=int, default=96, help="thumbnail size in pixels")
    p.set_defaults(func=cmd_data_show)

    p = data_verbs.add_parser("stats", help="print statistics of a source",
                              description="Count documents, images, layouts, tasks and text length (tokens with --tokenizer).")
    _add_source_options(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, to count text tokens")
    p.add_argument("--num", type=int, default=None, help="look at the first N documents only")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_data_stats)

    tok = verbs.add_parser("tokenizer", help="train and use the byte-level BPE text tokenizer",
                           description="Train and use the byte-level BPE text tokenizer (Hugging Face tokenizers).")
    tok_verbs = tok.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)
    p = tok_verbs.add_parser("train", help="train byte-level BPE on a source's text",
                             description="Train byte-level BPE on the text of SOURCE; writes tokenizer.json with "
                             "mixmodal's special tokens as its first ids, and the resolved config.",
                             epilog=EPILOG_OVERRIDES + " Fields: vocab_size, min_frequency, max_texts.")
    _add_source_options(p)
    p.add_argument("--vocab-size", type=int, default=None, help="total ids, special tokens included (default 4096)")
    p.add_argument("--min-frequency", type=int, default=None, help="minimum count of a merge (default 2)")
    p.add_argument("--max-texts", type=int, default=None, help="train on at most this many text parts")
    p.add_argument("--config", default=None, help="YAML preset for TextTokenizerConfig (e.g. configs/tokenizer/bpe-4k.yaml)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_tokenizer_train)

    p = tok_verbs.add_parser("encode", help="show the ids and tokens of a text", description="Encode TEXT with a trained tokenizer.")
    p.add_argument("tokenizer", metavar="TOKENIZER_DIR")
    p.add_argument("text", metavar="TEXT")
    p.set_defaults(func=cmd_tokenizer_encode)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mixmodal.config import ConfigError
    from mixmodal.data.bad_input import BadInputError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if "=" in r and not r.startswith("-")]
    unknown = [r for r in rest if r not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    func: Callable[[argparse.Namespace, list[str]], int] = args.func
    try:
        return func(args, overrides)
    except (ConfigError, BadInputError, FileNotFoundError, ValueError) as e:
        print(f"mixmodal {args.verb} {getattr(args, 'subverb', '') or ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
