"""The one training loop. Every task (image tokenizers now, the early-fusion model next)
implements `Task` (task.py); `Trainer(task, config, run_dir).fit()` does the rest:

    seed -> build models -> optimizers -> data -> (resume from the latest checkpoint)
    for each step: lr from the schedule -> grad_accumulation micro-batches of
        task.train_step (bf16 autocast where fast) -> backward of each optimizer's loss
        into that optimizer's parameters only -> clip -> step (or skip if non-finite)
      every log_every: a metrics.jsonl record; every eval_every: task.evaluate;
      every save_every: an atomic checkpoint
    final eval -> RUN/eval.json -> task.save_artifacts
With trainer.ema_decay > 0 an average of the weights (train/ema.py) follows the updates;
evals and the saved model use it, checkpoints carry it for an exact resume.

Models are plain single-device modules; parallelism is applied from outside, once, in the
set-up (parallelize.py, `trainer.parallel`): activation checkpointing and torch.compile per
transformer block, and under torchrun (see distributed.py) DistributedDataParallel or FSDP2
over the models the optimizers train. Each process reads its own shard of the data and
draws its own random streams; rank 0 alone logs, evaluates and writes files. Step numbers: `train_step`
receives the 0-based index of the update being made; records and checkpoints are
labelled with the number of updates completed.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mixmodal.config import to_yaml
from mixmodal.train import checkpoint as ckpt
from mixmodal.train import distributed, sharded
from mixmodal.train.checkpoint import config_differences, config_hash
from mixmodal.train.checkpoint import plain_config as _plain
from mixmodal.train.ema import EMA, EMA_FILE
from mixmodal.train.metrics import MetricsLogger, Progress, jsonable
from mixmodal.train.optim import build_adamw, clip_gradients, lr_multiplier, set_learning_rate
from mixmodal.train.parallelize import ParallelConfig, parallelize
from mixmodal.train.task import Task


@dataclass
class TrainerConfig:
    steps: int = 1000  # optimizer updates in the whole run
    batch_size: int = 32  # samples per micro-batch
    grad_accumulation: int = 1  # micro-batches per update
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.0  # > 0: evaluate and save an exponential moving average of the weights (train/ema.py)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm per optimizer; 0 = no clipping
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA or a bf16-capable CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 3  # checkpoints kept; 0 keeps all
    max_nonfinite_streak: int = 5  # this many non-finite steps in a row stop the run
    num_workers: int = 0  # data-loading worker processes
    resume: bool = False  # continue from RUN/checkpoints' latest (`--resume`)
    progress: bool = True  # tqdm bar on stderr
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # dp, activation checkpointing, compile

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accumulation", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "max_nonfinite_streak", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in [0, 1) (0: no average), got {self.ema_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"trainer.betas must be two numbers in [0, 1), got {self.betas}")
        if self.parallel.dp == "fsdp" and self.ema_decay:
            raise ValueError("trainer.ema_decay > 0 is not supported with trainer.parallel.dp=fsdp yet (the average "
                             "would be sharded too); set trainer.ema_decay=0 or trainer.parallel.dp=ddp")


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. losses stay non-finite); the message says what to try."""


# --- precision and device -----------------------------------------------------------------

def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where bf16 autocast
    runs about twice as fast as fp32; elsewhere bf16 is emulated and slower."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32)."""
    if precision == "fp32":
        return None
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    if precision == "bf16" or fast:
        return torch.bfloat16
    return None


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- the loop ------------------------------------------------------------------------------

class Trainer:
    def __init__(self, task: Task, config: TrainerConfig, run_dir: str | Path) -> None:
        self.task = task
        self.config = config
        self.run_dir = Path(run_dir)
        self.step = 0  # updates completed
        self.eval_history: list[dict] = []
        self.nonfinite_steps = 0
        self._streak = 0
        self.rank, self.world_size, self.main = 0, 1, True  # set from the process group in _setup

    # -- set-up and resume --

    def _setup(self) -> None:
        cfg = self.config
        device = resolve_device(cfg.device)
        distributed.init_from_env(device.type)  # no-op without torchrun, or when the caller made the group
        self._owns_process_group = distributed.created_from_env()
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", distributed.local_rank())
        self.device = device
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            ckpt.remove_stale_temporaries(self.run_dir)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.task.setup(self.device)
        seed_everything(cfg.seed)  # the same on every rank: equal initial weights
        self.models = {name: m.to(self.device).train() for name, m in self.task.build_models().items()}
        if self.world_size > 1:  # dropout and other global draws must differ per rank
            seed_everything(distributed.rank_seed(cfg.seed))
        self.specs = self.task.optimizers(self.models)
        # AC, compile, DDP / FSDP2 (parallelize.py); before the optimizers: FSDP2 shards the parameters
        self.parallel = parallelize(self.models, self.specs, cfg.parallel, task=self.task, device=self.device,
                                    autocast_dtype=self.autocast_dtype, world_size=self.world_size)
        self.train_models = self.parallel.train_models
        self.optimizers = {
            name: build_adamw(spec.module, spec.lr if spec.lr is not None else cfg.lr,
                              spec.weight_decay if spec.weight_decay is not None else cfg.weight_decay,
                              tuple(spec.betas or cfg.betas))
            for name, spec in self.specs.items()
        }
        self.params = {name: [p for g in opt.param_groups for p in g["params"]] for name, opt in self.optimizers.items()}
        self.ema = EMA(self.models, cfg.ema_decay) if cfg.ema_decay else None
        self.data = self.task.data_iterator()
        self.logger = MetricsLogger(self.run_dir, enabled=self.main)
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None and not cfg.resume:
            raise TrainingError(f"{self.run_dir} already holds checkpoints (latest: {latest.name}); pass --resume "
                                "(trainer.resume=true) to continue that run, or choose another --out")
        if latest is not None:  # never from a torn checkpoint: the newest that passes its manifest
            intact = ckpt.latest_intact_checkpoint(self.run_dir, warn=print if self.main else lambda _: None,
                                                   quarantine=self.main)
            self._resume(ckpt.read_checkpoint(intact))
        else:  # from step 0: what an earlier attempt killed before its first checkpoint logged is redone
            if self.logger.discard() and self.main:
                print(f"{self.logger.path} held the records of an attempt that wrote no checkpoint; starting it afresh")
            if cfg.resume and self.main:
                print(f"no checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")

    def _resume(self, checkpoint: ckpt.Checkpoint) -> None:
        saved, now = checkpoint.state.get("architecture"), jsonable(self.task.architecture())
        if saved is not None:  # an option added since the checkpoint was written: it ran as the default
            saved = ckpt.with_defaults(saved, jsonable(self.task.architecture_defaults()))
        if saved != now:
            diff = "\n  ".join(config_differences(saved, now))
            raise ckpt.CheckpointError(
                f"cannot resume from {checkpoint.path}: the model architecture in the config differs from the "
                f"checkpoint's, so its weights would not fit:\n  {diff}\nresume with the run's own config "
                f"({checkpoint.path / 'config.yaml'}) or start a new run with another --out")
        saved_world_size, dcp = int(checkpoint.state.get("world_size", 1)), sharded.is_sharded(checkpoint)
        if saved_world_size != self.world_size and not dcp:  # (a sharded checkpoint reshards: sharded.py)
            raise ckpt.CheckpointError(
                f"cannot resume from {checkpoint.path} on {self.world_size} process(es): it was written by a run "
                f"of {saved_world_size} in the full format (trainer.parallel.dp=fsdp writes sharded checkpoints, "
                "which can). Resume with "
                f"{'torchrun --nproc_per_node ' + str(saved_world_size) if saved_world_size > 1 else 'one process'}"
                ", or start a new run with another --out")
        changed = config_differences(checkpoint.state.get("config"), _plain(self.task.config))
        changed = [c for c in changed if not c.startswith("trainer.resume")]
        if changed and self.main:
            print(f"resuming {checkpoint.path.name} with a changed config:\n  " + "\n  ".join(changed))
        if dcp:  # every rank reads its own slices; data positions and random streams resharded if need be
            rngs = sharded.load_checkpoint(checkpoint, self.models, self._optimized())
            batch = self.config.batch_size * self.config.grad_accumulation * self.world_size
            data, rng = sharded.resume_state(checkpoint, self.data, rngs, self.rank, self.world_size, batch,
                                             print if self.main else lambda _: None)
        else:
            rng = ckpt.load_checkpoint(checkpoint, *self.parallel.loading_state(self.optimizers))  # fsdp: sharded
            data = checkpoint.state["data"]
            if self.world_size > 1:  # one entry per rank
                data, rng = data[self.rank], rng["ranks"][self.rank]
        if self.ema is not None:
            self.ema.load(checkpoint.path / EMA_FILE)
        self.data.load_state_dict(data)
        self.step = checkpoint.step
        self.eval_history = checkpoint.state.get("eval_history", [])
        self.nonfinite_steps = checkpoint.state.get("nonfinite_steps", 0)
        self.logger.truncate_after(self.step)
        if rng is not None:  # (None: a rank a resharded run adds keeps the fresh streams it was seeded with)
            ckpt.set_rng_state(rng, self.task.generators())  # last: nothing after it draws random numbers

    # -- one update --

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _train_step(self) -> dict[str, Any]:
        cfg, step = self.config, self.step
        multiplier = lr_multiplier(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        lrs = {name: set_learning_rate(opt, multiplier) for name, opt in self.optimizers.items()}
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        active: list[str] | None = None
        finite = True
        several = self.world_size > 1
        for i in range(cfg.grad_accumulation):
            batch = to_device(next(self.data), self.device)
            if not finite and not several:
                continue  # draw the batch anyway: step k always sees the same data
            # With several processes every rank runs every forward and backward, finite or not:
            # DDP's forward and last backward (FSDP2's forward and every backward) talk to the
            # other ranks, which would wait forever for a rank that skipped them. Under DDP all
            # but the last micro-batch keep gradients local.
            with self.parallel.gradient_sync(i == cfg.grad_accumulation - 1):
                with self._autocast():
                    losses = self.task.train_step(self.train_models, batch, step)
                names = [n for n, spec in self.specs.items() if spec.loss in losses]
                if active is not None and names != active:
                    raise TrainingError(f"step {step}: micro-batches returned different objectives ({active} vs {names})")
                active = names
                for key, value in losses.items():
                    value = value.detach() if isinstance(value, torch.Tensor) else value
                    totals[key] = totals.get(key, 0.0) + float(value) / cfg.grad_accumulation
                objectives = [losses[self.specs[n].loss] for n in names]
                finite = finite and all(math.isfinite(float(o.detach())) for o in objectives)
                if not finite and not several:
                    continue
                for j, (name, objective) in enumerate(zip(names, objectives)):
                    # inputs=: each loss fills only its own optimizer's grads (a generator's
                    # adversarial loss must not leave gradients in the discriminator).
                    (objective.float() / cfg.grad_accumulation).backward(
                        inputs=self.parallel.backward_inputs(self.params[name]), retain_graph=j < len(objectives) - 1)
        active = active or []
        # (sharded gradients' norms are collectives: under fsdp every rank computes them, finite or not)
        clip = finite or self.parallel.fsdp
        grad_norms = {name: float(clip_gradients(self.params[name], cfg.grad_clip)) for name in active} if clip else {}
        finite = finite and all(math.isfinite(v) for v in grad_norms.values())
        if several:  # a non-finite loss on any rank skips the update on all: no rank steps alone
            finite = distributed.all_true(finite)
        if finite:
            for name in active:
                self.optimizers[name].step()
            self.parallel.after_update()
            if self.ema is not None:
                self.ema.update()
        else:
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
        return {"finite": finite, "losses": totals, "lr": lrs, "grad_norm": grad_norms}

    # -- eval, checkpoints --

    def evaluate(self) -> dict[str, Any]:
        """task.evaluate in eval mode, without gradients, leaving every random stream as it was.

        In fp32 even when training uses bf16 autocast: the figures describe the saved
        (fp32) weights, not the training-time arithmetic; with the blocks' plain forward (no
        activation checkpointing or compiled graph). Rank 0 only (other ranks get {}): they
        go on and wait for it at their next collective. Call it on every rank: under
        trainer.parallel.dp=fsdp all take part in gathering the weights first."""
        models = self.parallel.full_models()
        if not self.main:
            return {}
        generators = self.task.generators()
        saved = ckpt.rng_state(generators)
        for m in models.values():
            m.eval()
        try:
            with torch.no_grad(), self._averaged(), self.parallel.plain(), self.parallel.on_device(self.device):
                metrics = dict(self.task.evaluate(models, self.step, self.run_dir))
        finally:
            for m in models.values():
                m.train()
            ckpt.set_rng_state(saved, generators)
        self.logger.log(self.step, "eval", metrics=metrics)
        self.eval_history.append(jsonable({"step": self.step, **metrics}))
        return metrics

    def _averaged(self):
        """The weight average in the models (trainer.ema_decay > 0), else nothing changes."""
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    def _optimized(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        return {name: (self.specs[name].module, opt) for name, opt in self.optimizers.items()}

    def save(self) -> Path:
        """Write a checkpoint (called on every rank). With several processes the data positions
        and random streams of all ranks are gathered and rank 0 writes; under trainer.parallel.dp=fsdp
        a sharded checkpoint (sharded.py: every rank writes its own shards, on any number of
        processes). Every rank waits until the checkpoint is complete."""
        dcp = self.config.parallel.dp == "fsdp"
        data, rng = self.data.state_dict(), ckpt.rng_state(self.task.generators())
        if self.world_size > 1 or dcp:  # a list, one entry per rank
            data, rng = distributed.gather_objects(data), {"ranks": distributed.gather_objects(rng)}
        state = {"step": self.step, "world_size": self.world_size, "data": data,
                 "config_hash": config_hash(self.task.config), "config": _plain(self.task.config),
                 "architecture": jsonable(self.task.architecture()), "eval_history": self.eval_history,
                 "nonfinite_steps": self.nonfinite_steps}
        yaml = to_yaml(self.task.config) if self.task.config is not None else None
        path = ckpt.checkpoint_dir(self.run_dir, self.step)
        if dcp:
            path = sharded.save_checkpoint(self.run_dir, self.step, self.models, self._optimized(), state, rng, yaml,
                                           self.config.keep_last)
        elif self.main:
            path = ckpt.save_checkpoint(self.run_dir, self.step, self.models, self.optimizers, state, rng, yaml,
                                        self.config.keep_last,
                                        extra={EMA_FILE: self.ema.save} if self.ema is not None else None)
        distributed.barrier()
        return path

    # -- the run --

    def fit(self) -> dict[str, Any]:
        """Train to config.steps (from the latest checkpoint when resuming); return the final
        eval (on every rank: rank 0's). A process group made by `distributed.init_from_env`
        (here or by the caller) is destroyed at the end, also when training fails."""
        self._owns_process_group = False
        try:
            self._setup()
            return self._fit()
        finally:
            if self._owns_process_group:
                # Free the DDP wrappers (held in reference cycles) while the interpreter is fully
                # alive: gloo's worker threads otherwise outlive the group and may abort the
                # process at exit ("terminate called without an active exception").
                self.train_models = getattr(self, "models", {})
                if hasattr(self, "parallel"):
                    self.parallel.close()
                gc.collect()
                distributed.destroy()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        keys = getattr(self.task, "progress_keys", None)
        progress = Progress(cfg.steps, self.step, cfg.progress and self.main, keys)
        window: dict[str, float] = {}
        counts: dict[str, int] = {}  # a loss may be absent from some steps (a GAN before it starts)
        window_steps, window_start = 0, time.perf_counter()
        final: dict[str, Any] | None = None
        try:
            while self.step < cfg.steps:
                result = self._train_step()
                self.step += 1
                if not result["finite"]:
                    self._nonfinite(result, progress)
                else:
                    self._streak = 0
                    window_steps += 1
                    for k, v in result["losses"].items():
                        window[k] = window.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
                    last = result
                progress.update(result["losses"] if result["finite"] else None)
                final = None
                if window_steps and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    seconds = max(time.perf_counter() - window_start, 1e-9)
                    losses = distributed.all_reduce_mean({k: v / counts[k] for k, v in window.items()})
                    self.logger.log(self.step, "train", losses=losses, lr=last["lr"], grad_norm=last["grad_norm"],
                                    samples_per_s=window_steps * cfg.batch_size * cfg.grad_accumulation
                                    * self.world_size / seconds,
                                    steps_per_s=window_steps / seconds)
                    window, counts, window_steps, window_start = {}, {}, 0, time.perf_counter()
                    self.parallel.check_replicas_agree(self.step)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    final = self.evaluate()
                # No periodic checkpoint inside a non-finite streak: the one before it is the one to resume.
                if (cfg.save_every and self.step % cfg.save_every == 0 and not self._streak) or self.step == cfg.steps:
                    self.save()
        finally:
            progress.close()
        result = None
        if final is None:
            final = self.evaluate()  # every rank: under fsdp all take part in gathering the weights
        models = self.parallel.full_models()  # (gathered once per update)
        if self.main:
            result = {"step": self.step, **final}
            (self.run_dir / "eval.json").write_text(json.dumps(jsonable(result), indent=1) + "\n", encoding="utf-8")
            with self._averaged(), self.parallel.plain(), self.parallel.on_device(self.device):
                self.task.save_artifacts(models, self.run_dir)
        return distributed.gather_objects(result)[0]  # also makes every rank wait for rank 0's files

    def _nonfinite(self, result: dict, progress: Progress) -> None:
        self._streak += 1
        self.nonfinite_steps += 1
        # Every rank gets here together (they agree on finiteness); the record shows the mean over ranks.
        losses = distributed.all_reduce_mean(result["losses"])
        self.logger.log(self.step, "nonfinite", losses=losses, grad_norm=result["grad_norm"],
                        lr=result["lr"], streak=self._streak)
        if self.main:
            progress.write(f"step {self.step}: non-finite loss or gradient norm, update skipped ({self._streak} in a row)")
        limit = self.config.max_nonfinite_streak
        if limit and self._streak >= limit:
            latest = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingError(
                f"{self._streak} consecutive steps (up to step {self.step}) had a non-finite loss or gradient norm; "
                f"stopping. The last good checkpoint is {latest or 'none (no checkpoint was written yet)'}. Try a lower "
                "trainer.lr, a longer trainer.warmup_steps, trainer.grad_clip, or trainer.precision=fp32, then "
                "continue with --resume (or raise trainer.max_nonfinite_streak)")


__all__ = [
    "Trainer", "TrainerConfig", "TrainingError",
    "cpu_has_fast_bf16", "resolve_precision", "seed_everything", "to_device",
]
