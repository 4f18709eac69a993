"""AdamW with weight-decay groups, a stateless warmup + cosine schedule, gradient clipping.

Weight decay pulls weights toward zero; on gains and biases of norms, on biases and on
embedding rows that only shrinks what the model needs to keep (an embedding row of a
rare token would decay between its rare updates), so those parameters go in a group
without it. The schedule is a pure function of the step: nothing to save, and a resumed
run sets exactly the learning rate the straight run set.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

# Module types whose parameters never decay, whatever their shape.
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding, nn.EmbeddingBag,
    nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def split_decay(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): a parameter decays iff it is a matrix or kernel (ndim >= 2) and
    does not belong to an embedding or norm module (by type, or by a class name ending in
    "Norm" so that our own RMSNorm qualifies without importing it here)."""
    decay, no_decay, seen = [], [], set()
    for owner in module.modules():
        by_type = isinstance(owner, NO_DECAY_MODULES) or type(owner).__name__.endswith(("Norm", "Embedding"))
        for param in owner.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # tied weights: count once
                continue
            seen.add(id(param))
            (no_decay if by_type or param.ndim < 2 else decay).append(param)
    return decay, no_decay


def build_adamw(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters in two groups ("decay", "no_decay").

    Each group remembers its peak learning rate as `base_lr`; `set_learning_rate` scales it."""
    decay, no_decay = split_decay(module)
    if not decay and not no_decay:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimise")
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay", "base_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "base_lr": lr},
    ]
    # foreach (not fused): the same kernels on CPU and CUDA keep CPU runs bitwise reproducible.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, foreach=True)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup then cosine decay, as a fraction of the peak rate, for update `step` (0-based).

    Warmup: (step + 1) / warmup_steps, reaching 1 at step warmup_steps - 1; the cosine then
    runs from 1 at step warmup_steps to min_lr_ratio at the last step (total_steps - 1),
    and stays there for any step beyond."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return 1.0 if step < total_steps else min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Set every group's lr to its base_lr * multiplier; return the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", group["lr"]) * multiplier
    return optimizer.param_groups[0]["lr"]


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (<= 0: no clipping) and return the total norm before clipping
    (a 0-dim tensor, possibly inf/nan: the caller decides whether to skip the step).

    Sharded gradients (FSDP2's DTensors, train/parallelize.py) are clipped by the norm over
    all shards, as torchtitan does: every rank must call this then, in the same order."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    max_norm = max_norm if max_norm > 0 else math.inf
    if not _sharded(grads):
        return torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)
    total = torch.nn.utils.get_total_norm([p.grad for p in grads], 2.0, False, True)
    total = total.full_tensor()  # the norm's partial sums reduced over the ranks
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total, foreach=True)
    return total


def _sharded(params: list[nn.Parameter]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return False
    return any(isinstance(p.grad, DTensor) for p in params)
