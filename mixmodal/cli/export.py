"""`mixmodal export RUN [--step N] [--out DIR]`: a run's model folder from any of its checkpoints
(mixmodal/train/export.py), sharded ones (trainer.parallel.dp=fsdp) included."""

from __future__ import annotations

import argparse
import sys

from mixmodal.cli.common import no_overrides


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("export", help="write a run's model folder from one of its checkpoints (sharded ones too)",
                         description="Write what training writes at its end (RUN/model for an early-fusion run: "
                         "config.yaml, model.safetensors, both tokenizers, generation.yaml) from a checkpoint of "
                         "the run, in the full or the sharded (trainer.parallel.dp=fsdp) format, on one process "
                         "whatever number of processes wrote it.")
    p.add_argument("run", metavar="RUN", help="run directory of `mixmodal train` (holds checkpoints/step_NNNNNN/)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest intact one)")
    p.add_argument("--out", default=None, help="the folder to write (default RUN/exports/step_NNNNNN)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.train.checkpoint import CheckpointError
    from mixmodal.train.export import export

    no_overrides("export", overrides)
    try:
        out = export(args.run, args.step, args.out, force=args.force)
    except CheckpointError as e:
        print(f"mixmodal export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.run} -> {out}")
    return 0
