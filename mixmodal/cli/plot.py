"""`mixmodal plot RUN_DIR...`: loss curves of one or more runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixmodal.cli.common import no_overrides
from mixmodal.train.plots import plot_runs


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("plot", help="loss curves of one or more runs",
                         description="Plot the train (lines) and eval (dots) losses of RUN_DIRs' metrics.jsonl, "
                         "one panel per loss term, runs overlaid.")
    p.add_argument("runs", metavar="RUN_DIR", nargs="+")
    p.add_argument("--out", required=True, help="output image (.png / .svg / .pdf)")
    p.add_argument("--labels", nargs="+", default=None, help="a legend label per run (default: folder names)")
    p.add_argument("--keys", nargs="+", default=None, help="loss terms to show (default: all found)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace, overrides: list[str]) -> int:
    no_overrides("plot", overrides)
    if args.labels and len(args.labels) != len(args.runs):
        raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise ValueError(f"{run}: no metrics.jsonl there (is it a run directory of `mixmodal train`?)")
    out = plot_runs(args.runs, args.out, labels=args.labels, keys=args.keys, title=args.title)
    print(f"wrote {out}")
    return 0
