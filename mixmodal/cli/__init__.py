"""`mixmodal VERB [SUBVERB] POSITIONAL --options key=value...`

One module per verb (data, tokenizer, train, export, generate, chat, serve, plot, image, eval, convert,
index, verify); each holds its handlers `cmd_*(args, overrides) -> int` and a `register(verbs)` that adds
its parser(s) beside them. Trailing `key=value` arguments are dotlist overrides of the verb's
typed config (see mixmodal/config.py). `mixmodal --help` loads the standard library only: handlers
import the modules that bring a third-party package (yaml, numpy, PIL, torch, ...) themselves, and
everything else is imported at the top (tests/test_structure.py checks both).
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module
from typing import Callable, Sequence

from mixmodal import __version__
from mixmodal.data.bad_input import BadInputError

# The verbs, in the order `mixmodal --help` lists them; each is the module mixmodal.cli.NAME.
VERBS = ("data", "tokenizer", "train", "export", "generate", "chat", "serve", "plot", "image", "eval", "convert",
         "index", "verify")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixmodal",
        description="Mixed-modal early-fusion models (CM3Leon, Chameleon, Transfusion): data, tokenizers, training, generation.",
        epilog="Run `mixmodal VERB --help` for each verb.",
    )
    parser.add_argument("--version", action="version", version=f"mixmodal {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERBS:
        import_module(f"{__name__}.{name}").register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mixmodal.config import ConfigError

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
        where = " ".join(w for w in ("mixmodal", args.verb, getattr(args, "subverb", None)) if w)
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2


__all__ = ["VERBS", "build_parser", "main"]
