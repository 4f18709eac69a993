"""`mixmodal export RUN [--step N] [--out DIR]`: the artifact a run writes at its end (RUN/model for the
early-fusion task: config.yaml, model.safetensors, both tokenizers, generation.yaml, manifest.json),
written from any of its checkpoints instead, in either format: the full one (model.safetensors) or the
sharded one of trainer.parallel.dp=fsdp (sharded.py), read on one process whatever number wrote it.

The task is rebuilt from the checkpoint's own config.yaml (as rank > 0 of a torchrun sees it: the
tokenizers RUN/ holds), its models loaded with the checkpoint's weights (the weight average when the
checkpoint carries one, as the end of training saves it), and the task's `save_artifacts` writes into
a hidden folder beside DIR that is renamed to DIR when complete. DIR defaults to RUN/exports/step_NNNNNN.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from mixmodal.train import checkpoint as ckpt
from mixmodal.train import sharded
from mixmodal.train.ema import EMA, EMA_FILE
from mixmodal.train.run import load_run_config, task_module
from mixmodal.train.trainer import seed_everything
from mixmodal.weights import write_manifest


def find_checkpoint(run: Path, step: int | None) -> Path:
    """Checkpoint `step` of a run (the newest intact one when None), checked against its manifest."""
    if step is None:
        path = ckpt.latest_intact_checkpoint(run, warn=print, quarantine=False)
        if path is None:
            raise ckpt.CheckpointError(f"{run} has no checkpoint (RUN/checkpoints/step_NNNNNN/); is it a run "
                                       "directory of `mixmodal train`?")
        return path
    path = ckpt.checkpoint_dir(run, step)
    if not path.is_dir():
        steps = [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(run)]
        raise ckpt.CheckpointError(f"{path} does not exist; {run} has checkpoints of steps {steps or 'none'}")
    problems = ckpt.verify_checkpoint(path)
    if problems:
        raise ckpt.CheckpointError(f"{path} is damaged ({'; '.join(problems)}); export another --step")
    return path


def export(run: str | os.PathLike, step: int | None = None, out: str | os.PathLike | None = None,
           force: bool = False) -> Path:
    """Write the run's artifact from checkpoint `step` (default the newest) to `out`; return `out`."""
    run = Path(run)
    path = find_checkpoint(run, step)
    checkpoint = ckpt.read_checkpoint(path)
    out = Path(out) if out is not None else run / "exports" / path.name
    if out.exists() and any(out.iterdir()) and not force:
        raise ckpt.CheckpointError(f"{out} exists and is not empty; pass --force to replace it, or another --out")
    config = load_run_config(path / "config.yaml")
    module = task_module(config.task, str(path / "config.yaml"))
    if hasattr(module, "prepare"):  # point the config at what the run directory holds (the tokenizers)
        config = module.prepare(config, run, write=False)
    task = module.build_task(config)
    task.setup(torch.device("cpu"))
    seed_everything(config.trainer.seed)
    models = {name: model.eval() for name, model in task.build_models().items()}
    sharded.load_weights(path, models)
    average = None
    if (path / EMA_FILE).is_file():  # the end of training saves the average: so does export
        average = EMA.from_file(models, path / EMA_FILE)
    staging = out.with_name(f".export-{out.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with torch.no_grad(), average.swapped_in() if average is not None else nullcontext():
            task.save_artifacts(models, staging)
        made = list(staging.iterdir())
        written = made[0] if len(made) == 1 and made[0].is_dir() else staging  # RUN/model: the folder itself
        if (written / ckpt.MANIFEST).is_file():  # say how this folder is made again
            write_manifest(written, remake=f"export it again: `mixmodal export {run} --step {checkpoint.step} "
                                           f"--out {out}`")
        if out.exists():
            aside = out.with_name(f".old-{out.name}-{os.getpid()}")
            os.replace(out, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(written, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


__all__ = ["export", "find_checkpoint"]
