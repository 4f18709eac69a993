"""Training checkpoints: one directory per step, written whole or not at all.

    RUN/checkpoints/step_000123/
        model.safetensors     weights of every model, keys prefixed by model name ("tokenizer.encoder.w")
        optimizer.pt          {optimizer name: state_dict}; loaded with torch.load(weights_only=True)
        rng.pt                torch CPU (+ CUDA) state, numpy and python `random` state, the task's generators
        trainer_state.json    step, world_size, data-iterator state, config hash, architecture, metrics so far
        config.yaml           the resolved run config

A run of several processes (torchrun) keeps one data-iterator state and one RNG state per
rank: trainer_state.json's "data" is a list indexed by rank, rng.pt is {"ranks": [...]}.
A run with trainer.parallel.dp=fsdp writes the sharded format instead (sharded.py: every rank's
shards of the weights and optimizer states in place of model.safetensors and optimizer.pt), with
the same trainer files, manifest and rename (`temporary_checkpoint`, `finish_checkpoint`).

        manifest.json         every other file's size and SHA-256, written last

The directory is built under a hidden temporary name and renamed into place, so a crash
leaves either the complete checkpoint or none; `latest_checkpoint` only ever considers
`step_NNNNNN` names. A checkpoint damaged later (a disk error, a copy cut short, a file
replaced) fails its manifest: `latest_intact_checkpoint` skips it for the newest one that
passes and says so, and resume never starts from a torn checkpoint. Nothing here unpickles arbitrary objects: weights go through
safetensors, the rest through weights_only loading or JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mixmodal import weights
from mixmodal.config import to_dict
from mixmodal.train import faults
from mixmodal.train.metrics import jsonable

CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"
MANIFEST = weights.MANIFEST


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and foreign names ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# --- weights ----------------------------------------------------------------------------

def models_state(models: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Prefixed state of several models, and aliases for tensors shared between keys
    (tied weights): safetensors refuses to store one tensor twice, so later keys of a
    shared tensor are dropped and recorded as {dropped key: kept key}."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, model in models.items():
        for key, value in model.state_dict().items():
            full = f"{name}.{key}"
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
            if value.numel() and ident in seen:
                aliases[full] = seen[ident]
                continue
            seen[ident] = full
            tensors[full] = value.detach().contiguous().cpu()
    return tensors, aliases


def save_weights(models: dict[str, nn.Module], path: Path) -> None:
    tensors, aliases = models_state(models)
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases), "models": json.dumps(list(models))})


def load_weights(models: dict[str, nn.Module], path: Path) -> None:
    """Load prefixed weights into `models`; a missing model or a key/shape mismatch fails
    naming the checkpoint file (the usual cause: a different architecture in the config)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    tensors = load_file(str(path))
    for dropped, kept in aliases.items():
        tensors[dropped] = tensors[kept]
    for name, model in models.items():
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"{path} has no weights for model {name!r}; it holds "
                                  f"{sorted({k.split('.')[0] for k in tensors})}")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: the weights do not fit model {name!r} ({e}); "
                                  "was the checkpoint written with a different model config?") from None


# --- random state -----------------------------------------------------------------------

def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random stream a run draws from, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _to_lists(random.getstate()),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"the checkpoint has no state for the task's random generator {name!r}")
        generator.set_state(state["generators"][name])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


# --- configs ------------------------------------------------------------------------

def config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(plain_config(config), sort_keys=True).encode()).hexdigest()[:16]


def plain_config(config: Any) -> Any:
    """A run config (a dataclass) as JSON-able data: trainer_state.json's "config"."""
    return jsonable(to_dict(config)) if config is not None else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def with_defaults(saved: Any, defaults: Any) -> Any:
    """`saved` (a plain config) with every key it lacks taken from `defaults`, nested dicts merged: a checkpoint
    written before an option existed behaved as that option's default."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    out = dict(saved)
    for k, v in defaults.items():
        out[k] = with_defaults(saved[k], v) if k in saved else v
    return out


def config_differences(old: Any, new: Any) -> list[str]:
    """"key: old -> new" for every dotted key whose value differs between two plain configs."""
    a, b = _flatten(old or {}), _flatten(new or {})
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


# --- whole checkpoints ------------------------------------------------------------------

@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # trainer_state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    trainer_state: dict[str, Any],
    rng: dict[str, Any],
    config_yaml: str | None = None,
    keep_last: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically (temporary directory, then rename) and prune
    all but the newest `keep_last` (0 keeps all). `extra` maps a file name to a function
    that writes it (given its path), e.g. the weight average."""
    tmp = temporary_checkpoint(run_dir, step)
    try:
        save_weights(models, tmp / WEIGHTS)
        faults.point("checkpoint:weights")
        torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / OPTIMIZER)
        faults.point("checkpoint:optimizer")
    except OSError as e:
        raise _write_failed(run_dir, step, tmp, e) from None
    return finish_checkpoint(run_dir, step, tmp, trainer_state, rng, config_yaml, keep_last, extra)


def temporary_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """A new, empty hidden directory beside where checkpoint `step` goes, to write it into."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise _write_failed(run_dir, step, tmp, e) from None
    return tmp


def finish_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tmp: Path,
    trainer_state: dict[str, Any],
    rng: dict[str, Any],
    config_yaml: str | None = None,
    keep_last: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Complete a checkpoint whose weights are in `tmp`: the random state, trainer_state.json,
    config.yaml and `extra`, then the manifest of every file, then the rename into place
    (the checkpoint exists from that moment on), then pruning."""
    final = checkpoint_dir(run_dir, step)
    try:
        torch.save(rng, tmp / RNG)
        (tmp / STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=1, allow_nan=False),
                                 encoding="utf-8")
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        for name, write in (extra or {}).items():
            write(tmp / name)
        write_manifest(tmp)
        faults.point("checkpoint:manifest")
        weights.sync_to_disk(tmp, tmp.iterdir())
        _rename_into_place(tmp, final)
        faults.point("checkpoint:renamed")
    except OSError as e:  # a full disk, a read-only or vanished folder: the earlier checkpoints stay as they were
        raise _write_failed(run_dir, step, tmp, e) from None
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_failed(run_dir: str | os.PathLike, step: int, tmp: Path, e: OSError) -> CheckpointError:
    shutil.rmtree(tmp, ignore_errors=True)
    final = checkpoint_dir(run_dir, step)
    return CheckpointError(f"cannot write checkpoint {final.name} in {final.parent} ({e.strerror or e}): "
                           f"{last_words(run_dir)}")


def last_words(run_dir: str | os.PathLike) -> str:
    """What a failed checkpoint write leaves, and what to do: the end of its error message."""
    latest = latest_checkpoint(run_dir)
    where = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint was written yet"
    return (f"{where}; free space on that disk or make it writable (or copy the run elsewhere), then continue "
            "with --resume")


def _rename_into_place(tmp: Path, final: Path) -> None:
    # A checkpoint of the same step can exist (a run resumed from an earlier one reached it
    # again): move it aside first, since a rename cannot replace a non-empty directory.
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    weights.sync_to_disk(final.parent, [])


def write_manifest(folder: Path) -> None:
    """folder/manifest.json: {file: {size, sha256}} of every file in `folder`, written last (weights.py's,
    the one every folder mixmodal writes ends with)."""
    weights.write_manifest(folder)


def artifact_remake(run_dir: str | os.PathLike) -> str:
    """What an artifact's manifest says to do when the folder is damaged (RUN/model, RUN/tokenizer, RUN/encoder)."""
    return (f"write it again from the run's last checkpoint: `mixmodal train CONFIG --out {run_dir} --resume` (a "
            "finished run only redoes its final eval and artifacts)")


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with a checkpoint directory against its manifest ([] when intact), every file hashed.
    A checkpoint written before manifests existed is checked for its files only."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return [f"{name} is missing" for name in (WEIGHTS, OPTIMIZER, RNG, STATE) if not (path / name).is_file()]
    try:
        return [f"{name} {what}" for name, what in weights.manifest_problems(path)]
    except weights.ManifestError:
        return [f"{MANIFEST} is not readable JSON with a files table"]


def latest_intact_checkpoint(run_dir: str | os.PathLike, warn=print, quarantine: bool = True) -> Path | None:
    """The newest checkpoint that passes verify_checkpoint. Each newer damaged one is reported
    through `warn` and (`quarantine`) renamed `damaged-step_NNNNNN`, out of the run's checkpoints, so
    pruning and later resumes never take it for the newest. CheckpointError when checkpoints
    exist and none is intact."""
    found = list_checkpoints(run_dir)
    for path in reversed(found):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        moved = ""
        if quarantine:
            aside = path.with_name(f"damaged-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            moved = f", moved to {aside}"
        warn(f"checkpoint {path} is damaged ({'; '.join(problems)}){moved}; falling back to an earlier one")
    if found:
        raise CheckpointError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'} (checked {len(found)}, newest "
                              f"{found[-1].name}); start the run again with another --out (the damaged ones are kept "
                              "as damaged-step_*)")
    return None


def remove_stale_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete leftovers of writes that crashed before their rename."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    state_file = path / STATE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {STATE} is missing")
    return Checkpoint(path, json.loads(state_file.read_text(encoding="utf-8")))


def load_checkpoint(
    checkpoint: Checkpoint,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any]:
    """Load weights and optimizer states in place; return the RNG state (set it last,
    after everything that might draw random numbers has been built)."""
    load_weights(models, checkpoint.path / WEIGHTS)
    states = torch.load(checkpoint.path / OPTIMIZER, weights_only=True)
    for name, opt in optimizers.items():
        if name not in states:
            raise CheckpointError(f"{checkpoint.path / OPTIMIZER} has no state for optimizer {name!r} "
                                  f"(it holds {sorted(states)})")
        opt.load_state_dict(states[name])
    return torch.load(checkpoint.path / RNG, weights_only=True)
