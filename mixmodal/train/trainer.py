"""The one training loop. Every task (image tokenizers now, the early-fusion model next)
implements `Task`; `Trainer(task, config, run_dir).fit()` does the rest:

    seed -> build models -> optimizers -> data -> (resume from the latest checkpoint)
    for each step: lr from the schedule -> grad_accumulation micro-batches of
        task.train_step (bf16 autocast where fast) -> backward of each optimizer's loss
        into that optimizer's parameters only -> clip -> step (or skip if non-finite)
      every log_every: a metrics.jsonl record; every eval_every: task.evaluate;
      every save_every: an atomic checkpoint
    final eval -> RUN/eval.json -> task.save_artifacts

Models are plain single-device modules; data-parallel wrapping (issue 4) belongs here in
the trainer, around `self.models`, never inside a model. Step numbers: `train_step`
receives the 0-based index of the update being made; records and checkpoints are
labelled with the number of updates completed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from mixmodal.train import checkpoint as ckpt
from mixmodal.train.metrics import MetricsLogger, Progress, jsonable
from mixmodal.train.optim import build_adamw, clip_gradients, lr_multiplier, set_learning_rate


@dataclass
class TrainerConfig:
    steps: int = 1000  # optimizer updates in the whole run
    batch_size: int = 32  # samples per micro-batch
    grad_accumulation: int = 1  # micro-batches per update
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accumulation", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "max_nonfinite_streak", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"trainer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"trainer.betas must be two numbers in [0, 1), got {self.betas}")


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
    """An endless batch iterator whose position can be saved and restored exactly."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...  # JSON-serialisable
    def load_state_dict(self, state: dict) -> None: ...  # called before the first __next__


class Task(Protocol):
    """What a training job supplies. `TaskBase` gives defaults for the optional parts."""

    config: Any  # the run config (a dataclass): hashed and saved into every checkpoint

    def setup(self, device: torch.device) -> None: ...  # first call: where models and batches will live
    def architecture(self) -> dict: ...  # the config values the weights depend on; must match on resume
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

    def setup(self, device: torch.device) -> None:
        pass

    def architecture(self) -> dict:
        return {}

    def generators(self) -> dict[str, torch.Generator]:
        return {}

    def evaluate(self, models, step, run_dir) -> dict[str, Any]:
        return {}

    def save_artifacts(self, models, run_dir) -> None:
        pass


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


def config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(_plain(config), sort_keys=True).encode()).hexdigest()[:16]


def _plain(config: Any) -> Any:
    from mixmodal.config import to_dict

    return jsonable(to_dict(config)) if config is not None else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(old: Any, new: Any) -> list[str]:
    a, b = _flatten(old or {}), _flatten(new or {})
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


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

    # -- set-up and resume --

    def _setup(self) -> None:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(self.run_dir)
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.task.setup(self.device)
        seed_everything(cfg.seed)
        self.models = {name: m.to(self.device).train() for name, m in self.task.build_models().items()}
        self.specs = self.task.optimizers(self.models)
        self.optimizers = {
            name: build_adamw(spec.module, spec.lr if spec.lr is not None else cfg.lr,
                              spec.weight_decay if spec.weight_decay is not None else cfg.weight_decay,
                              tuple(spec.betas or cfg.betas))
            for name, spec in self.specs.items()
        }
        self.params = {name: [p for g in opt.param_groups for p in g["params"]] for name, opt in self.optimizers.items()}
        self.data = self.task.data_iterator()
        self.logger = MetricsLogger(self.run_dir)
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None and not cfg.resume:
            raise TrainingError(f"{self.run_dir} already holds checkpoints (latest: {latest.name}); pass --resume "
                                "(trainer.resume=true) to continue that run, or choose another --out")
        if latest is not None:
            self._resume(ckpt.read_checkpoint(latest))
        elif cfg.resume:
            print(f"no checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")

    def _resume(self, checkpoint: ckpt.Checkpoint) -> None:
        saved, now = checkpoint.state.get("architecture"), jsonable(self.task.architecture())
        if saved != now:
            diff = "\n  ".join(config_differences(saved, now))
            raise ckpt.CheckpointError(
                f"cannot resume from {checkpoint.path}: the model architecture in the config differs from the "
                f"checkpoint's, so its weights would not fit:\n  {diff}\nresume with the run's own config "
                f"({checkpoint.path / 'config.yaml'}) or start a new run with another --out")
        changed = config_differences(checkpoint.state.get("config"), _plain(self.task.config))
        changed = [c for c in changed if not c.startswith("trainer.resume")]
        if changed:
            print(f"resuming {checkpoint.path.name} with a changed config:\n  " + "\n  ".join(changed))
        rng = ckpt.load_checkpoint(checkpoint, self.models, self.optimizers)
        self.data.load_state_dict(checkpoint.state["data"])
        self.step = checkpoint.step
        self.eval_history = checkpoint.state.get("eval_history", [])
        self.nonfinite_steps = checkpoint.state.get("nonfinite_steps", 0)
        self.logger.truncate_after(self.step)
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
        for _ in range(cfg.grad_accumulation):
            batch = to_device(next(self.data), self.device)
            if not finite:
                continue  # draw the batch anyway: step k always sees the same data
            with self._autocast():
                losses = self.task.train_step(self.models, batch, step)
            names = [n for n, spec in self.specs.items() if spec.loss in losses]
            if active is not None and names != active:
                raise TrainingError(f"step {step}: micro-batches returned different objectives ({active} vs {names})")
            active = names
            for key, value in losses.items():
                value = value.detach() if isinstance(value, torch.Tensor) else value
                totals[key] = totals.get(key, 0.0) + float(value) / cfg.grad_accumulation
            objectives = [losses[self.specs[n].loss] for n in names]
            if not all(math.isfinite(float(o.detach())) for o in objectives):
                finite = False
                continue
            for i, (name, objective) in enumerate(zip(names, objectives)):
                # inputs=: each loss fills only its own optimizer's grads (a generator's
                # adversarial loss must not leave gradients in the discriminator).
                (objective.float() / cfg.grad_accumulation).backward(
                    inputs=self.params[name], retain_graph=i < len(objectives) - 1)
        active = active or []
        grad_norms = {name: float(clip_gradients(self.params[name], cfg.grad_clip)) for name in active} if finite else {}
        finite = finite and all(math.isfinite(v) for v in grad_norms.values())
        if finite:
            for name in active:
                self.optimizers[name].step()
        else:
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
        return {"finite": finite, "losses": totals, "lr": lrs, "grad_norm": grad_norms}

    # -- eval, checkpoints --

    def evaluate(self) -> dict[str, Any]:
        """task.evaluate in eval mode, without gradients, leaving every random stream as it was.

        In fp32 even when training uses bf16 autocast: the figures describe the saved
        (fp32) weights, not the training-time arithmetic."""
        generators = self.task.generators()
        saved = ckpt.rng_state(generators)
        for m in self.models.values():
            m.eval()
        try:
            with torch.no_grad():
                metrics = dict(self.task.evaluate(self.models, self.step, self.run_dir))
        finally:
            for m in self.models.values():
                m.train()
            ckpt.set_rng_state(saved, generators)
        self.logger.log(self.step, "eval", metrics=metrics)
        self.eval_history.append(jsonable({"step": self.step, **metrics}))
        return metrics

    def save(self) -> Path:
        from mixmodal.config import to_yaml

        state = {
            "step": self.step,
            "data": self.data.state_dict(),
            "config_hash": config_hash(self.task.config),
            "config": _plain(self.task.config),
            "architecture": jsonable(self.task.architecture()),
            "eval_history": self.eval_history,
            "nonfinite_steps": self.nonfinite_steps,
        }
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self.models, self.optimizers, state, ckpt.rng_state(self.task.generators()),
            to_yaml(self.task.config) if self.task.config is not None else None, self.config.keep_last)

    # -- the run --

    def fit(self) -> dict[str, Any]:
        """Train to config.steps (from the latest checkpoint when resuming); return the final eval."""
        cfg = self.config
        self._setup()
        keys = getattr(self.task, "progress_keys", None)
        progress = Progress(cfg.steps, self.step, cfg.progress, keys)
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
                    self.logger.log(self.step, "train", losses={k: v / counts[k] for k, v in window.items()},
                                    lr=last["lr"], grad_norm=last["grad_norm"],
                                    samples_per_s=window_steps * cfg.batch_size * cfg.grad_accumulation / seconds,
                                    steps_per_s=window_steps / seconds)
                    window, counts, window_steps, window_start = {}, {}, 0, time.perf_counter()
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    final = self.evaluate()
                # No periodic checkpoint inside a non-finite streak: the one before it is the one to resume.
                if (cfg.save_every and self.step % cfg.save_every == 0 and not self._streak) or self.step == cfg.steps:
                    self.save()
        finally:
            progress.close()
        if final is None:
            final = self.evaluate()
        result = {"step": self.step, **final}
        (self.run_dir / "eval.json").write_text(json.dumps(jsonable(result), indent=1) + "\n", encoding="utf-8")
        self.task.save_artifacts(self.models, self.run_dir)
        return result

    def _nonfinite(self, result: dict, progress: Progress) -> None:
        self._streak += 1
        self.nonfinite_steps += 1
        self.logger.log(self.step, "nonfinite", losses=result["losses"], grad_norm=result["grad_norm"],
                        lr=result["lr"], streak=self._streak)
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
    "DataIterator", "OptimizerSpec", "Task", "TaskBase", "Trainer", "TrainerConfig", "TrainingError",
    "cpu_has_fast_bf16", "resolve_precision", "seed_everything", "to_device",
]
