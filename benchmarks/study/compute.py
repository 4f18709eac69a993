"""The equal-compute study (Transfusion Table 3, in miniature): a Chameleon-style token model
and a Transfusion-style latent model, the same transformer on the same `shapes` data, each
evaluated at several training-compute budgets with `mixmodal eval`; plus Transfusion's
Table 5 ablation (causal instead of bidirectional attention inside each image, latent mode).

    python benchmarks/study/compute.py --out runs/study-32 --budgets 300 600    # 32 px, CPU-sized (~2 h on 2 cores)
    python benchmarks/study/compute.py --out runs/study --res 64              # 64 px (CPU: ~10 h; a GPU: minutes)
    python benchmarks/study/compute.py --out runs/study-48 --res 48 --budgets 300 600 1200 2400   # the recipe's level
    python benchmarks/study/compute.py --out runs/study --res 64 --budgets 300 600 --arms tokens latents
    python benchmarks/study/compute.py --out runs/study-32 --phase report     # tables and plots only

Arms (configs/study/*-RES.yaml; one run each, step budgets read off it):
    tokens          VQ codes: 256 per 64 px image, 64 per 32 px image; 48 px: 9 k-means codes (one per grid
                    cell) through the recipe's shared map of factored code vectors, plausibility 0.1
    latents         VAE latents: 64 patches (2 x 2) per 64 px image, 64 (1 x 1) per 32 px image; 48 px: 9
                    factored PCA latents (18 channels, one per grid cell), rectified flow
    latents-causal  latents with causal intra-image attention (model.image.bidirectional=false)

Prerequisites are trained when absent: each arm's image tokenizer (data.image_tokenizer =
runs/NAME/tokenizer, from configs/tokenizers/NAME.yaml) and, for the CLIP score, the 32 px
dual encoder (runs/dual-encoder-32, configs/retrieval/dual-encoder-shapes-32.yaml).

The configs use a constant learning rate after warmup, so the model after s steps of a longer
run is the model an s-step run would give: each arm trains once, to the largest budget,
stopping at each budget to snapshot its model folder (with training.json, the FLOPs spent).
Every step is skipped when its output exists, so a second call resumes where one stopped.

Phases: train -> eval (`mixmodal eval SNAPSHOT --suite shapes`, with --encoder for the CLIP
score when the dual encoder exists) -> report (OUT/results.json; OUT/results.md with the
table, the FLOP ratios and the attention ablation; OUT/curves.png). docs/study.md is the write-up.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARMS = {  # arm -> (config, with {res} the image resolution, overrides)
    "tokens": ("configs/study/tokens-{res}.yaml", []),
    "latents": ("configs/study/latents-{res}.yaml", []),
    "latents-causal": ("configs/study/latents-{res}.yaml", ["model.image.bidirectional=false"]),
}
RESOLUTIONS = (32, 48, 64)
# `mixmodal eval` overrides per resolution unless --eval is given: 100 prompts per task; at 48 px (the
# recipe's level, issue 16) also the GenEval-form prompts (32 per category and set, one image each)
EVAL_DEFAULTS = {res: ["num_prompts=100", "num_captions=100", "num_vqa=100", "num_ppl=100"] for res in RESOLUTIONS}
EVAL_DEFAULTS[48] = EVAL_DEFAULTS[48] + ["geneval_prompts=32", "images_per_prompt=1"]
DUAL_ENCODER, DUAL_ENCODER_CONFIG = "runs/dual-encoder-32/encoder", "configs/retrieval/dual-encoder-shapes-32.yaml"


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def mixmodal(*args: str) -> None:
    run([sys.executable, "-m", "mixmodal", *args])


def snapshot_dir(out: Path, arm: str, steps: int) -> Path:
    return out / arm / f"steps-{steps:05d}"


def ensure_run(run_dir: str, config: str, artifact: str) -> None:
    """Train a prerequisite (an image tokenizer, the dual encoder) unless RUN_DIR/ARTIFACT exists:
    `mixmodal train CONFIG --out RUN_DIR`, resumed if a checkpoint is there."""
    if (ROOT / run_dir / artifact).exists():
        return
    resume = ["--resume"] if (ROOT / run_dir / "checkpoints").is_dir() else []
    mixmodal("train", config, "--out", run_dir, *resume)


def ensure_image_tokenizer(config: str) -> None:
    """The arm's image tokenizer (data.image_tokenizer: runs/NAME/tokenizer, trained from
    configs/tokenizers/NAME.yaml when absent)."""
    from mixmodal.config import load_yaml

    path = Path(load_yaml(ROOT / config)["data"]["image_tokenizer"])
    name = path.parent.name
    tokenizer_config = Path("configs/tokenizers") / f"{name}.yaml"
    if not (ROOT / tokenizer_config).is_file():
        raise SystemExit(f"{config}: data.image_tokenizer={path} is missing and there is no {tokenizer_config} "
                         "to train it from; train it, or point data.image_tokenizer at a trained tokenizer")
    ensure_run(str(path.parent), str(tokenizer_config), path.name)


def train(out: Path, arm: str, budgets: list[int], overrides: list[str], res: int) -> None:
    config, arm_overrides = ARMS[arm]
    config = config.format(res=res)
    ensure_image_tokenizer(config)
    run_dir = out / arm / "run"
    for steps in sorted(budgets):
        snap = snapshot_dir(out, arm, steps)
        if (snap / "model" / "training.json").is_file():
            continue
        resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
        mixmodal("train", config, "--out", str(run_dir), *resume, f"trainer.steps={steps}",
                 *arm_overrides, *overrides)
        if snap.exists():
            shutil.rmtree(snap)
        snap.mkdir(parents=True)
        shutil.copytree(run_dir / "model", snap / "model")
        shutil.copy(run_dir / "eval.json", snap / "train_eval.json")


def snapshots(out: Path, arm: str) -> list[Path]:
    return sorted(p for p in (out / arm).glob("steps-*") if (p / "model" / "training.json").is_file())


def evaluate(out: Path, arm: str, eval_overrides: list[str], encoder: str | None) -> None:
    import torch

    if encoder and encoder == DUAL_ENCODER:  # the default: trained here when absent (~5 min on 2 CPU cores)
        ensure_run(str(Path(encoder).parent), DUAL_ENCODER_CONFIG, Path(encoder).name)
    extra = ["--encoder", encoder] if encoder and Path(ROOT / encoder).exists() else []
    extra += ["--device", "cuda"] if torch.cuda.is_available() else []  # training picks the GPU by itself
    for snap in snapshots(out, arm):
        if not (snap / "eval" / "metrics.json").is_file():
            mixmodal("eval", str(snap / "model"), "--suite", "shapes", "--out", str(snap / "eval"), *extra,
                     *eval_overrides)


# --- report -------------------------------------------------------------------------------------

# (key, label, getter, higher is better)
METRICS = [
    ("geneval_heldout", "GenEval-form overall (held-out)", lambda m: m["geneval"]["heldout"]["overall"], True),
    ("geneval_combos", "GenEval-form overall (held-out combinations)",
     lambda m: m["geneval"]["heldout-combos"]["overall"], True),
    ("t2i_overall", "text->image overall (held-out)", lambda m: m["text_to_image"]["heldout"]["overall"], True),
    ("t2i_combos", "text->image overall (combos)", lambda m: m["text_to_image"]["heldout-combos"]["overall"], True),
    ("t2i_count", "text->image count (held-out)", lambda m: m["text_to_image"]["heldout"]["count"], True),
    ("t2i_attributes", "text->image mean of count/colour/shape/position",
     lambda m: sum(m["text_to_image"]["heldout"][a] for a in ("count", "colour", "shape", "position")) / 4, True),
    ("fid", "FID (shapes features, held-out)", lambda m: m["text_to_image"]["heldout"]["fid"]["fid"], False),
    ("clip", "CLIP score (dual encoder, held-out)",
     lambda m: m["text_to_image"]["heldout"]["clip_score"]["clip_score"], True),
    ("cider", "captioning CIDEr-D", lambda m: m["captioning"]["cider"], True),
    ("bleu4", "captioning BLEU-4", lambda m: m["captioning"]["bleu4"], True),
    ("vqa", "VQA accuracy", lambda m: m["vqa"]["accuracy"], True),
    ("ppl", "text perplexity", lambda m: m["text"]["perplexity"], False),
]


def collect(out: Path, arms: list[str]) -> dict:
    table: dict = {}
    for arm in arms:
        for snap in snapshots(out, arm):
            path = snap / "eval" / "metrics.json"
            if not path.is_file():
                continue
            m = json.loads(path.read_text())
            fill = m["training"].get("fill")
            if fill is None and (snap / "train_eval.json").is_file():  # snapshots from before training.json had it
                fill = json.loads((snap / "train_eval.json").read_text()).get("data", {}).get("fill")
            row = {"steps": m["training"]["steps"], "flops": m["training"]["flops"], "fill": fill,
                   "useful_flops": m["training"]["flops"] * fill if fill else None,
                   "parameters": m["parameters"], "eval": str(path)}
            for key, _, get, _ in METRICS:
                try:
                    row[key] = float(get(m))
                except (KeyError, TypeError):
                    row[key] = None
            table.setdefault(arm, []).append(row)
    return table


def parity_ratio(reference: list[dict], candidate: list[dict], key: str, higher: bool,
                 flops: str = "flops") -> tuple[str, float | None]:
    """Transfusion Table 3: the candidate's FLOPs needed to match the reference's best budget,
    as a fraction of the reference's FLOPs; interpolated log-linearly in FLOPs between the
    candidate's budgets. ("<x" when its smallest budget already matches, ">x" when none does.)
    `flops`: which count ("flops": every position computed; "useful_flops": non-padding ones)."""
    ref = max(reference, key=lambda r: r[flops])
    target = ref[key]
    pts = sorted((r[flops], r[key]) for r in candidate if r[key] is not None)
    if target is None or not pts:
        return "n/a", None
    if higher and target <= 0:
        return "n/a (the reference scores 0)", None
    better = (lambda v: v >= target) if higher else (lambda v: v <= target)
    if better(pts[0][1]):
        return f"<= {pts[0][0] / ref[flops]:.3g}", pts[0][0] / ref[flops]
    for (f0, v0), (f1, v1) in zip(pts, pts[1:]):
        if better(v1):
            w = (target - v0) / (v1 - v0) if v1 != v0 else 1.0
            needed = math.exp(math.log(f0) + w * (math.log(f1) - math.log(f0)))
            return f"{needed / ref[flops]:.3g}", needed / ref[flops]
    return f"> {pts[-1][0] / ref[flops]:.3g} (not reached)", None


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cols = 3
    rows = -(-len(METRICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 4, rows * 3), squeeze=False)
    for ax, (key, label, _, higher) in zip(axes.flat, METRICS):
        for arm, points in table.items():
            pts = sorted((r["flops"], r[key]) for r in points if r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=arm)
            useful = sorted((r["useful_flops"], r[key]) for r in points if r[key] is not None and r["useful_flops"])
            if arm == "tokens" and useful:  # its rows are half padding: where perfect packing would put it
                ax.plot([p[0] for p in useful], [p[1] for p in useful], "o--", color="C0", alpha=0.5,
                        label="tokens, non-padding FLOPs")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(label + (" (higher better)" if higher else " (lower better)"), fontsize=8)
        ax.set_xlabel("training FLOPs", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(METRICS):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("token (Chameleon-style) vs latent (Transfusion-style) on shapes, metric vs training FLOPs", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.text(0.01, 0.005, f"python benchmarks/study/compute.py --out {path.parent} (commands: {path.parent}/results.md)",
             fontsize=7, color="gray")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_ablation(bidirectional: list[dict], causal: list[dict]) -> list[str]:
    """Transfusion Table 5 form: the two attention patterns side by side at every budget both
    arms reached (the same steps, so the same FLOPs), never one arm's longer run against the other's."""
    by_steps = {r["steps"]: r for r in bidirectional}
    common = [(by_steps[r["steps"]], r) for r in sorted(causal, key=lambda r: r["steps"]) if r["steps"] in by_steps]
    if not common:
        return ["", "## Intra-image attention (Transfusion Table 5 form)", "",
                "No budget reached by both latents and latents-causal yet."]
    lines = ["", "## Intra-image attention (Transfusion Table 5 form), latent mode, at equal steps", "",
             "| metric | " + " | ".join(f"bidirectional, {a['steps']} steps | causal, {a['steps']} steps" for a, _ in common) + " |",
             "|---|" + "---|---|" * len(common)]
    for key, label, *_ in METRICS:
        cells = ["n/a" if r[key] is None else f"{r[key]:.3f}" for pair in common for r in pair]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def report(out: Path, arms: list[str], command: str) -> None:
    table = collect(out, arms)
    (out / "results.json").write_text(json.dumps(table, indent=1) + "\n")
    if not table:
        print("no evaluated snapshots yet")
        return
    plot(table, out / "curves.png")
    lines = [f"# Equal-compute study on shapes ({platform.node() or 'this machine'}, {time.strftime('%Y-%m-%d')})", "",
             "Made by (in this order; each step skips what exists):", "", "```",
             *(dict.fromkeys((out / "commands.log").read_text().splitlines()) if (out / "commands.log").is_file()
               else [command]), "```", "",
             "| arm | steps | training FLOPs | row fill | " + " | ".join(k for k, *_ in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for arm, points in table.items():
        for r in points:
            fill = "n/a" if r["fill"] is None else f"{r['fill']:.2f}"
            lines.append(f"| {arm} | {r['steps']} | {r['flops']:.3g} | {fill} | "
                         + " | ".join("n/a" if r[k] is None else f"{r[k]:.3f}" for k, *_ in METRICS) + " |")
    if "tokens" in table and "latents" in table:
        lines += ["", "## FLOP ratio (Transfusion Table 3 form)", "",
                  "Latent-model FLOPs needed to match the token model's largest budget, as a fraction of its FLOPs: "
                  "counting every position computed, and counting only non-padding positions (what perfect "
                  "packing would cost; the row fill column above).", "",
                  "| metric | token model at its largest budget | latent / token FLOPs | latent / token non-padding FLOPs |",
                  "|---|---|---|---|"]
        ref = max(table["tokens"], key=lambda r: r["flops"])
        useful = all(r["useful_flops"] for arm in ("tokens", "latents") for r in table[arm])
        for key, label, _, higher in METRICS:
            text, _ = parity_ratio(table["tokens"], table["latents"], key, higher)
            text2 = parity_ratio(table["tokens"], table["latents"], key, higher, "useful_flops")[0] if useful else "n/a"
            value = "n/a" if ref[key] is None else f"{ref[key]:.3f}"
            lines.append(f"| {label} | {value} | {text} | {text2} |")
    if "latents" in table and "latents-causal" in table:
        lines += attention_ablation(table["latents"], table["latents-causal"])
    lines += ["", "![curves](curves.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    print(f"wrote {out / 'results.md'}, {out / 'curves.png'}, {out / 'results.json'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study-32")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--budgets", nargs="+", type=int, default=[300, 600, 1200], help="training steps per snapshot")
    p.add_argument("--res", type=int, default=32, choices=RESOLUTIONS,
                   help="image resolution: 32 (the CPU-sized study: 64 positions per image both ways; tokenizers "
                        "runs/{vq,vae}-demo-32), 48 (the recipe's level: 9 positions per image both ways, computed "
                        "tokenizers runs/{kmeans,fpca}-shapes-48-f16) or 64 (256 VQ codes vs 64 latent patches per "
                        "image; tokenizers runs/{vq,vae}-shapes-64)")
    p.add_argument("--phase", choices=["all", "train", "eval", "report"], default="all")
    p.add_argument("--eval", nargs="*", default=None,
                   help="key=value overrides for `mixmodal eval` (default: 100 prompts per task; at --res 48 also "
                        "32 GenEval-form prompts per category and set)")
    p.add_argument("--encoder", default=DUAL_ENCODER,
                   help=f"dual encoder for the CLIP score (the default is trained from {DUAL_ENCODER_CONFIG} "
                        "when absent; '' for none)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    args = p.parse_args(argv)
    if args.eval is None:
        args.eval = EVAL_DEFAULTS[args.res]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase != "report":  # the report lists every command that made its numbers
        with open(out / "commands.log", "a", encoding="utf-8") as f:
            f.write("python benchmarks/study/compute.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "\n")
    if args.phase in ("all", "train"):
        for arm in args.arms:
            train(out, arm, args.budgets, args.overrides, args.res)
    if args.phase in ("all", "eval"):
        for arm in args.arms:
            evaluate(out, arm, args.eval, args.encoder)
    if args.phase in ("all", "eval", "report"):
        report(out, args.arms, "python benchmarks/study/compute.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
