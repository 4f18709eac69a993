"""Recipe ablations: one base config, several arms that each change a few keys, the same budget,
one table. Every arm logs GenEval-form accuracy at its evals (the recipes set eval.geneval_*).

    python benchmarks/study/ablate.py configs/recipes/tokens-64.yaml --out runs/ablate-tokens --steps 600 \\
        --arm base --arm "lr3e-3: trainer.lr=3e-3" --arm "no-vqa: data.source=shapes:split=train,max_objects=4,tasks=caption,partial_captions=0.5" \\
        --jobs 2

An arm is `NAME` (the base as it is) or `NAME: key=value key=value ...` (config overrides, as
`mixmodal train` takes them). Each arm trains into OUT/NAME with `trainer.steps=--steps`; an arm
whose run finished is skipped, one that stopped resumes (`--resume`). `--jobs N` trains N arms at
once, one thread each (OMP_NUM_THREADS=1: two jobs on two cores do not oversubscribe them).
`--seeds K` repeats every arm with trainer.seed = 0..K-1 (OUT/NAME-sK), so the table can show
the spread that a difference must exceed. Writes OUT/ablation.md and OUT/ablation.json: per arm
its last eval (GenEval-form overall on each prompt set, the image loss), wall time and training
FLOPs; the base is one of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from mixmodal.train.metrics import read_metrics  # noqa: E402

COLUMNS = ("geneval_heldout_overall", "geneval_heldout_combos_overall", "geneval_heldout_single_object",
           "eval_image_ce", "eval_diffusion", "eval_text_ce")


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or "/" in name or name.startswith("."):
        raise SystemExit(f"--arm {text!r}: give NAME or 'NAME: key=value ...' with a plain NAME")
    overrides = shlex.split(rest)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--arm {text!r}: {bad} are not key=value overrides")
    return name, overrides


def arm_dir(out: Path, name: str, seed: int, seeds: int) -> Path:
    return out / (name if seeds == 1 else f"{name}-s{seed}")


def finished(run: Path) -> bool:
    return (run / "eval.json").is_file() and (run / "model").is_dir()


def train_arm(base: str, run: Path, steps: int, overrides: list[str], threads: int) -> float:
    """Train (or resume, or skip) one arm; returns the wall seconds this call spent."""
    if finished(run):
        return 0.0
    cmd = [sys.executable, "-m", "mixmodal", "train", base, "--out", str(run), f"trainer.steps={steps}",
           "trainer.progress=false", *overrides]
    if (run / "checkpoints").is_dir():
        cmd.append("--resume")
    run.mkdir(parents=True, exist_ok=True)
    print("$", shlex.join(cmd), flush=True)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(run / "ablate.log", "a", encoding="utf-8") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"arm {run.name} failed (exit {code}); its log: {run / 'ablate.log'}")
    timing = run / "ablate-time.json"
    spent = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    timing.write_text(json.dumps({"seconds": spent + seconds, "threads": threads}) + "\n")
    return seconds


def last_eval(run: Path) -> dict:
    evals = read_metrics(run, "eval")
    if not evals:
        return {}
    record = evals[-1]
    return {"step": record["step"], **{k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))}}


def table(out: Path, arms: list[tuple[str, list[str]]], seeds: int) -> dict:
    rows = []
    for name, overrides in arms:
        for seed in range(seeds):
            run = arm_dir(out, name, seed, seeds)
            timing = run / "ablate-time.json"
            rows.append({"arm": name, "seed": seed, "run": str(run), "overrides": overrides, **last_eval(run),
                         "seconds": json.loads(timing.read_text())["seconds"] if timing.is_file() else None})
    return {"rows": rows}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def write_report(out: Path, base: str, steps: int, result: dict, command: str) -> Path:
    by_arm: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_arm.setdefault(row["arm"], []).append(row)
    present = [c for c in COLUMNS if any(c in r for r in result["rows"])]
    lines = [f"# Ablation of `{base}` at {steps} steps", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"{time.strftime('%Y-%m-%d')}. Command: `{command}`", "",
             "Each cell is the arm's last eval (mean over seeds; ± half the range when there are several).", "",
             "| arm | overrides | seeds | " + " | ".join(present) + " | train FLOPs | wall s |",
             "|---|---|---|" + "---|" * len(present) + "---|---|"]
    for name, rows in by_arm.items():
        cells = []
        for c in present:
            values = [r[c] for r in rows if c in r]
            if not values:
                cells.append("n/a")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{_mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}")
        flops = [r["train_flops"] for r in rows if "train_flops" in r]
        secs = [r["seconds"] for r in rows if r.get("seconds")]
        flops_cell = f"{flops[0]:.2e}" if flops else "n/a"
        secs_cell = f"{_mean(secs):.0f}" if secs else "n/a"
        lines.append(f"| {name} | `{' '.join(rows[0]['overrides']) or '(base)'}` | {len(rows)} | " + " | ".join(cells)
                     + f" | {flops_cell} | {secs_cell} |")
    path = out / "ablation.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", help="the recipe config every arm starts from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True, help="training steps of every arm")
    parser.add_argument("--arm", action="append", required=True, help="NAME or 'NAME: key=value ...' (repeat)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per arm, trainer.seed = 0..K-1")
    parser.add_argument("--jobs", type=int, default=1, help="arms trained at once, one thread each")
    parser.add_argument("--report-only", action="store_true", help="write the table from the runs there are")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seeds < 1 or args.jobs < 1:
        raise SystemExit("--steps, --seeds and --jobs must be >= 1")
    arms = [parse_arm(a) for a in args.arm]
    names = [n for n, _ in arms]
    if len(set(names)) != len(names):
        raise SystemExit(f"arm names repeat: {names}")
    jobs = [(name, seed, overrides) for name, overrides in arms for seed in range(args.seeds)]
    if not args.report_only:
        threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)

        def one(job):
            name, seed, overrides = job
            run = arm_dir(args.out, name, seed, args.seeds)
            seed_override = [f"trainer.seed={seed}"] if args.seeds > 1 else []
            return train_arm(args.base, run, args.steps, overrides + seed_override, threads)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, jobs))
    command = "python benchmarks/study/ablate.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    path = write_report(args.out, args.base, args.steps, table(args.out, arms, args.seeds), command)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
