"""`make demo`: the main job on the built-in `shapes` world, no data and no downloads.

Each step is a `mixmodal` command, printed before it runs, so the demo doubles as a
walkthrough of the CLI. Stages so far: write datasets (JSONL + PNGs, WebDataset shards),
train the BPE tokenizer, print statistics, draw contact sheets, check the oracle on the
held-out renders, compute a k-means image tokenizer (one code per grid cell) and train a
Chameleon-style early-fusion model on its codes, and a PCA latent tokenizer and a
Transfusion-style model on its latents, plot their loss curves, let both write documents
from held-out captions (`mixmodal generate`: JSON, PNGs and an HTML page each), and score
both (`mixmodal eval --suite shapes --quick`). Ends by listing what it made.

    python -m mixmodal.demo [--config configs/demo.yaml] [--out demo_out] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

from mixmodal import cli
from mixmodal.config import build_config, save_config
from mixmodal.data.shapes import Scene, ShapesConfig, parse_caption, score
from mixmodal.tokenizers.text import TextTokenizerConfig


@dataclass
class DemoConfig:
    # 30% of caption documents are GenEval-form partial captions, the prompts the eval asks for
    shapes: ShapesConfig = field(default_factory=lambda: ShapesConfig(resolution=48, partial_captions=0.3))
    text_tokenizer: TextTokenizerConfig = field(default_factory=lambda: TextTokenizerConfig(vocab_size=1024))
    num_train: int = 5000  # documents in the train split
    num_heldout: int = 500  # documents in each held-out split
    num_shown: int = 24  # documents on each contact sheet
    # computed in seconds (one code / latent pixel per cell of the 3 x 3 grid); a trained VQ / KL-VAE preset works too
    image_tokenizer_run: str = "configs/tokenizers/kmeans-shapes-48-f16.yaml"  # the token model's image tokenizer
    model_run: str = "configs/models/demo-tokens.yaml"  # the Chameleon-style model the demo trains on its codes
    latent_tokenizer_run: str = "configs/tokenizers/fpca-shapes-48-f16.yaml"  # the latent model's image tokenizer
    latent_model_run: str = "configs/models/demo-latents.yaml"  # the Transfusion-style model on its latents
    tokenizer_overrides: list[str] = field(default_factory=list)  # key=value for both tokenizer runs (trainer.steps=...)
    model_steps: int = 420  # each model; ~4 minutes on 2 cores in fp32 (AVX-512, 2026-12-06)
    num_prompts: int = 4  # held-out captions each model writes a document from (mixmodal generate)
    cfg: float = 7.5  # classifier-free guidance scale for the generated images (the eval suite's default)
    diffusion_steps: int = 25  # denoising steps per image (latent model; the eval suite's default)
    eval_num: int = 32  # images / questions / documents per task in the closing `mixmodal eval`
    geneval_prompts: int = 16  # prompts per GenEval-form category and prompt set in that eval
    feature_net: str = ""  # FID features for that eval; "" = mixmodal's cached shapes feature net (trained on first use)

    def __post_init__(self) -> None:
        for name in ("num_train", "num_heldout", "num_shown", "model_steps", "num_prompts", "diffusion_steps",
                     "eval_num", "geneval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _run(argv: list[str], capture: bool = False) -> str:
    print(f"\n$ mixmodal {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    buffer = StringIO()
    if capture:
        with redirect_stdout(buffer):
            code = cli.main(argv)
    else:
        code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"demo step failed (exit {code}): mixmodal {shlex.join(argv)}")
    print(f"  ({time.perf_counter() - started:.1f}s)")
    return buffer.getvalue()


def _oracle_check(data_dir: Path) -> dict:
    """Parse every held-out image back into a scene and score it against its metadata."""
    from mixmodal.data.sources import open_source  # late: it imports torch; this module does not

    totals: dict[str, float] = {}
    n = 0
    for doc in open_source(str(data_dir), strict=True):
        for img, scene in zip(doc.images, doc.metadata["scenes"]):  # one scene per image, in order
            for k, v in score(img, Scene.from_dict(scene)).items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
    return {k: round(v / max(1, n), 4) for k, v in totals.items()} | {"images": n}


def _heldout_captions(data_dir: Path, n: int) -> list[str]:
    """The first n full-caption documents' texts of a held-out split (prompts the models never saw)."""
    from mixmodal.data.sources import open_source  # late: it imports torch

    out = []
    for doc in open_source(str(data_dir), strict=True):
        if doc.metadata.get("task") == "caption" and "prompt" not in doc.metadata:  # not a partial caption
            out.append(doc.texts[0])
            if len(out) == n:
                break
    return out


def _oracle_generated(gen_dir: Path, prompts: list[str]) -> dict:
    """Mean oracle scores of the generated images against their captions' scenes."""
    from mixmodal.data.sources import open_source  # late: it imports torch

    totals: dict[str, float] = {}
    docs = list(open_source(str(gen_dir / "documents.jsonl"), strict=True))
    with_image = 0
    for doc, prompt in zip(docs, prompts):
        if not doc.images:
            continue
        with_image += 1
        for k, v in score(doc.images[0], parse_caption(prompt)).items():
            totals[k] = totals.get(k, 0.0) + v
    return {"documents": len(docs), "with_image": with_image} | {k: v / max(1, with_image) for k, v in totals.items()}


def _preset(path: str) -> str:
    """A preset path as given, or relative to the source checkout when run from elsewhere."""
    if Path(path).is_file():
        return path
    checkout = Path(__file__).resolve().parents[1] / path
    if checkout.is_file():
        return str(checkout)
    raise SystemExit(f"demo: preset {path} not found (run the demo from the mixmodal checkout, or pass "
                     "image_tokenizer_run=/model_run= with paths to your presets)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixmodal.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML preset for DemoConfig (default: built-in defaults)")
    parser.add_argument("--out", default="demo_out", help="output folder")
    args, overrides = parser.parse_known_args(argv)
    config = build_config(DemoConfig, args.config, overrides)
    out = Path(args.out)
    started = time.perf_counter()
    save_config(config, out)
    shapes_preset = save_config(config.shapes, out / "configs", "shapes.yaml")
    data = out / "data"

    for split, num in (("train", config.num_train), ("heldout", config.num_heldout), ("heldout-combos", config.num_heldout)):
        _run(["data", "shapes", "--num", str(num), "--split", split, "--config", str(shapes_preset),
              "--out", str(data / split), "--quiet"])
    _run(["data", "shapes", "--num", str(config.num_heldout), "--split", "train", "--config", str(shapes_preset),
          "--format", "wds", "--shard-size", "100", "--out", str(data / "train-wds"), "--quiet"])

    tok = config.text_tokenizer
    _run(["tokenizer", "train", str(data / "train"), "--vocab-size", str(tok.vocab_size),
          "--min-frequency", str(tok.min_frequency), "--out", str(out / "tokenizer")])
    _run(["tokenizer", "encode", str(out / "tokenizer"), "two small red circles above a large blue square"])

    stats = json.loads(_run(["data", "stats", str(data / "train"), "--tokenizer", str(out / "tokenizer"), "--json"], capture=True))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(f"  documents {stats['documents']}, images {stats['images']}, tasks {stats['tasks']}")
    print(f"  text tokens/doc {stats['text_tokens_per_doc']}, chars/token {stats['chars_per_token']}")
    _run(["data", "stats", str(data / "train-wds"), "--tokenizer", str(out / "tokenizer")])

    sheets = []
    for split in ("train", "heldout-combos"):
        sheet = out / f"contact_sheet_{split}.png"
        _run(["data", "show", str(data / split), "--num", str(config.num_shown), "--out", str(sheet)])
        sheets.append(sheet)

    print("\n# oracle: parse each held-out image back into a scene and score it against the truth")
    oracle = {split: _oracle_check(data / split) for split in ("heldout", "heldout-combos")}
    (out / "oracle.json").write_text(json.dumps(oracle, indent=2))
    for split, scores in oracle.items():
        print(f"  {split:<15} " + "  ".join(f"{k} {v}" for k, v in scores.items()))

    runs = out / "runs"
    for title, tokenizer_run, model_run, name, model in (
            ("an image tokenizer (by default k-means codes of 16 x 16 patches, computed: 48 px -> 3 x 3 codes), "
             "then a Chameleon-style model on its codes", config.image_tokenizer_run, config.model_run, "vq", "tokens"),
            ("an image tokenizer (by default factored PCA of 16 x 16 patches, computed: 48 px -> 18 x 3 x 3 latents), "
             "then a Transfusion-style model on them", config.latent_tokenizer_run, config.latent_model_run, "vae", "latents")):
        print(f"\n# {title}")
        for stale in (runs / name, runs / model):  # an earlier demo's runs: start afresh, as a first run does
            shutil.rmtree(stale, ignore_errors=True)
        _run(["train", _preset(tokenizer_run), "--out", str(runs / name), *config.tokenizer_overrides])
        _run(["train", _preset(model_run), "--out", str(runs / model), f"trainer.steps={config.model_steps}",
              f"data.image_tokenizer={runs / name / 'tokenizer'}", f"data.text_tokenizer={out / 'tokenizer'}",
              "trainer.progress=false"])
    curves = out / "loss_curves.png"
    _run(["plot", str(runs / "tokens"), str(runs / "latents"), "--out", str(curves), "--labels", "tokens", "latents",
          "--title", f"demo: Chameleon-style (tokens) and Transfusion-style (latents) models on shapes "
          f"({config.shapes.resolution} px)"])
    training = {"image_tokenizer": json.loads((runs / "vq" / "eval.json").read_text()),
                "model": json.loads((runs / "tokens" / "eval.json").read_text()),
                "latent_tokenizer": json.loads((runs / "vae" / "eval.json").read_text()),
                "latent_model": json.loads((runs / "latents" / "eval.json").read_text())}

    print("\n# each model writes a document (text, then an image) from held-out captions")
    prompts = _heldout_captions(data / "heldout", config.num_prompts)
    pages = {}
    for model in ("tokens", "latents"):
        gen = out / "generate" / model
        _run(["generate", str(runs / model), *[a for p in prompts for a in ("--prompt", p)], "--mode", "interleaved",
              "--cfg", str(config.cfg), "--steps", str(config.diffusion_steps), "--max-new-tokens", "160",
              "--seed", "0", "--out", str(gen)])
        pages[model] = gen / "index.html"
    training["generated"] = {m: _oracle_generated(p.parent, prompts) for m, p in pages.items()}

    print("\n# a short eval of each model (mixmodal eval --suite shapes): GenEval-form text->image accuracy, "
          "full-scene oracle accuracy and FID,"
          " captioning, VQA, perplexity, training FLOPs")
    evals = {}
    n = config.eval_num
    for model in ("tokens", "latents"):
        dest = out / "eval" / model
        _run(["eval", str(runs / model), "--suite", "shapes", "--quick", "--out", str(dest), f"num_prompts={n}",
              f"num_captions={n}", f"num_vqa={n}", f"num_ppl={n}", f"geneval_prompts={config.geneval_prompts}",
              f"diffusion_steps={config.diffusion_steps}", *(["--feature-net", config.feature_net] if config.feature_net else [])])
        evals[model] = json.loads((dest / "metrics.json").read_text())
    training["eval"] = evals

    elapsed = time.perf_counter() - started
    report = _write_report(out, config, stats, oracle, sheets, elapsed, training, curves)
    print(f"\ndemo finished in {elapsed:.0f}s. It made:")
    for label, path in [
        ("datasets (JSONL + PNG)", ", ".join(str(data / s) for s in ("train", "heldout", "heldout-combos"))),
        ("dataset (WebDataset shards)", data / "train-wds"),
        ("text tokenizer", out / "tokenizer" / "tokenizer.json"),
        ("contact sheets", ", ".join(map(str, sheets))),
        ("statistics", out / "stats.json"),
        ("oracle check", out / "oracle.json"),
        ("image tokenizers", f"{runs / 'vq' / 'tokenizer'}, {runs / 'vae' / 'tokenizer'}"),
        ("early-fusion models", f"{runs / 'tokens' / 'model'}, {runs / 'latents' / 'model'}"),
        ("loss curves", curves),
        ("generated (tokens model)", pages["tokens"]),
        ("generated (latents model)", pages["latents"]),
        ("eval reports", f"{out / 'eval' / 'tokens' / 'report.html'}, {out / 'eval' / 'latents' / 'report.html'}"),
        ("resolved config", out / "config.yaml"),
        ("report", report),
    ]:
        print(f"  {label:<28} {path}")
    return 0


def _made(run: dict) -> str:
    """How a tokenizer run was made: fitted in closed form (patch tokenizers) or trained for N steps."""
    return f"computed in {run['fit_seconds']:.0f} s" if "fit_seconds" in run else f"{run['step']} steps"


def _db(run: dict) -> str:
    """PSNR as written in eval.json: a number, or "inf" for a lossless round trip (k-means on shapes)."""
    psnr = float(run.get("psnr", float("nan")))
    return "inf (lossless)" if psnr == float("inf") else f"{psnr:.1f} dB"


def _write_report(out: Path, config: DemoConfig, stats: dict, oracle: dict, sheets: list[Path], elapsed: float,
                  training: dict, curves: Path) -> Path:
    lines = [
        "# mixmodal demo report",
        "",
        f"Built-in `shapes` world at {config.shapes.resolution}px; finished in {elapsed:.0f}s. "
        f"Reproduce with `make demo` (resolved config: `config.yaml`).",
        "",
        "## Data",
        "",
        f"- train: {stats['documents']} documents, {stats['images']} images; tasks {stats['tasks']}",
        f"- layouts (T = text, I = image): {stats['layouts']}",
        f"- text tokens per document: {stats['text_tokens_per_doc']}; {stats['chars_per_token']} characters per token "
        f"(byte-level BPE, {config.text_tokenizer.vocab_size} ids)",
        "",
        "## Oracle on held-out renders",
        "",
        "| split | " + " | ".join(k for k in next(iter(oracle.values()))) + " |",
        "|---|" + "---|" * len(next(iter(oracle.values()))),
    ]
    for split, scores in oracle.items():
        lines.append(f"| {split} | " + " | ".join(str(v) for v in scores.values()) + " |")
    vq, model = training["image_tokenizer"], training["model"]
    vae, latent = training["latent_tokenizer"], training["latent_model"]
    lines += [
        "", "## Training", "",
        f"- image tokenizer for the token model (`runs/vq`, {_made(vq)}): PSNR {_db(vq)}, "
        f"codebook usage {vq.get('usage', float('nan')):.0%}, oracle on reconstructions {vq.get('oracle_overall', 0):.0%}",
        f"- image tokenizer for the latent model (`runs/vae`, {_made(vae)}): PSNR {_db(vae)}, "
        f"oracle on reconstructions {vae.get('oracle_overall', 0):.0%}",
        f"- token model (`runs/tokens`, {model['step']} steps): held-out text CE {model['eval_text_ce']:.3f} "
        f"(perplexity {model['eval_text_ppl']:.1f}), image-code CE {model['eval_image_ce']:.3f}",
        f"- latent model (`runs/latents`, {latent['step']} steps): held-out text CE {latent['eval_text_ce']:.3f} "
        f"(perplexity {latent['eval_text_ppl']:.1f}), diffusion loss {latent['eval_diffusion']:.3f}",
        "", f"![loss curves]({curves.name})",
        "", "## Generation (`mixmodal generate`, held-out captions, interleaved mode, "
        f"CFG {config.cfg})", "",
        "The oracle parses each generated image and scores it against the caption's scene "
        "(full captions: every object's shape, colour, size and cell; harder than the GenEval-form prompts below).", "",
        "| model | documents | with an image | oracle overall | count | colour | shape | page |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, g in training["generated"].items():
        lines.append(f"| {name} | {g['documents']} | {g['with_image']} | {g.get('overall', 0):.2f} | "
                     f"{g.get('count', 0):.2f} | {g.get('colour', 0):.2f} | {g.get('shape', 0):.2f} | "
                     f"[index.html](generate/{name}/index.html) |")
    lines += ["", "## Evaluation (`mixmodal eval --suite shapes --quick`)", "",
              "| model | GenEval-form overall (heldout) | single_object | overall (combos) | full-scene overall "
              "(1-2 objects) | FID (shapes features) | CIDEr-D | BLEU-4 | VQA | text ppl | training FLOPs | report |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in training.get("eval", {}).items():
        t2i = m["text_to_image"]
        h = t2i.get("heldout", {})
        g = m.get("geneval", {})
        gh, gc = g.get("heldout", {}), g.get("heldout-combos", {})
        single = gh.get("categories", {}).get("single_object", {}).get("accuracy", 0)
        fid = h.get("fid", {}).get("fid")
        flops = m.get("training", {}).get("flops")
        lines.append(f"| {name} | {gh.get('overall', 0):.3f} | {single:.3f} | {gc.get('overall', 0):.3f} | "
                     f"{h.get('overall', 0):.3f} | {'n/a' if fid is None else f'{fid:.2f}'} | "
                     f"{m['captioning']['cider']:.3f} | {m['captioning']['bleu4']:.3f} | {m['vqa']['accuracy']:.3f} | "
                     f"{m['text']['perplexity']:.2f} | {'n/a' if flops is None else f'{flops:.3g}'} | "
                     f"[report](eval/{name}/report.html) |")
    lines += ["", "GenEval-form: six categories of short prompts that name only what they check (docs/eval.md); "
              "the full-scene column asks for every object's shape, colour, size and cell. FID here uses mixmodal's "
              "shapes feature network: not comparable to Inception FID. "
              f"{config.geneval_prompts} prompts per GenEval-form category: expect noise of about "
              f"+-{0.5 / config.geneval_prompts ** 0.5:.2f} on a category, less on the overall.", ""]
    for name in training.get("eval", {}):
        lines += [f"![GenEval-form samples, {name}](eval/{name}/figures/geneval-heldout.png)", ""]
    lines += ["", "## Contact sheets", ""] + [f"![{s.stem}]({s.name})" for s in sheets] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
