"""An exponential moving average of the trained weights, for evaluation and the saved model.

    ema <- ema + (1 - d_k) * (weights - ema)    after every update k that was applied,
    d_k = min(decay, (1 + k) / (10 + k))

The warm-up of d_k (as in timm's and diffusers' EMA) lets the average follow the fast early
changes instead of remembering the random initialisation for 1 / (1 - decay) steps. The
average is kept in fp32 beside the model; `swapped_in` puts it into the model for an eval or
for writing RUN/model and restores the trained weights afterwards, so training never sees it.
It is saved in every checkpoint (`ema.safetensors`) so that a resumed run continues it exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

EMA_FILE = "ema.safetensors"


class EMA:
    def __init__(self, models: dict[str, nn.Module], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay must lie in (0, 1) (0 turns the average off), got {decay}")
        self.decay = decay
        self.updates = 0
        self.params = {f"{name}.{key}": p for name, model in models.items()
                       for key, p in model.named_parameters() if p.requires_grad}
        self.shadow = {key: p.detach().float().clone() for key, p in self.params.items()}

    def rate(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        keys = list(self.params)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [self.params[k].detach().float() for k in keys],
                             1.0 - self.rate())
        self.updates += 1

    @contextmanager
    def swapped_in(self):
        """The model holds the average inside the block, its trained weights again after it."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        try:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.shadow[k])
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path),
                  metadata={"updates": str(self.updates), "decay": repr(self.decay)})

    @classmethod
    def from_file(cls, models: dict[str, nn.Module], path: Path) -> "EMA":
        """The average saved at `path` with the decay it was trained with (export, which has no run config's
        trainer.ema_decay to trust: a run may have been resumed with another)."""
        with safe_open(str(path), "pt") as f:
            decay = (f.metadata() or {}).get("decay")
        if decay is None:
            raise ValueError(f"{path} has no 'decay' in its metadata: it was not written by mixmodal's EMA.save")
        average = cls(models, float(decay))
        average.load(path)
        return average

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was written without trainer.ema_decay, so the average cannot "
                "continue exactly; resume with trainer.ema_decay=0 or start a new run with another --out")
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            if keys != set(self.shadow):
                raise ValueError(f"{path} averages other parameters than the model has "
                                 f"({len(keys)} vs {len(self.shadow)} tensors); it belongs to another model")
            for k in keys:
                self.shadow[k].copy_(f.get_tensor(k))
            self.updates = int((f.metadata() or {}).get("updates", 0))


__all__ = ["EMA", "EMA_FILE"]
