"""`mixmodal generate` and its Python twin `mixmodal.generate(...)`: one call from a checkpoint
and a prompt to saved documents (documents.jsonl + PNGs + index.html, see output.py).

    mixmodal generate runs/small-tokens --prompt "two red circles" --mode interleaved --cfg 3 --seed 0 --out gen/

    results = mixmodal.generate("runs/small-tokens", "two red circles", mode="image", cfg=3.0, seed=0, out="gen/")

Prompt images come first in the prompt, then the text (as an image-first training
document: the text is about the image - a question, a caption to continue, an edit).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from mixmodal.config import build_config, to_dict
from mixmodal.documents import Document, Text
from mixmodal.inference.config import GenerationConfig
from mixmodal.inference.events import End, Event, GenerationResult
from mixmodal.inference.output import GenerationFiles, save_generation
from mixmodal.inference.prompt import load_prompt_image

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Generated:
    results: list[GenerationResult]  # one per prompt x sample, prompts outer
    files: GenerationFiles | None  # what was saved (out given)
    seconds: float


def generation_config(*, mode: str | None = None, cfg: float | None = None, image_cfg: float | None = None,
                      steps: int | None = None, max_new_tokens: int | None = None, max_images: int | None = None,
                      temperature: float | None = None, overrides: Sequence[str] = ()) -> GenerationConfig:
    """Defaults <- the named arguments <- `key=value` overrides (e.g. `image.top_k=100`)."""
    flags = []
    for key, value in (("mode", mode), ("guidance.scale", cfg), ("guidance.image_scale", image_cfg),
                       ("diffusion_steps", steps), ("max_new_tokens", max_new_tokens), ("max_images", max_images),
                       ("text.temperature", temperature), ("image.temperature", temperature)):
        if value is not None:
            flags.append(f"{key}={value}")
    return build_config(GenerationConfig, None, [*flags, *overrides])


def generate(checkpoint: str | os.PathLike, prompt: str | Sequence[str] = "", *, images: Sequence[str | os.PathLike] = (),
             mode: str | None = None, cfg: float | None = None, image_cfg: float | None = None, seed: int = 0,
             num: int = 1, steps: int | None = None, max_new_tokens: int | None = None, max_images: int | None = None,
             temperature: float | None = None, overrides: Sequence[str] = (), out: str | os.PathLike | None = None,
             device: str = "cpu", dtype: str = "fp32", on_event: Callable[[Event], None] | None = None,
             ) -> Generated:
    """Generate `num` samples of each prompt; document i (prompts outer) draws from seed + i. Saved under `out` if given."""
    from mixmodal.inference.checkpoint import load_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = generation_config(mode=mode, cfg=cfg, image_cfg=image_cfg, steps=steps, max_new_tokens=max_new_tokens,
                               max_images=max_images, temperature=temperature, overrides=overrides)
    prompt_images = [load_prompt_image(p) for p in images]  # unreadable files fail before the model loads
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    engine = load_checkpoint(checkpoint, device=device, dtype=DTYPES[dtype],
                             require_image_tokenizer=config.mode != "text" or bool(prompt_images))
    prompts = [Document([*prompt_images, *([Text(t)] if t else [])]) for t in texts for _ in range(num)]
    seeds = [seed + i for i in range(len(prompts))]  # document i (prompts outer, samples inner): seed + i
    started = time.perf_counter()
    results: dict[int, GenerationResult] = {}
    for event in engine.stream(prompts, config, seed=seeds):
        if on_event is not None:
            on_event(event)
        if isinstance(event, End):
            results[event.index] = event.result
    elapsed = time.perf_counter() - started
    ordered = [results[i] for i in range(len(prompts))]
    for result, s in zip(ordered, seeds):
        result.document.metadata["seed"] = s
    files = None
    if out is not None:
        settings = {"checkpoint": str(checkpoint), "model": engine.mode, **_flat(to_dict(config)),
                    "seconds": round(elapsed, 2), "dtype": dtype, "device": device}
        files = save_generation([r.document for r in ordered], out, prompts=prompts, settings=settings)
    return Generated(ordered, files, elapsed)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["DTYPES", "Generated", "generate", "generation_config"]
