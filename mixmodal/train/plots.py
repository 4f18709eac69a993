"""Loss curves from runs' metrics.jsonl: `mixmodal plot RUN [RUN ...] --out curves.png`.

One panel per loss term found in the runs (loss, text_ce, image_ce, diffusion, ...); train
records as thin lines (smoothed by a running mean), eval records as dots. The x axis is the
update step, or training FLOPs / tokens seen when the caller gives per-step figures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mixmodal.train.metrics import read_metrics

PREFERRED = ("loss", "text_ce", "image_ce", "diffusion", "z_loss")


def _series(run: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    train: dict[str, list[tuple[int, float]]] = {}
    evals: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run):
        if record.get("kind") == "train":
            for k, v in record.get("losses", {}).items():
                train.setdefault(k, []).append((record["step"], float(v)))
        elif record.get("kind") == "eval":
            for k, v in record.get("metrics", {}).items():
                if k.startswith("eval_") and isinstance(v, (int, float)):
                    evals.setdefault(k[len("eval_"):], []).append((record["step"], float(v)))
    return train, evals


def plot_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike, *, labels: Sequence[str] | None = None,
              keys: Sequence[str] | None = None, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(Path(r), *_series(Path(r))) for r in runs]
    found = [k for k in PREFERRED if any(k in t for _, t, _ in data)]
    found += sorted({k for _, t, _ in data for k in t} - set(found) - {"ce"})
    keys = [k for k in (keys or found) if any(k in t for _, t, _ in data)]
    if not keys:
        raise ValueError(f"no train losses in {', '.join(str(r) for r in runs)} (metrics.jsonl missing or empty)")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for i, (run, train, evals) in enumerate(data):
        label = labels[i] if labels else run.name
        colour = f"C{i}"
        for ax, key in zip(axes[0], keys):
            if key in train:
                steps, values = zip(*train[key])
                ax.plot(steps, values, color=colour, lw=1, label=f"{label} train")
            if key in evals:
                steps, values = zip(*evals[key])
                ax.plot(steps, values, "o--", color=colour, ms=4, lw=0.8, label=f"{label} eval")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["plot_runs"]
