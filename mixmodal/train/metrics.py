"""`RUN/metrics.jsonl` (one JSON object per record) and the progress bar.

A record is {"step", "time" (unix seconds), "elapsed" (seconds since fit() started),
"kind": "train" | "eval" | "nonfinite", ...}; train records add "losses" (the named
breakdown, averaged over the steps since the last record), "lr" and "grad_norm" (per
optimizer), "samples_per_s" and "steps_per_s". Non-finite numbers are written as the
strings "nan", "inf", "-inf" so every line stays strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

from mixmodal.train import faults

METRICS_FILE = "metrics.jsonl"


def jsonable(value: Any) -> Any:
    """Tensors and numpy scalars -> floats; non-finite floats -> "nan" / "inf" / "-inf"."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def read_metrics(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # a line torn by a crash while it was written: the step is redone on resume
                break
            raise ValueError(f"{path}:{number} is not a JSON record; the file was edited or damaged "
                             "(delete that line to go on)") from None
    return [r for r in records if kind is None or r.get("kind") == kind]


class MetricsLogger:
    """Appends records to RUN/metrics.jsonl, flushing each line (a crash loses nothing logged).

    `enabled=False` (ranks other than 0 of a distributed run) builds records but writes nothing."""

    def __init__(self, run_dir: str | os.PathLike, started: float | None = None, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.time() if started is None else started

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step`: a resumed run redoes them and logs them again."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def discard(self) -> bool:
        """Remove the file (a run starting from step 0 redoes everything in it); True if there was one."""
        if not self.enabled or not self.path.is_file():
            return False
        self.path.unlink()
        return True

    def log(self, step: int, kind: str, **fields: Any) -> dict:
        now = time.time()
        record = {"step": step, "time": round(now, 3), "elapsed": round(now - self.started, 3), "kind": kind,
                  **jsonable(fields)}
        if not self.enabled:
            return record
        line = json.dumps(record, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if os.environ.get("MIXMODAL_KILL_AT", "").startswith("metrics:line"):  # the soak: die mid-line
                f.write(line[: len(line) // 2])
                f.flush()
                faults.point("metrics:line")
                f.write(line[len(line) // 2:])
            else:
                f.write(line)
        return record


class Progress:
    """A tqdm bar over steps whose postfix shows the main losses; silent when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, keys: Iterable[str] | None = None) -> None:
        from tqdm import tqdm

        self.keys = list(keys) if keys else None
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def update(self, losses: dict[str, float] | None = None) -> None:
        self.bar.update(1)
        if losses:
            shown = {k: v for k, v in losses.items() if self.keys is None or k in self.keys}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in list(shown.items())[:4]}, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
