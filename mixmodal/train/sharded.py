"""Sharded, reshardable checkpoints (torch.distributed.checkpoint, DCP) for trainer.parallel.dp=fsdp,
and how a run continues on another number of processes.

    RUN/checkpoints/step_000123/
        .metadata, __0_0.distcp, __1_0.distcp, ...   DCP: every rank writes its own shards of the weights
                              ("models.NAME.KEY") and optimizer states ("optimizers.NAME.state.KEY.exp_avg", ...),
                              keyed by parameter name (get_state_dict), with the global shape of each tensor
        rng.pt                {"ranks": [one RNG state per rank]}
        trainer_state.json    as in the full format (checkpoint.py), plus "format": "dcp"; "data" is a list,
                              one data-iterator state per rank
        config.yaml
        manifest.json         every other file, all ranks' shards included, written last

A run with trainer.parallel.dp=fsdp writes this format on any number of processes (one process writes
one shard file), so it can grow as well as shrink; every other run keeps the full format. Either
format resumes under either `dp`.

Writing is the full format's, made collective: rank 0 makes the hidden temporary directory and tells
the others its name, every rank writes its shards into it (dcp.save, which also writes .metadata from
rank 0 once all shards are written), then rank 0 writes the trainer files and the manifest and renames
the directory into place; until that rename there is no checkpoint, so a crash of any rank at any
point leaves the earlier ones as they were. The directory must be on a filesystem every rank sees.

Resharding a run written by N processes onto M:
- weights and optimizer states: each rank asks DCP for its own slices of each tensor (set_state_dict),
  whatever the sharding that wrote them; bitwise the saved values.
- the data position is kept in global samples. In the strided layout every reader here uses (the
  item number i of rank r of N is the global item r + N * i: a shapes document, a jsonl record, a
  batch of the tests' toy), the first item some rank had not yet consumed is
  G = min over r of (r + N * next_r); rank r' of M continues at its item ceil((G - r') / M), so the M
  ranks read G, G + 1, ... together: nothing is skipped, and the few items only some ranks had read
  past G (packing makes ranks' positions differ by part of a row) are read once more (reported).
  For tar shards read whole per rank, the layout is not strided and the position is approximate.
  A data iterator can define `resharded_state(states, rank, world_size)` to say it itself; the
  fusion pipeline's FusionBatches is handled here; anything else is refused with one line.
- random streams: rank r < N continues rank r's streams; ranks from N on start fresh ones (seeded as at
  the start of a run, distinct per rank); with M < N the streams of ranks M..N-1 end.

So with the same global batch (batch_size x grad_accumulation x processes kept equal, e.g. 2 ranks of
accumulation 2 -> 1 rank of 4) and no per-rank randomness (dropout, noise), a resharded run continues
the loss curve of the run it came from to fp32 noise: the same batches per update, the same weights and
optimizer states, only the gradient sums added in another order (about 1e-6 relative; the tests allow
1e-5). With dropout or other per-rank draws the new ranks' draws differ, so the curve is the same in
distribution only. Where N = M nothing changes and a resume stays bitwise exact.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mixmodal.data.pipeline import FusionBatches
from mixmodal.train import checkpoint as ckpt
from mixmodal.train import distributed, faults

FORMAT = "dcp"
METADATA = ".metadata"

Optimized = dict[str, tuple[nn.Module, torch.optim.Optimizer]]  # optimizer name -> (the module it trains, it)


def is_sharded(checkpoint: ckpt.Checkpoint | str | os.PathLike) -> bool:
    """Whether a checkpoint (or its directory) is in this format."""
    if not isinstance(checkpoint, ckpt.Checkpoint):
        return (Path(checkpoint) / METADATA).is_file()
    return checkpoint.state.get("format") == FORMAT


def _state(models: dict[str, nn.Module], optimizers: Optimized) -> dict[str, Any]:
    """What DCP saves or loads in place: this rank's view of every model and optimizer (sharded
    DTensors under FSDP2, plain tensors otherwise), keyed by parameter names. On an optimizer that
    has not stepped yet, get_optimizer_state_dict first makes its state with a step of lr 0."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"models": {name: get_model_state_dict(model) for name, model in models.items()},
            "optimizers": {name: get_optimizer_state_dict(module, opt) for name, (module, opt) in optimizers.items()}}


def _no_dist() -> bool:
    return not distributed.is_initialized()


@contextmanager
def _quiet():
    """DCP warns that it assumes a single process whenever there is no process group: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(run_dir: str | os.PathLike, step: int, models: dict[str, nn.Module], optimizers: Optimized,
                    trainer_state: dict[str, Any], rng: dict[str, Any], config_yaml: str | None = None,
                    keep_last: int = 0) -> Path:
    """Write sharded checkpoint `step` (every rank calls it; trainer_state and rng matter on rank 0
    only): the module docstring's order. A failure on any rank is a CheckpointError on every rank."""
    import torch.distributed.checkpoint as dcp

    main = distributed.is_main()
    made: tuple[str | None, str | None] = (None, None)
    if main:
        try:
            made = (str(ckpt.temporary_checkpoint(run_dir, step)), None)
        except ckpt.CheckpointError as e:
            made = (None, str(e))
    tmp, error = distributed.gather_objects(made)[0]  # rank 0's directory (or failure), on every rank
    if error is None:
        try:
            with _quiet():
                dcp.save(_state(models, optimizers), checkpoint_id=tmp, no_dist=_no_dist())
            faults.point("checkpoint:weights")
        except Exception as e:  # DCP gathers every rank's failure (a full disk) and raises it on all
            error = f"cannot write checkpoint step_{step:06d} in {Path(tmp).parent} ({_first_line(e)})"
    path = ckpt.checkpoint_dir(run_dir, step)
    if main and error is None:
        try:
            path = ckpt.finish_checkpoint(run_dir, step, Path(tmp), {**trainer_state, "format": FORMAT}, rng,
                                          config_yaml, keep_last)
        except ckpt.CheckpointError as e:
            error = str(e)
    elif main and tmp is not None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        error = f"{error}: {ckpt.last_words(run_dir)}"
    error = distributed.gather_objects(error if main else None)[0]
    if error is not None:
        raise ckpt.CheckpointError(error)
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def load_checkpoint(checkpoint: ckpt.Checkpoint, models: dict[str, nn.Module], optimizers: Optimized) -> list[dict]:
    """Load this rank's slices of the weights and optimizer states in place (every rank calls it,
    on any number of processes); return the saved ranks' random states (set them last)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(models, optimizers)
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=checkpoint.path, no_dist=_no_dist())
    except Exception as e:  # a key the checkpoint lacks: another task or model
        raise ckpt.CheckpointError(f"{checkpoint.path}: the sharded checkpoint does not fit this run's models and "
                                   f"optimizers ({_first_line(e)}); was it written with another config?") from None
    for name, model in models.items():
        set_model_state_dict(model, state["models"][name])
    for name, (module, opt) in optimizers.items():
        set_optimizer_state_dict(module, opt, state["optimizers"][name])
    return torch.load(checkpoint.path / ckpt.RNG, weights_only=True)["ranks"]


# --- one process: reading weights out (export, tests) -------------------------------------------

def read_model_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every model's full weights in a checkpoint of either format, {"NAME.KEY": tensor} on the CPU
    (the keys of the full format's model.safetensors, tied weights under each of their names)."""
    path = Path(path)
    if not is_sharded(path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        tensors = load_file(str(path / ckpt.WEIGHTS))
        with safe_open(str(path / ckpt.WEIGHTS), framework="pt") as f:
            import json

            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        return {**tensors, **{dropped: tensors[kept] for dropped, kept in aliases.items()}}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("models.") and isinstance(meta, TensorStorageMetadata)}
    with _quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return {key[len("models."):]: value for key, value in state.items()}


def load_weights(path: str | os.PathLike, models: dict[str, nn.Module]) -> None:
    """Load the full weights of a checkpoint of either format into plain models (one process)."""
    if not is_sharded(path):
        ckpt.load_weights(models, Path(path) / ckpt.WEIGHTS)
        return
    tensors = read_model_weights(path)
    for name, model in models.items():
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        if not state:
            raise ckpt.CheckpointError(f"{path} has no weights for model {name!r}; it holds "
                                       f"{sorted({k.split('.')[0] for k in tensors})}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ckpt.CheckpointError(f"{path}: the weights do not fit model {name!r} ({_first_line(e)}); was the "
                                       "checkpoint written with a different model config?") from None


# --- resharding the trainer state ----------------------------------------------------------------

def strided_resume(positions: list[int], rank: int, world_size: int) -> tuple[int, int, int]:
    """In the strided layout (item i of rank r of N = global item r + N * i), given every saved rank's
    next item: (this rank's next item among M = world_size, the global item they continue from, how many
    items some rank had consumed past it, read again)."""
    n = len(positions)
    start = min(r + n * p for r, p in enumerate(positions))
    again = sum(p - math.ceil(max(start - r, 0) / n) for r, p in enumerate(positions))
    return max(math.ceil((start - rank) / world_size), 0), start, again


def _fusion_batches(states: list[dict], rank: int, world_size: int) -> tuple[dict, str]:
    nxt, start, again = strided_resume([int(s["next_document"]) for s in states], rank, world_size)
    return {"next_document": nxt}, f"documents continue from global document {start} ({again} read again)"


def resharded_data(iterator: Any, states: list[dict], rank: int, world_size: int) -> tuple[dict, str]:
    """This rank's data state when a run saved by len(states) processes continues on world_size, and
    what happened in words (for the log)."""
    own: Callable | None = getattr(iterator, "resharded_state", None)
    if own is not None:
        return own(states, rank, world_size), "the data iterator resharded its position"
    if isinstance(iterator, FusionBatches):
        return _fusion_batches(states, rank, world_size)
    raise ckpt.CheckpointError(
        f"the data iterator {type(iterator).__name__} cannot continue a run of {len(states)} processes on "
        f"{world_size}: it has no resharded_state(states, rank, world_size) method; resume on {len(states)} "
        "process(es)")


def resume_state(checkpoint: ckpt.Checkpoint, iterator: Any, rngs: list[dict], rank: int, world_size: int,
                 global_batch: int, say: Callable[[str], None]) -> tuple[dict, dict | None]:
    """(this rank's data state, its random state or None to keep the fresh streams it has) from a
    sharded checkpoint's per-rank lists, saved by any number of processes; `global_batch`: samples per
    update now (batch_size x grad_accumulation x processes)."""
    states = checkpoint.state["data"]
    saved = len(states)
    if saved == world_size:
        return states[rank], rngs[rank]
    data, how = resharded_data(iterator, states, rank, world_size)
    trainer = (checkpoint.state.get("config") or {}).get("trainer") or {}
    before = trainer.get("batch_size", 0) * trainer.get("grad_accumulation", 0) * saved
    added = f"rank {saved} starts" if world_size == saved + 1 else f"ranks {saved}..{world_size - 1} start"
    fresh = f"; {added} fresh random streams" if world_size > saved else ""
    batch = f"; the global batch stays {global_batch} samples"
    if before and before != global_batch:
        batch = (f"; the global batch changes from {before} to {global_batch} samples (batch_size x "
                 "grad_accumulation x processes), so the loss curve will not continue as it was")
    say(f"resuming {checkpoint.path.name}, written by {saved} process(es), on {world_size}: weights and optimizer "
        f"states resharded; {how}{fresh}{batch}")
    return data, rngs[rank] if rank < saved else None


__all__ = ["FORMAT", "is_sharded", "load_checkpoint", "load_weights", "read_model_weights", "resharded_data",
           "resume_state", "save_checkpoint", "strided_resume"]
