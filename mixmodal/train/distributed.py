"""torch.distributed for the trainer: one process per device, started by torchrun.

    torchrun --nproc_per_node N -m mixmodal.cli train CONFIG --out RUN

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and the rendezvous address) in each process's
environment; `init_from_env` turns them into a process group (gloo on CPU, nccl on CUDA).
Every function here also works without a process group, as the one process of a world of
one: rank 0, nothing to reduce, barriers that return at once. So single-process code
never branches on whether it runs distributed, and nothing happens at import time.

The collectives (`barrier`, `all_reduce_mean`, `all_true`, `gather_objects`,
`broadcast_module_state`) must be called by every rank, in the same order: a rank that
skips one leaves the others waiting for it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's index in the group (0 without one)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes in the group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK): which GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    """True on the process that logs, evaluates and writes files (rank 0)."""
    return rank() == 0


def launched_rank() -> int:
    """torchrun's RANK for this process, read from the environment (0 when not started by torchrun).
    Unlike rank(), it holds before the process group exists and after it is gone (when a run has
    ended), e.g. for the command line to print its summary once, from rank 0."""
    return int(os.environ.get("RANK", "0"))


_created_from_env = False  # the current group was made by init_from_env (so by this library)

# Ranks' seeds lie this far apart, so that rank r's stream for one purpose (seed + offset)
# never coincides with another rank's stream for another purpose.
RANK_SEED_STRIDE = 1_000_003


def rank_seed(seed: int) -> int:
    """A seed for this rank's own random stream: `seed` itself on rank 0 (and on a single
    process, so single-process runs are unchanged), distinct on every other rank."""
    return seed + RANK_SEED_STRIDE * rank()


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun described in the environment, if it describes one of
    more than one process; True if this call created the group, False when there is
    nothing to join or a group already exists (see `created_from_env` for who destroys it).

    On CUDA each process drives the GPU LOCAL_RANK (set here, before the group exists, as
    nccl requires); on CPU the group uses gloo."""
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} are not set; "
                           "start several processes with torchrun (torchrun --nproc_per_node N ...)")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    global _created_from_env
    _created_from_env = True
    return True


def created_from_env() -> bool:
    """True while a group made by `init_from_env` exists: the job that runs in it (the
    trainer's fit) destroys it when it ends. A group the caller made itself is left alone."""
    return _created_from_env and is_initialized()


def destroy() -> None:
    global _created_from_env
    if is_initialized():
        dist.destroy_process_group()
    _created_from_env = False


def _device() -> torch.device:
    """Where collective tensors must live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value, on every rank. A key some ranks lack (a loss only
    some batches have) is averaged over the ranks that have it; the result holds every
    rank's keys, this rank's first, in its order. Sums run in float64."""
    if world_size() == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(set().union(*gather_objects(sorted(values))))
    if not keys:
        return {}
    packed = torch.zeros(2, len(keys), dtype=torch.float64, device=_device())  # (sum, count) per key
    for i, key in enumerate(keys):
        if key in values:
            packed[0, i], packed[1, i] = float(values[key]), 1.0
    dist.all_reduce(packed)
    means = dict(zip(keys, (packed[0] / packed[1]).tolist()))
    return {**{k: means[k] for k in values}, **{k: means[k] for k in keys if k not in values}}


def all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is true on every rank: how ranks agree on a decision
    (e.g. whether a step's losses are finite) so that none goes on alone."""
    if world_size() == 1:
        return bool(flag)
    packed = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64, device=_device())
    dist.all_reduce(packed)
    return bool(packed.item() == 0.0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), indexed by rank, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's `module`, in place."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


__all__ = [
    "all_reduce_mean", "all_true", "barrier", "broadcast_module_state", "created_from_env", "destroy", "gather_objects",
    "init_from_env", "is_initialized", "is_main", "launched_rank", "local_rank", "rank", "rank_seed", "world_size",
]
