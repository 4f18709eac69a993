"""`mixmodal eval CHECKPOINT --suite shapes`: what a trained early-fusion model can do on the
built-in world, measured the way the papers measure it.

    text -> image   GenEval-form accuracy (data/shapes/geneval.py): six categories of short
                    prompts that name only what they check (single_object, two_object,
                    counting, colors, position, color_attr), 4 images per prompt, overall =
                    the mean of the categories; held-out shape-colour combinations apart.
                    Beside it, the stricter full-scene oracle accuracy (count, colour, shape,
                    size, position, overall = the whole scene right) on held-out full
                    captions and held-out shape-colour combinations; FID against renders of held-out scenes (Inception
                    features from a pytorch-fid weights file, else mixmodal's shapes feature net,
                    labelled not comparable); CLIP score with a dual encoder when one is given
    image -> text   captioning: CIDEr-D and BLEU-4 against 5 reference captions per scene, and
                    the oracle's view (the generated caption parsed back into a scene)
                    VQA: answer accuracy, per question type
    text            perplexity of held-out documents (captions before their images, VQA
                    answers after theirs; images clean)
    compute         the FLOPs spent in training (model/training.json, the model's own accounting)

Every prompt set is a pure function of (split, index): two models evaluated with the same
config see the same prompts, seeds and references. `ShapesEvalConfig` reads from key=value
overrides like every config in mixmodal.

This module runs the suite on a model folder (`evaluate`, and `sweep` over sampling settings) and
writes the metrics, the reports and the cross-checks against reference implementations; the
config, the prompt sets and the runners of each task are shapes_tasks.py's (re-exported here).
"""


from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mixmodal.data.shapes.geneval import CATEGORIES
from mixmodal.eval.clip_score import clip_score
from mixmodal.eval.feature_net import default_feature_net, load_feature_net
from mixmodal.eval.inception import load_inception
from mixmodal.eval.report import describe_sampling, write_report
from mixmodal.eval.shapes_tasks import (ATTRIBUTES, FLOOR_OFFSET, REAL_OFFSET, SAMPLING_DEFAULTS, SAMPLING_FIELDS,
                                        SPLITS, SWEEP_GRID, SWEEP_PRESET, EvalError, ShapesEvalConfig, captioning,
                                        documents, fid, fid_reference, geneval, geneval_scores, image_batches,
                                        image_generation_config, perplexity, references, sampling, text_to_image,
                                        training_compute, vqa)
from mixmodal.eval.text_metrics import tokenize
from mixmodal.inference.engine import Engine
from mixmodal.model.bundle import model_folder
from mixmodal.retrieval.document_embedder import DocumentEmbedder


def evaluate(checkpoint: str | Path, out: str | Path, config: ShapesEvalConfig | None = None, *,
             inception: str | None = None, feature_net: str | None = None, encoder: str | None = None,
             device: str = "cpu", progress: Callable[[str], None] = print) -> dict:
    """Run the shapes suite on a model folder (or its run directory); write OUT/metrics.json,
    OUT/report.md, OUT/report.html and their figures; return the metrics."""

    config = config or ShapesEvalConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_dir = model_folder(checkpoint)
    engine = Engine.from_pretrained(model_dir, device=device)
    resolution = engine.image_tokenizer.config.resolution
    metrics: dict[str, Any] = {
        "checkpoint": str(model_dir), "suite": "shapes", "config": asdict(config), "resolution": resolution,
        "command": command_line(model_dir, out, config, inception=inception, feature_net=feature_net, encoder=encoder,
                                device=device),
        "image_mode": engine.mode, "parameters": engine.model.num_parameters(),
        "training": training_compute(model_dir),
    }
    artifacts: dict[str, Any] = {}

    metrics["sampling"] = sampling(config, engine.mode, getattr(engine, "image_sampling", None))
    extractor = _feature_extractor(inception, feature_net, resolution, progress) if config.num_prompts else None
    if config.geneval:
        metrics["geneval"], artifacts["geneval"] = {}, {}
        for which in [s for s in config.splits if s in SPLITS]:
            metrics["geneval"][which], artifacts["geneval"][which] = geneval(engine, config, which, progress)
    metrics["text_to_image"], artifacts["text_to_image"] = {}, {}
    for split in config.splits if config.num_prompts else []:
        m, samples = text_to_image(engine, config, resolution, split, progress)
        generated = [s["image"] for s in samples if s["image"] is not None]
        if extractor is not None and len(generated) >= 2:
            m["fid"] = fid(extractor, generated, config, resolution, split)
        if encoder:
            m["clip_score"] = _clip_scores(encoder, samples, device)
        metrics["text_to_image"][split] = m
        artifacts["text_to_image"][split] = samples
    if config.num_captions:
        m, examples, raw = captioning(engine, config, resolution, progress)
        metrics["captioning"] = m
        artifacts["captioning"] = examples
        metrics["cross_checks"] = {"captioning": _coco_cross_check(raw, m)}
    if config.num_vqa:
        metrics["vqa"], artifacts["vqa"] = vqa(engine, config, resolution, progress)
    if config.num_ppl:
        metrics["text"] = perplexity(engine, config, resolution, progress)
    if extractor is not None and config.splits:
        metrics.setdefault("cross_checks", {})["fid"] = _fid_cross_check(extractor, artifacts, metrics, config, resolution)
    metrics["seconds"] = round(time.time() - started, 1)
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1) + "\n", encoding="utf-8")
    write_report(out, metrics, artifacts)
    return metrics


def sweep(checkpoint: str | Path, out: str | Path, config: ShapesEvalConfig | None = None, *,
          grid: list[dict] | None = None, device: str = "cpu", progress: Callable[[str], None] = print) -> dict:
    """GenEval-form accuracy on the validation prompts (disjoint from the test prompts) for each
    sampling setting of `grid` (default: SWEEP_GRID of the model's mode); writes OUT/sweep.json
    and OUT/sweep.md and returns {"rows": [...], "best": {...}}."""

    config = config or ShapesEvalConfig(**SWEEP_PRESET)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = model_folder(checkpoint)
    engine = Engine.from_pretrained(model_dir, device=device)
    grid = grid or SWEEP_GRID[engine.mode]
    started = time.time()
    rows = []
    for k, setting in enumerate(grid):
        settings = {**sampling(config, engine.mode, getattr(engine, "image_sampling", None)), **setting}
        m, _ = geneval(engine, config, "validation", lambda line: None, settings, keep_images=False)
        rows.append({"settings": settings, "overall": m["overall"],
                     "categories": {c: v["accuracy"] for c, v in m["categories"].items()}})
        progress(f"sweep {k + 1}/{len(grid)}: {describe_sampling(settings, engine.mode)} -> overall {m['overall']:.3f}")
    best = max(rows, key=lambda r: r["overall"])
    result = {"checkpoint": str(model_dir), "image_mode": engine.mode, "prompt_set": "validation",
              "prompts_per_category": config.geneval_prompts, "images_per_prompt": config.images_per_prompt,
              "command": command_line(model_dir, out, config, sweep=True, device=device), "rows": rows, "best": best,
              "seconds": round(time.time() - started, 1)}
    (out / "sweep.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n", encoding="utf-8")
    _write_sweep_report(out, result)
    return result


def _write_sweep_report(out: Path, result: dict) -> None:

    mode = result["image_mode"]
    lines = [f"# Sampling sweep: `{result['checkpoint']}` ({mode})", "",
             f"GenEval-form accuracy on the validation prompts ({result['prompts_per_category']} per category, "
             f"{result['images_per_prompt']} images each; disjoint from the test prompts by seed). "
             f"{result['seconds']} s.", "", f"Reproduce: `{result['command']}`", "",
             "| setting | overall | " + " | ".join(CATEGORIES) + " |", "|---|---|" + "---|" * len(CATEGORIES)]
    for row in sorted(result["rows"], key=lambda r: -r["overall"]):
        mark = " **(best)**" if row is result["best"] else ""
        lines.append(f"| {describe_sampling(row['settings'], mode)}{mark} | {row['overall']:.3f} | "
                     + " | ".join(f"{row['categories'].get(c, float('nan')):.3f}" for c in CATEGORIES) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def command_line(checkpoint, out, config: ShapesEvalConfig, **flags) -> str:
    """The `mixmodal eval` command that reproduces these metrics (non-default fields as overrides)."""
    default = asdict(ShapesEvalConfig())
    overrides = [f"{k}={v}".replace(" ", "").replace("'", "") for k, v in asdict(config).items() if default[k] != v]
    options = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in flags.items()
               if v and not (k == "device" and v == "cpu")]
    return " ".join(["mixmodal eval", str(checkpoint), "--suite shapes", "--out", str(out), *options, *overrides])


def _feature_extractor(inception: str | None, feature_net: str | None, resolution: int, progress):
    if inception:
        return load_inception(inception)

    if feature_net:
        return load_feature_net(feature_net)
    return default_feature_net(resolution)


def _clip_scores(encoder: str, samples: list, device: str) -> dict:

    embedder = DocumentEmbedder.from_pretrained(encoder, device=device)
    pairs = [(s["image"], s["prompt"]) for s in samples if s["image"] is not None]
    generated = clip_score(embedder, [p[0] for p in pairs], [p[1] for p in pairs])
    real = clip_score(embedder, [s["real"] for s in samples], [s["prompt"] for s in samples])
    return {"clip_score": generated["clip_score"], "n": generated["n"], "real_images": real["clip_score"],
            "encoder": str(encoder)}


def _coco_cross_check(raw: dict, ours: dict) -> dict:
    """pycocoevalcap's CIDEr-D and BLEU-4 on the same tokenised captions, when it is installed."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return {"status": "pycocoevalcap not installed (pip install pycocoevalcap)"}

    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(raw["references"])}
    res = {i: [" ".join(tokenize(c))] for i, c in enumerate(raw["candidates"])}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"reference": "pycocoevalcap 1.2", "cider": float(cider), "bleu4": float(bleu[3]),
            "cider_abs_diff": abs(float(cider) - ours["cider"]), "bleu4_abs_diff": abs(float(bleu[3]) - ours["bleu4"])}


def _fid_cross_check(extractor, artifacts: dict, metrics: dict, config: ShapesEvalConfig, resolution: int) -> dict:
    """torchmetrics' FrechetInceptionDistance, fed the same feature network and the same images,
    on the first split."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return {"status": "torchmetrics not installed (pip install torchmetrics)"}
    split = next(iter(artifacts["text_to_image"]))
    if "fid" not in metrics["text_to_image"][split]:
        return {"status": "no FID computed"}
    generated = [s["image"] for s in artifacts["text_to_image"][split] if s["image"] is not None]
    real = fid_reference(config, resolution, split, config.num_fid_real, REAL_OFFSET)
    metric = FrechetInceptionDistance(feature=_AsTorchmetricsFeature(extractor), normalize=True)
    for images in image_batches(real, resolution):
        metric.update(images, real=True)
    for images in image_batches(generated, resolution):
        metric.update(images, real=False)
    theirs = float(metric.compute())
    ours = metrics["text_to_image"][split]["fid"]["fid"]
    return {"reference": "torchmetrics FrechetInceptionDistance (same features)", "split": split, "fid": theirs,
            "abs_diff": abs(theirs - ours)}


class _AsTorchmetricsFeature(torch.nn.Module):
    """torchmetrics calls a custom feature module on the images as given (float in [0, 1] with
    normalize=True) and reads `num_features` instead of running a dummy image through it."""

    def __init__(self, extractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.features(images.float()).double()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


__all__ = ["ATTRIBUTES", "EvalError", "FLOOR_OFFSET", "REAL_OFFSET", "SAMPLING_DEFAULTS", "SAMPLING_FIELDS", "SPLITS",
           "SWEEP_GRID", "SWEEP_PRESET", "ShapesEvalConfig", "captioning", "documents", "evaluate", "fid", "fid_reference",
           "geneval", "geneval_scores", "image_generation_config", "perplexity", "references", "sampling", "sweep",
           "text_to_image", "training_compute", "vqa"]
