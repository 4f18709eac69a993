"""What a training job supplies to the trainer (trainer.py): the `Task` protocol, `TaskBase`
with defaults for its optional parts, `OptimizerSpec` (one optimizer of a task) and the
resumable `DataIterator` a task's `data_iterator()` returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class OptimizerSpec:
    """One optimizer of a task: AdamW over `module`, stepping on `losses[loss]`.

    A step whose losses lack `loss` leaves this optimizer alone (e.g. a GAN discriminator
    before it starts). None in lr/betas/weight_decay means the trainer config's value."""

    module: nn.Module
    loss: str = "loss"
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None


class DataIterator(Protocol):
    """An endless batch iterator whose position can be saved and restored exactly.

    Under torchrun every process builds its own (after the process group is up) and must
    yield its own rank's shard: the task reads `distributed.rank()` / `world_size()` in
    `data_iterator()` (ImageBatches and the Sources do it themselves). Each rank's state is
    saved, and restored into the same rank. A run resumed on another number of processes (from a
    sharded checkpoint, sharded.py) calls `resharded_state(states, rank, world_size)` instead, if the
    iterator has it: this rank's state from every saved rank's."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...  # JSON-serialisable
    def load_state_dict(self, state: dict) -> None: ...  # called before the first __next__


class Task(Protocol):
    """What a training job supplies. `TaskBase` gives defaults for the optional parts.

    Under torchrun, `setup` runs after the process group exists, and the trainer seeds
    every rank alike before `build_models` (equal initial weights), then reseeds the
    global streams per rank. A task's own generators must differ per rank too: seed them
    with `distributed.rank_seed(seed + offset)` (seed + offset on a single process), or
    every rank draws the same noise. `train_step` receives the models as parallelize.py
    made them and must call them (`models[name](...)`): under DDP (trainer.parallel.dp=ddp)
    a wrapper whose forward averages gradients over ranks, with the model as `.module`;
    under FSDP2 (fsdp) the model itself, its parameters sharded in place (no `.module`; its
    forward gathers them). evaluate and save_artifacts get plain models with their full
    weights (under fsdp, rank 0's unsharded copies); under fsdp checkpoints are sharded."""

    config: Any  # the run config (a dataclass): hashed and saved into every checkpoint

    def setup(self, device: torch.device) -> None: ...  # first call: where models and batches will live
    def architecture(self) -> dict: ...  # the config values the weights depend on; must match on resume
    def architecture_defaults(self) -> dict: ...  # what a key a checkpoint's architecture lacks meant (added later)
    def build_models(self) -> dict[str, nn.Module]: ...  # called after seeding: init is reproducible
    def optimizers(self, models: dict[str, nn.Module]) -> dict[str, OptimizerSpec]: ...
    def data_iterator(self) -> DataIterator: ...
    def generators(self) -> dict[str, torch.Generator]: ...  # explicit random streams, saved in checkpoints
    def train_step(self, models: dict[str, nn.Module], batch: Any, step: int) -> dict[str, Any]: ...
    def evaluate(self, models: dict[str, nn.Module], step: int, run_dir: Path) -> dict[str, Any]: ...
    def save_artifacts(self, models: dict[str, nn.Module], run_dir: Path) -> None: ...


class TaskBase:
    """Defaults for a Task's optional methods."""

    config: Any = None
    progress_keys: tuple[str, ...] | None = None  # losses shown on the progress bar (None: the first few)
    # Data parallelism (torchrun): a reason this task cannot run on several processes, or None.
    ddp_unsupported: str | None = None
    # Some trainable parameter may get no gradient in a step: DDP's find_unused_parameters (and
    # under FSDP2, zero gradients reduce-scattered for the unused parameters).
    ddp_find_unused_parameters: bool = False

    def locally_updated_modules(self, models: dict[str, nn.Module]) -> list[nn.Module]:
        """Submodules whose forward pass edits their own weights or buffers from the local
        batch, outside autograd (a VQ codebook's EMA and dead-code restarts). Under data
        parallelism the ranks would drift apart; after every update the trainer copies rank
        0's state of these modules to every rank (DDP; trainer.parallel.dp=fsdp refuses them)."""
        return []

    def setup(self, device: torch.device) -> None:
        pass

    def architecture(self) -> dict:
        return {}

    def architecture_defaults(self) -> dict:
        """The architecture's values when no option is set: a checkpoint written before an option existed lacks
        its key, and behaved as its default (on resume, a key it lacks is read as this)."""
        return {}

    def generators(self) -> dict[str, torch.Generator]:
        return {}

    def evaluate(self, models, step, run_dir) -> dict[str, Any]:
        return {}

    def save_artifacts(self, models, run_dir) -> None:
        pass


__all__ = ["DataIterator", "OptimizerSpec", "Task", "TaskBase"]
