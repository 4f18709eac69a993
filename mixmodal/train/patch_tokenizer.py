"""`task: patch-tokenizer`: compute a PCA or k-means patch tokenizer (tokenizers/patch.py) in seconds.

    mixmodal train configs/tokenizers/pca-shapes-48.yaml --out runs/pca-shapes-48
    mixmodal train configs/tokenizers/kmeans-shapes-48.yaml --out runs/kmeans-shapes-48

There is no training loop: the tokenizer is fitted in closed form to the first `data.num_images`
images of `data.source`, then scored like a trained one (PSNR, SSIM, the shapes oracle on its
reconstructions of `data.eval_source`). The run folder has the layout of an image-tokenizer run
without checkpoints: RUN/config.yaml, RUN/metrics.jsonl (one eval line), RUN/eval.json,
RUN/samples/step_000000.png and RUN/tokenizer/ (what `data.image_tokenizer` of a model run names).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mixmodal.config import save_config
from mixmodal.tokenizers.image import save_image_tokenizer
from mixmodal.tokenizers.patch import KMeansConfig, KMeansTokenizer, PCAConfig, PCATokenizer
from mixmodal.train.checkpoint import artifact_remake
from mixmodal.train.image_data import eval_images
from mixmodal.train.image_tokenizer import ImageEvalConfig, evaluate_reconstructions, save_sample_grid
from mixmodal.train.metrics import MetricsLogger, jsonable


@dataclass
class PatchTokenizerChoice:
    """Which tokenizer to compute (`kind`) and its config; only that kind's section is needed."""

    kind: Literal["pca", "kmeans"] = "pca"
    pca: PCAConfig | None = None
    kmeans: KMeansConfig | None = None

    def __post_init__(self) -> None:
        if self.kind == "pca" and self.pca is None:
            self.pca = PCAConfig()
        if self.kind == "kmeans" and self.kmeans is None:
            self.kmeans = KMeansConfig()

    @property
    def model(self) -> PCAConfig | KMeansConfig:
        return self.pca if self.kind == "pca" else self.kmeans


@dataclass
class PatchFitData:
    source: str = "shapes:split=train"  # any open_source spec; shapes renders at the tokenizer's resolution
    eval_source: str = "shapes:split=heldout"
    num_images: int = 4000  # images the tokenizer is fitted to (their patches: num_images x grid_size^2)

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")


@dataclass
class PatchTokenizerFitConfig:
    task: Literal["patch-tokenizer"] = "patch-tokenizer"
    tokenizer: PatchTokenizerChoice = field(default_factory=PatchTokenizerChoice)
    data: PatchFitData = field(default_factory=PatchFitData)
    eval: ImageEvalConfig = field(default_factory=ImageEvalConfig)


CONFIG = PatchTokenizerFitConfig


def fit(config: PatchTokenizerFitConfig, out: str | os.PathLike) -> dict:
    """Compute the tokenizer, score it, write the run folder; returns the eval (with `fit_seconds`)."""
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    logger = MetricsLogger(run_dir)
    logger.discard()  # a fit done again in the same folder replaces the earlier one's record
    started = time.perf_counter()
    model_config = config.tokenizer.model
    tokenizer = PCATokenizer(model_config) if config.tokenizer.kind == "pca" else KMeansTokenizer(model_config)
    images, _ = eval_images(config.data.source, model_config.resolution, config.data.num_images)
    stats = tokenizer.fit(images)
    fit_seconds = time.perf_counter() - started
    metrics = {"step": 0, "fit_seconds": round(fit_seconds, 3), "fit_images": len(images), **stats}
    if config.eval.num_images:
        images, scenes = eval_images(config.data.eval_source, model_config.resolution, config.eval.num_images)
        recons, scores = evaluate_reconstructions(tokenizer, images, scenes if config.eval.oracle else None,
                                                  config.eval.batch_size)
        metrics.update(scores)
        if config.eval.num_samples:
            save_sample_grid(images, recons, config.eval.num_samples, run_dir / "samples" / "step_000000.png")
    save_image_tokenizer(tokenizer.eval(), run_dir / "tokenizer", remake=artifact_remake(run_dir))
    logger.log(0, "eval", metrics=metrics)  # the trainer's record form (non-finite values as strings)
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(jsonable(metrics), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / "eval.json")
    return metrics
