"""`mixmodal train CONFIG`: the task the run config's `task:` key names (docs/training.md)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("train", help="train a model from a run config (image tokenizers, early-fusion models)",
                         description="Train the task named by the config's top-level `task:` key (image-tokenizer, "
                         "fusion). "
                         "The resolved config goes to RUN_DIR/config.yaml; metrics to RUN_DIR/metrics.jsonl; "
                         "checkpoints to RUN_DIR/checkpoints/step_NNNNNN/; the final eval to RUN_DIR/eval.json; "
                         "the task's artifacts (e.g. RUN_DIR/tokenizer/) at the end.",
                         epilog="Trailing key=value arguments override fields of the run config, by dotted path "
                         "(e.g. trainer.steps=200 tokenizer.vq.codebook_size=1024 loss.gan.weight=0.1). "
                         "Presets: configs/tokenizers/{vq,vae}-{tiny,shapes-64}.yaml, "
                         "configs/models/{tiny,small,base}-{tokens,latents}.yaml.")
    p.add_argument("config", metavar="CONFIG", help="run config YAML with a top-level `task:` key")
    p.add_argument("--out", default=None, help="run directory (default runs/CONFIG_NAME)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run directory (same as trainer.resume=true)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.train.checkpoint import CheckpointError
    from mixmodal.train.distributed import launched_rank
    from mixmodal.train.run import load_run_config, train
    from mixmodal.train.trainer import TrainingError

    flags = ["trainer.resume=true"] if args.resume else []
    config = load_run_config(args.config, overrides + flags)  # defaults <- YAML <- key=value <- flags
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    started = time.perf_counter()
    try:
        result = train(config, out)
    except (TrainingError, CheckpointError) as e:
        print(f"mixmodal train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the run folder became unwritable (full, read-only) outside a checkpoint write
        from mixmodal.train.checkpoint import latest_checkpoint

        latest = latest_checkpoint(out)
        print(f"mixmodal train: error: cannot write to {e.filename or out} ({e.strerror or e}); "
              f"{'the last checkpoint, ' + str(latest) + ', is intact' if latest else 'no checkpoint was written yet'}"
              "; free space on that disk or make it writable, then continue with --resume", file=sys.stderr)
        return 1
    if launched_rank() != 0:  # under torchrun: one summary, from rank 0
        return 0
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    done = ("computed " + config.task if "fit_seconds" in result  # a closed-form fit: no steps
            else f"trained {config.task} for {result['step']} steps")
    print(f"{done} in {time.perf_counter() - started:.0f}s -> {out}\nfinal eval: {shown}")
    return 0
