"""`mixmodal train CONFIG`: read the run config's `task:` key, build that task, fit it.

A task module exposes `CONFIG` (its run-config dataclass, with `task` and `trainer`
fields), `resolve(data, base_dir) -> data` (optional: expand references such as a
model-config path relative to the YAML file), `prepare(config, run_dir, write=True) -> config`
(optional: put what the run needs into its directory and fill derived config fields;
rank 0 runs it first under torchrun, the other ranks after it with write=False) and
`build_task(config) -> Task`; or, for what is computed in closed form with no training loop (the
patch tokenizers), `fit(config, run_dir) -> dict` instead.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from mixmodal.config import ConfigError, build_config, load_yaml, merge, parse_overrides, save_config

TASKS = {
    "image-tokenizer": "mixmodal.train.image_tokenizer",
    "fusion": "mixmodal.train.fusion",
    "dual-encoder": "mixmodal.train.dual_encoder",
    "patch-tokenizer": "mixmodal.train.patch_tokenizer",
}


def task_module(name: Any, where: str) -> ModuleType:
    if name not in TASKS:
        raise ConfigError(f"{where}: task must be one of {', '.join(TASKS)}; got {name!r} "
                          "(set the top-level `task:` key of the config)")
    return importlib.import_module(TASKS[name])


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
    """The resolved run config: dataclass defaults <- YAML <- key=value overrides."""
    data = merge(load_yaml(path), parse_overrides(overrides))  # overrides first: they may name a preset too
    task = data.get("task")
    module = task_module(str(task) if task is not None else None, str(path))
    if hasattr(module, "resolve"):
        data = module.resolve(data, Path(path).parent)
    return build_config(module.CONFIG, data)


def train(config: Any, out: str | os.PathLike) -> dict:
    """Fit `config` (a task's run config) into run directory `out`; return the final eval."""
    # late: both import torch, which this module does not
    from mixmodal.train import distributed
    from mixmodal.train.trainer import Trainer

    module = task_module(config.task, "config")
    if hasattr(module, "fit"):  # computed, not trained: no loop, no checkpoints, one process
        return module.fit(config, out)
    if hasattr(module, "prepare"):
        distributed.init_from_env("cuda" if config.trainer.device != "cpu" and _cuda() else "cpu")
        if distributed.is_main():
            try:
                config = module.prepare(config, out)
            except BaseException:
                distributed.all_true(False)  # tell the other ranks, then fail with the real message
                raise
        if not distributed.all_true(True):
            raise RuntimeError("rank 0 could not prepare the run (its error is above); stopping this rank too")
        if not distributed.is_main():
            config = module.prepare(config, out, write=False)
    task = module.build_task(config)
    if distributed.is_main():
        save_config(config, out)
    return Trainer(task, config.trainer, out).fit()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
