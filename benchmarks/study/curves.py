"""GenEval-form accuracy against training FLOPs, from runs trained with `eval.geneval_prompts > 0`
(the recipes in configs/recipes/ log it at every eval).

    python benchmarks/study/curves.py runs/recipe-tokens runs/recipe-latents --out docs/img/recipe-curves.png

One panel per prompt set (held-out prompts, held-out shape-colour combinations), one line per
run; the dashed lines are issue 16's targets. Prints the table of points too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixmodal.train.metrics import read_metrics

SETS = {"geneval_heldout_overall": ("held-out prompts", 0.80), "geneval_heldout_combos_overall": ("held-out combinations", 0.60)}


def points(run: Path) -> list[dict]:
    return [{"step": r["step"], **r["metrics"]} for r in read_metrics(run, "eval")
            if "train_flops" in r["metrics"] and any(k in r["metrics"] for k in SETS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="*", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(5 * len(SETS), 3.6), sharey=True)
    for run, label in zip(args.runs, labels):
        pts = points(run)
        print(f"{label} ({run})")
        print("  step  train FLOPs  " + "  ".join(SETS))
        for p in pts:
            print(f"  {p['step']:>5} {p['train_flops']:.2e}  " + "  ".join(f"{p.get(k, float('nan')):.3f}" for k in SETS))
        for ax, key in zip(axes, SETS):
            xy = [(p["train_flops"], p[key]) for p in pts if key in p]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=label)
    for ax, (key, (title, target)) in zip(axes, SETS.items()):
        ax.axhline(target, ls="--", c="grey", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_title(f"GenEval-form overall, {title}", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
