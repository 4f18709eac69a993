"""`make demo-full`: both recipes of docs/recipes.md end to end — the 48 px tokenizers, the token and
latent models, their evals and learning curves — resumable, so an interrupted run picks up where
it stopped (run it again).

    python -m mixmodal.demo_full --out demo_full            # hours on a 2-core CPU: see docs/recipes.md
    python -m mixmodal.demo_full --out demo_full --only tokens

`make demo` stays under 10 minutes by training small models briefly (it shows the pipeline); this
trains what the recipes train (it shows what the models learn). Each step is one `mixmodal` command,
printed before it runs, so any of them can be rerun by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mixmodal.demo import _run

ROOT = Path(__file__).resolve().parents[1]
PATHS = {  # path: (tokenizer config, its run, recipe config, its run)
    "tokens": ("configs/tokenizers/kmeans-shapes-48-f16.yaml", "kmeans-shapes-48-f16", "configs/recipes/tokens-48.yaml",
               "recipe-tokens"),
    "latents": ("configs/tokenizers/fpca-shapes-48-f16.yaml", "fpca-shapes-48-f16", "configs/recipes/latents-48.yaml",
                "recipe-latents"),
}
# The eval the recipes report (docs/recipes.md): GenEval's 553 held-out prompts and the 194
# held-out-combination prompts, one image each, and 100 captions / questions / documents.
EVAL = ["images_per_prompt=1", "num_prompts=0", "num_captions=100", "num_vqa=100", "num_ppl=100"]


def _train(config: str, run: Path, *overrides: str) -> None:
    """Train, or resume a run that has checkpoints; a finished run (eval.json written) is kept."""
    if (run / "eval.json").is_file():
        print(f"\n# {run} is finished; keeping it (delete it to train again)")
        return
    resume = ["--resume"] if (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir()) else []
    _run(["train", str(ROOT / config), "--out", str(run), *resume, "trainer.progress=false", *overrides])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_full", help="output directory (runs/, eval/, recipe-curves.png)")
    parser.add_argument("--only", choices=sorted(PATHS), default=None, help="one image path only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = out / "runs"
    started = time.perf_counter()
    paths = [args.only] if args.only else list(PATHS)
    made = {}
    for path in paths:
        tokenizer_config, tokenizer_run, recipe, run = PATHS[path]
        print(f"\n# the {path} recipe: {tokenizer_config}, then {recipe}")
        _train(tokenizer_config, runs / tokenizer_run)
        _train(recipe, runs / run, f"data.image_tokenizer={(runs / tokenizer_run / 'tokenizer').resolve()}")
        dest = out / "eval" / path
        if not (dest / "metrics.json").is_file():
            _run(["eval", str(runs / run), "--suite", "shapes", "--out", str(dest), *EVAL])
        made[path] = dest
    curves = out / "recipe-curves.png"
    _run(["plot", *[str(runs / PATHS[p][3]) for p in paths], "--out", str(out / "loss-curves.png"),
          "--labels", *paths])
    subprocess.run([sys.executable, str(ROOT / "benchmarks/study/curves.py"), *[str(runs / PATHS[p][3]) for p in paths],
        "--labels", *paths, "--out", str(curves)], check=True)
    print(f"\ndemo-full finished in {time.perf_counter() - started:.0f}s. It made:")
    for path, dest in made.items():
        metrics = json.loads((dest / "metrics.json").read_text())
        g = metrics.get("geneval", {})
        print(f"  {path:<8} GenEval-form overall: held-out {g.get('heldout', {}).get('overall', 0):.3f}, "
              f"held-out combinations {g.get('heldout-combos', {}).get('overall', 0):.3f}; report {dest / 'report.html'}")
    print(f"  learning curves (accuracy vs FLOPs) {curves}")
    print(f"  loss curves                         {out / 'loss-curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
