"""The shapes suite's parts (eval/shapes_suite.py runs them on a model folder and writes the
reports): ShapesEvalConfig and the sampling defaults, the prompt sets (pure functions of (split,
index)), and one runner per task: text -> image (full-scene oracle, GenEval-form categories,
FID), captioning, VQA, perplexity; and the model's recorded training compute.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mixmodal.data.pipeline import IGNORE, DocumentEncoder, FusionBatches, PipelineConfig
from mixmodal.data.shapes import (CaptionParseError, Scene, ShapesConfig, caption, parse_caption, render, sample_scene,
                                   score, score_scenes, shapes_document)
from mixmodal.data.shapes.geneval import GENEVAL_PROMPTS, categories_of, judge, scene_things, score_image
from mixmodal.data.shapes.scene import PLAN_PREFIX
from mixmodal.data.shapes.geneval import prompt_set as make_prompts
from mixmodal.data.sources.shapes_source import ShapesSource
from mixmodal.eval.fid import feature_stats, frechet_distance
from mixmodal.eval.text_metrics import bleu, cider_d, vqa_accuracy
from mixmodal.inference.config import ContrastiveConfig, GenerationConfig, GuidanceConfig, SamplingParams
from mixmodal.inference.engine import Engine
from mixmodal.model.bundle import TRAINING_FILE, Bundle
from mixmodal.tokenizers.pixels import images_to_tensor

SPLITS = ("heldout", "heldout-combos")
ATTRIBUTES = ("count", "colour", "shape", "size", "position", "background", "overall")


@dataclass
class ShapesEvalConfig:
    min_objects: int = 1
    max_objects: int = 2  # the target: held-out 1-2-object prompts
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    num_prompts: int = 200  # text-to-image prompts per split
    num_captions: int = 200  # held-out images to caption
    num_references: int = 5  # reference captions per image (distinct draws of the caption grammar)
    num_vqa: int = 200  # held-out questions
    num_ppl: int = 200  # held-out documents for perplexity
    num_fid_real: int = 1000  # renders of held-out scenes: FID's reference set
    geneval: bool = True  # the GenEval-form categories
    geneval_prompts: int = 0  # prompts per category; 0 = GenEval's counts (80, 99, 80, 94, 100, 100)
    images_per_prompt: int = 4  # GenEval's
    # Text -> image sampling. None = the image mode's default, chosen by the sweep in docs/eval.md
    # (SAMPLING_DEFAULTS); the report records what was used.
    cfg: float | None = None  # classifier-free guidance scale
    diffusion_steps: int | None = None  # latent mode
    image_temperature: float | None = None  # token mode
    image_top_k: int | None = None  # token mode; 0 = off
    image_top_p: float | None = None  # token mode
    cdk: bool | None = None  # token mode: contrastive decoding (CD-K, CM3Leon's alpha 0.5, k 5) instead of CFG
    guidance_interval: list[float] | None = None  # latent mode: guide only for lo < t <= hi (docs/generation.md)
    plausibility: float | None = None  # token mode: guide only among codes the prompt makes plausible
    patch_groups: int | None = None  # latent mode: denoise the patches in this many turns (GenerationConfig.patch_groups)
    # GenEval-form prompts: the model first writes a plan (a full caption of the scene, "Plan: ...", as the
    # world's plan documents teach), then draws the image for the prompt and its plan
    plan: bool | None = None
    plan_temperature: float | None = None  # the plan's text temperature (default 1: the model's own distribution)
    batch_size: int = 32  # prompts generated together
    seed: int = 0
    samples: int = 16  # images per split in the report's sample grids

    def __post_init__(self) -> None:
        for name in ("num_prompts", "num_captions", "num_vqa", "num_ppl", "num_references", "batch_size"):
            if getattr(self, name) < 0 or (name in ("num_references", "batch_size") and getattr(self, name) < 1):
                raise ValueError(f"eval.{name} must be >= {1 if name in ('num_references', 'batch_size') else 0}, "
                                 f"got {getattr(self, name)}")
        if self.geneval_prompts < 0 or self.images_per_prompt < 1:
            raise ValueError(f"eval.geneval_prompts must be >= 0 (0 = GenEval's counts) and eval.images_per_prompt >= 1, "
                             f"got {self.geneval_prompts} and {self.images_per_prompt}")
        bad = [s for s in self.splits if s not in ("train", *SPLITS)]
        if bad:
            raise ValueError(f"eval.splits: unknown split(s) {bad}; use heldout and/or heldout-combos")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"eval objects: need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}..{self.max_objects}")


# The text -> image sampling each image mode is evaluated with unless told otherwise: the best
# setting of the sweep (`mixmodal eval RUN --suite shapes --sweep`, docs/eval.md) on the
# validation prompts, which are disjoint from the test prompts.
SAMPLING_DEFAULTS = {
    # 2026-12-02 sweep (docs/eval.md): CFG >= 5 all within 0.03 of the best (0.240, CFG 5 greedy); CFG 7.5
    # at temperature 0.7 (0.234) keeps the 4 images of a prompt independent, which greedy does not
    "tokens": {"cfg": 7.5, "image_temperature": 0.7, "image_top_k": 0, "image_top_p": 1.0, "cdk": False,
               "diffusion_steps": 50, "guidance_interval": None, "plausibility": 0.0, "patch_groups": 1, "plan": False,
               "plan_temperature": 1.0},
    # 2026-12-02 sweep: CFG 7.5 with 25 DDIM steps the best (0.240); 50 steps no better at any scale
    "latents": {"cfg": 7.5, "image_temperature": 1.0, "image_top_k": 0, "image_top_p": 1.0, "cdk": False,
                "diffusion_steps": 25, "guidance_interval": None, "plausibility": 0.0, "patch_groups": 1, "plan": False,
                "plan_temperature": 1.0},
}
SWEEP_PRESET = {"geneval_prompts": 16, "images_per_prompt": 2}  # the sweep's prompt counts unless told otherwise
SAMPLING_FIELDS = ("cfg", "image_temperature", "image_top_k", "image_top_p", "cdk", "diffusion_steps", "guidance_interval",
                   "plausibility", "patch_groups", "plan", "plan_temperature")
# The sweep's grid per image mode (docs/eval.md): guidance scale x how codes are drawn / how many
# denoising steps.
SWEEP_GRID = {
    "tokens": [{"cfg": c, "image_temperature": t} for c in (1.0, 2.0, 3.0, 5.0, 7.5, 10.0) for t in (1.0, 0.7, 0.0)]
              + [{"cfg": 3.0, "image_temperature": 1.0, "image_top_k": 50}]
              + [{"cdk": True, "image_temperature": t} for t in (1.0, 0.0)]
              + [{"cfg": c, "image_temperature": 0.7, "plausibility": a} for c in (3.0, 7.5, 15.0) for a in (0.3, 0.5, 0.7)],
    "latents": [{"cfg": c, "diffusion_steps": n} for c in (1.0, 2.0, 3.0, 5.0, 7.5, 10.0) for n in (25, 50)],
}


def sampling(config, mode: str, model: dict | None = None) -> dict:
    """The text -> image sampling settings in effect: the config's (a ShapesEvalConfig, or any config with
    some of its sampling fields), else the model's own (its generation.yaml image_sampling, `model`), else
    the mode's defaults."""
    model = check_sampling(model or {}, "the model's generation.yaml image_sampling")
    return {k: (getattr(config, k) if getattr(config, k, None) is not None else model.get(k, SAMPLING_DEFAULTS[mode][k]))
            for k in SAMPLING_FIELDS}


def check_sampling(settings: dict, where: str) -> dict:
    """`settings` if its keys are sampling fields, else an EvalError naming `where` and the fields."""
    unknown = sorted(set(settings) - set(SAMPLING_FIELDS))
    if unknown:
        raise EvalError(f"{where}: unknown sampling setting(s) {unknown}; the settings are "
                        f"{', '.join(SAMPLING_FIELDS)}")
    return settings


def image_generation_config(engine, settings: dict):

    cdk = bool(settings.get("cdk")) and engine.mode == "tokens"
    return GenerationConfig(mode="image", max_images=1, max_new_tokens=engine.per_image + 2,
                            guidance=GuidanceConfig(scale=1.0 if cdk else settings["cfg"],
                                                    interval=settings.get("guidance_interval"),
                                                    plausibility=settings.get("plausibility") or 0.0),
                            contrastive=ContrastiveConfig() if cdk else None,
                            diffusion_steps=settings["diffusion_steps"], patch_groups=settings.get("patch_groups") or 1,
                            image=SamplingParams(temperature=settings["image_temperature"], top_k=settings["image_top_k"],
                                                 top_p=settings["image_top_p"]))


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says what to change."""


# --- the prompt sets: pure functions of (split, index) ------------------------------------------

def _world(config: ShapesEvalConfig, resolution: int, task: str):

    return ShapesConfig(resolution=resolution, min_objects=config.min_objects, max_objects=config.max_objects,
                        tasks=[task])


def documents(config: ShapesEvalConfig, resolution: int, task: str, split: str, n: int) -> list:

    world = _world(config, resolution, task)
    return [shapes_document(world, split, i) for i in range(n)]


def references(scene, index: int, k: int, seed: int = 0) -> list[str]:
    """k distinct captions of one scene from the caption grammar (COCO has 5 per image)."""

    out: list[str] = []
    for attempt in range(20 * k):
        text = caption(scene, np.random.default_rng([seed, index, attempt]))
        if text not in out:
            out.append(text)
            if len(out) == k:
                break
    return out


# --- the model's training compute ---------------------------------------------------------------

def training_compute(model_dir: Path) -> dict:
    """model/training.json (written by `mixmodal train`), else a note saying why it is unknown."""
    path = model_dir / TRAINING_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"flops": None, "note": f"{path} not found: the model was trained before mixmodal recorded its compute, "
                                   "or converted from elsewhere"}


# --- the runners --------------------------------------------------------------------------------

def _generate(engine, prompts: list, gen_config, batch_size: int, seeds: list[int], progress: Callable[[str], None],
              what: str):
    """Prompts in batches of batch_size; prompt i draws from seeds[i]."""
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        results += engine.generate(chunk, gen_config, seed=seeds[start:start + len(chunk)])
        progress(f"{what}: {min(start + batch_size, len(prompts))}/{len(prompts)}")
    return results


def _seeds(config: ShapesEvalConfig, n: int) -> list[int]:
    return [config.seed + i for i in range(n)]


def _mean_scores(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in ATTRIBUTES}


def text_to_image(engine, config: ShapesEvalConfig, resolution: int, split: str, progress) -> tuple[dict, list]:

    docs = documents(config, resolution, "caption", split, config.num_prompts)
    prompts = [d.metadata["caption"] for d in docs]
    gen = image_generation_config(engine, sampling(config, engine.mode, getattr(engine, "image_sampling", None)))
    results = _generate(engine, prompts, gen, config.batch_size, _seeds(config, len(prompts)), progress,
                        f"text->image {split}")
    rows, samples = [], []
    for i, (doc, result) in enumerate(zip(docs, results)):
        scene = Scene.from_dict(doc.metadata["scenes"][0])
        images = result.document.images
        s = score(images[0], scene) if images else {k: 0.0 for k in ATTRIBUTES}
        rows.append(s)
        samples.append({"index": i, "prompt": prompts[i], "image": images[0] if images else None,
                        "real": doc.images[0], "scores": s, "objects": len(scene.objects)})
    by_objects = {}
    for n in sorted({s["objects"] for s in samples}):
        by_objects[str(n)] = _mean_scores([r for r, s in zip(rows, samples) if s["objects"] == n])
    return {"n": len(rows), **_mean_scores(rows), "by_objects": by_objects,
            "without_image": sum(1 for s in samples if s["image"] is None)}, samples


def write_plans(engine, prompts: list[str], batch_size: int, seeds: list[int], progress,
                temperature: float = 1.0) -> list[str]:
    """The `plan` setting's first stage: for each prompt, the full caption the model writes after
    "<prompt> Plan:" (at `temperature`; 1: its own distribution; up to the caption's closing full stop), as the
    world's plan documents lay it out (data/shapes/tasks.py). The image is then drawn for the prompt and
    "Plan: <that caption>"; guidance's unconditional stream drops both."""
    gen = GenerationConfig(mode="text", max_images=0, max_new_tokens=96, stop=["."],
                           text=SamplingParams(temperature=temperature))
    results = _generate(engine, [[p, PLAN_PREFIX.strip()] for p in prompts], gen, batch_size, seeds, progress, "plans")
    plans = []
    for r in results:
        text = " ".join(r.document.texts).strip()
        plans.append(text if text.endswith(".") else text + ".")
    return plans


def plan_meets(plan: str, prompt) -> float:
    """1.0 when the plan parses to a scene that meets the GenEval-form prompt (judged on the scene, not on
    pixels), else 0.0 (a plan the caption grammar cannot read included)."""
    try:
        scene = parse_caption(plan)
    except (CaptionParseError, ValueError):
        return 0.0
    return float(judge(prompt, scene_things(scene))[0])


def geneval(engine, config: ShapesEvalConfig, prompt_set: str, progress, settings: dict | None = None,
            keep_images: bool = True) -> tuple[dict, dict]:
    """GenEval-form accuracy on one prompt set (heldout, heldout-combos or validation): per
    category the fraction of images that meet their prompt, and overall = their mean.
    Image j of prompt i of a category is drawn with seed `config.seed + 1000 * i + j`."""

    settings = settings or sampling(config, engine.mode, getattr(engine, "image_sampling", None))
    gen = image_generation_config(engine, settings)
    k = config.images_per_prompt
    metrics: dict[str, Any] = {"prompt_set": prompt_set, "images_per_prompt": k, "categories": {}}
    samples: dict[str, list] = {}
    for category in categories_of(prompt_set):
        n = config.geneval_prompts or GENEVAL_PROMPTS[category]
        prompts = make_prompts(category, prompt_set, n)
        jobs = [(i, j) for i in range(n) for j in range(k)]
        texts, seeds = [prompts[i].text for i, _ in jobs], [config.seed + 1000 * i + j for i, j in jobs]
        plans = write_plans(engine, texts, config.batch_size, seeds, progress,
                            settings.get("plan_temperature", 1.0)) if settings.get("plan") else None
        inputs = [[t, PLAN_PREFIX + p] for t, p in zip(texts, plans)] if plans else texts
        results = _generate(engine, inputs, gen, config.batch_size, seeds, progress, f"geneval {prompt_set} {category}")
        rows = []
        for n_job, ((i, j), result) in enumerate(zip(jobs, results)):
            images = result.document.images
            verdict = score_image(images[0], prompts[i]) if images else {"correct": 0.0, "reasons": ["no image"]}
            rows.append({"prompt": prompts[i].text, "prompt_index": i, "seed_index": j,
                         "image": images[0] if images and keep_images else None, **verdict,
                         **({"plan": plans[n_job], "plan_correct": plan_meets(plans[n_job], prompts[i])}
                            if plans else {})})
        accuracy = float(np.mean([r["correct"] for r in rows])) if rows else float("nan")
        metrics["categories"][category] = {"accuracy": accuracy, "prompts": n, "images": len(rows),
                                           "distinct_prompts": len({p.text for p in prompts})}
        if plans:  # how often the written plan itself meets the prompt: the text side's share of the result
            metrics["categories"][category]["plan_accuracy"] = float(np.mean([r["plan_correct"] for r in rows]))
        samples[category] = rows
    accuracies = [m["accuracy"] for m in metrics["categories"].values()]
    metrics["overall"] = float(np.mean(accuracies)) if accuracies else float("nan")
    if settings.get("plan") and metrics["categories"]:
        metrics["plan_overall"] = float(np.mean([m["plan_accuracy"] for m in metrics["categories"].values()]))
    metrics["sampling"] = settings
    return metrics, samples


def geneval_scores(bundle: Bundle, config: ShapesEvalConfig, prompt_sets: list[str]) -> dict[str, float]:
    """GenEval-form accuracy of a model in memory (training's eval.geneval_*, train/fusion.py), flat:
    geneval_SET_overall and geneval_SET_CATEGORY for each prompt set, without images kept."""
    engine = Engine.from_bundle(bundle)
    out: dict[str, float] = {}
    for prompt_set in prompt_sets:
        metrics, _ = geneval(engine, config, prompt_set, lambda message: None, keep_images=False)
        key = "geneval_" + prompt_set.replace("-", "_")
        out[f"{key}_overall"] = metrics["overall"]
        out.update({f"{key}_{c}": m["accuracy"] for c, m in metrics["categories"].items()})
    return out


def captioning(engine, config: ShapesEvalConfig, resolution: int, progress) -> tuple[dict, list, dict]:

    docs = documents(config, resolution, "caption", "heldout", config.num_captions)
    gen = GenerationConfig(mode="text", max_images=0, max_new_tokens=64, text=SamplingParams(temperature=0.0))
    results = _generate(engine, [[d.images[0]] for d in docs], gen, config.batch_size, _seeds(config, len(docs)),
                        progress, "captioning")
    candidates = [" ".join(r.document.texts).strip() for r in results]
    refs = [references(Scene.from_dict(d.metadata["scenes"][0]), i, config.num_references, config.seed)
            for i, d in enumerate(docs)]
    cider, per_item = cider_d(candidates, refs)
    b = bleu(candidates, refs)
    parsed_rows = []
    for cand, doc in zip(candidates, docs):
        truth = Scene.from_dict(doc.metadata["scenes"][0])
        try:
            parsed_rows.append(score_scenes(parse_caption(cand), truth))
        except (CaptionParseError, ValueError):
            parsed_rows.append({k: 0.0 for k in ATTRIBUTES})
    metrics = {"n": len(docs), "cider": cider, "bleu4": b["bleu4"],
               "bleu": {k: b[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")},
               "oracle": _mean_scores(parsed_rows),
               "parsable": float(np.mean([_parsable(c) for c in candidates])) if candidates else float("nan")}
    examples = [{"image": d.images[0], "caption": c, "references": r, "cider": s}
                for d, c, r, s in zip(docs, candidates, refs, per_item)]
    return metrics, examples, {"candidates": candidates, "references": refs}


def _parsable(text: str) -> bool:

    try:
        parse_caption(text)
        return True
    except (CaptionParseError, ValueError):
        return False


def vqa(engine, config: ShapesEvalConfig, resolution: int, progress) -> tuple[dict, list]:

    docs = documents(config, resolution, "vqa", "heldout", config.num_vqa)
    prompts = [[f"Question: {d.metadata['question']}", d.images[0], "Answer:"] for d in docs]
    gen = GenerationConfig(mode="text", max_images=0, max_new_tokens=12, text=SamplingParams(temperature=0.0))
    results = _generate(engine, prompts, gen, config.batch_size, _seeds(config, len(prompts)), progress, "vqa")
    predictions = [" ".join(r.document.texts).strip() for r in results]
    answers = [d.metadata["answer"] for d in docs]
    types = [d.metadata["question_type"] for d in docs]
    metrics = vqa_accuracy(predictions, answers, types)
    examples = [{"image": d.images[0], "question": d.metadata["question"], "answer": a, "prediction": p}
                for d, a, p in zip(docs, answers, predictions)]
    return metrics, examples


@torch.no_grad()
def perplexity(engine, config: ShapesEvalConfig, resolution: int, progress) -> dict:
    """Mean next-token cross-entropy over the text tokens of held-out caption and VQA documents,
    packed as in training (captions before their images, no CM3), images clean (latent mode: t = 0)."""

    model = engine.model
    world = _world(config, resolution, "caption")
    world.tasks = ["caption:3", "vqa:1"]
    pipeline = PipelineConfig(seq_len=engine.max_length or 512, caption_first_prob=1.0)
    encoder = DocumentEncoder(engine.text_tokenizer, engine.image_tokenizer, engine.vocab, engine.mode, engine.device)
    batches = FusionBatches(lambda: ShapesSource(world, split="heldout", num=config.num_ppl), encoder, pipeline,
                            config.batch_size // 4 or 1, engine.per_image, seed=config.seed, endless=False, training=False)
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        kwargs = dict(positions=batch["positions"], document_ids=batch["document_ids"],
                      image_ids=batch["image_ids"] if model.config.image.is_bidirectional else None)
        if engine.mode == "latents" and batch["image_latents"].numel():
            x0 = batch["image_latents"]
            kwargs.update(image_latents=x0, image_times=torch.zeros(x0.shape[0], device=x0.device),
                          image_index=batch["image_index"])
        logits = model(batch["input_ids"], **kwargs).logits.float()
        labels = batch["labels"]
        text = (labels != IGNORE) & ~engine.vocab.is_image_code(labels)
        ce = torch.nn.functional.cross_entropy(logits[text], labels[text], reduction="sum")
        total += float(ce)
        count += int(text.sum())
    progress(f"perplexity: {count} text tokens")
    mean = total / max(count, 1)
    return {"text_ce": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count, "documents": config.num_ppl}


def image_batches(images: list, resolution: int, batch: int = 64):

    for start in range(0, len(images), batch):
        yield (images_to_tensor(images[start:start + batch], resolution) + 1) / 2  # [-1, 1] -> [0, 1]


def fid_reference(config: ShapesEvalConfig, resolution: int, split: str, n: int, offset: int) -> list:
    """Renders of n scenes of a split from index `offset` on (not the prompts' own scenes)."""

    world = ShapesConfig(resolution=resolution, min_objects=config.min_objects, max_objects=config.max_objects)
    return [render(sample_scene(world, split, offset + i), resolution) for i in range(n)]


REAL_OFFSET, FLOOR_OFFSET = 100_000, 200_000


def fid(extractor, generated: list, config: ShapesEvalConfig, resolution: int, split: str) -> dict:
    """FID of the generated images against renders of num_fid_real other scenes of the split, and
    its floor: the FID of as many renders of yet other scenes of the split as there are generated
    images, against the same reference set (what a perfect generator scores with this few samples)."""

    real = fid_reference(config, resolution, split, config.num_fid_real, REAL_OFFSET)
    real_stats = feature_stats(extractor, image_batches(real, resolution), "real")
    fake_stats = feature_stats(extractor, image_batches(generated, resolution), "generated")
    floor = fid_reference(config, resolution, split, len(generated), FLOOR_OFFSET)
    floor_stats = feature_stats(extractor, image_batches(floor, resolution), "floor")
    value = frechet_distance(real_stats.mean, real_stats.cov, fake_stats.mean, fake_stats.cov)
    floor_value = frechet_distance(real_stats.mean, real_stats.cov, floor_stats.mean, floor_stats.cov)
    note = None
    if min(real_stats.n, fake_stats.n) < extractor.dim:
        note = (f"{fake_stats.n} generated images for {extractor.dim}-d features: the covariance is singular and "
                "FID is biased upwards; compare FIDs only at the same number of images (the floor shows the bias)")
    return {"fid": value, "floor": floor_value, "n_real": real_stats.n, "n_fake": fake_stats.n,
            "features": extractor.name, "comparable": extractor.comparable, "note": note}

