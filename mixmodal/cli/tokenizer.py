"""`mixmodal tokenizer train | encode`: the byte-level BPE text tokenizer."""

from __future__ import annotations

import argparse
import json
import time

from mixmodal.cli.common import (EPILOG_OVERRIDES, add_source_options, field_flags, no_overrides, report_bad_input,
                                 source_from)


def register(verbs: argparse._SubParsersAction) -> None:
    tok = verbs.add_parser("tokenizer", help="train and use the byte-level BPE text tokenizer",
                           description="Train and use the byte-level BPE text tokenizer (Hugging Face tokenizers).")
    tok_verbs = tok.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)
    p = tok_verbs.add_parser("train", help="train byte-level BPE on a source's text",
                             description="Train byte-level BPE on the text of SOURCE; writes tokenizer.json with "
                             "mixmodal's special tokens as its first ids, and the resolved config.",
                             epilog=EPILOG_OVERRIDES + " Fields: vocab_size, min_frequency, max_texts.")
    add_source_options(p)
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


def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.config import build_config, save_config, to_dict
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig

    flags = field_flags(args, vocab_size="vocab_size", min_frequency="min_frequency", max_texts="max_texts")
    config = build_config(TextTokenizerConfig, args.config, flags + overrides)  # defaults <- YAML <- flags <- key=value
    source = source_from(args)
    started = time.perf_counter()
    texts = (p for doc in source for p in doc.texts)
    tokenizer = TextTokenizer.train(texts, config)
    path = tokenizer.save(args.out)
    save_config({"text_tokenizer": to_dict(config), "source": args.source}, args.out)
    print(f"trained byte-level BPE: {tokenizer.vocab_size} ids -> {path} in {time.perf_counter() - started:.1f}s")
    report_bad_input(source)
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.tokenizers.text import TextTokenizer

    no_overrides("tokenizer encode", overrides)
    tokenizer = TextTokenizer.load(args.tokenizer)
    ids = tokenizer.encode(args.text)
    print(json.dumps({"ids": ids, "tokens": [tokenizer.id_to_token(i) for i in ids]}, ensure_ascii=False))
    return 0
