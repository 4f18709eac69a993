"""`mixmodal generate` and its Python twin `mixmodal.generate(...)`: one call from a checkpoint
and a prompt to saved documents (documents.jsonl + PNGs + index.html, see output.py).

    mixmodal generate runs/small-tokens --prompt "two red circles" --mode interleaved --cfg 3 --seed 0 --out gen/

    results = mixmodal.generate("runs/small-tokens", "two red circles", mode="image", cfg=3.0, seed=0, out="gen/")

Prompt images come first in the prompt, then the text (as an image-first training
document: the text is about the image - a question, a caption to continue, an edit).

Retrieval (CM3Leon): `retrieve=k` prepends the k documents a memory bank selects for each
prompt (`index`, default: the bank a retrieval-augmented model was trained with).
Re-ranking: `best_of=n` samples n candidates per output document (token mode: half top-p,
half CD-K) and keeps the best by `rerank` - "clip" (the dual encoder's text-image cosine,
as CM3Leon re-ranks with CLIP) or "oracle" (the shapes world's exact score).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mixmodal.config import build_config, to_dict
from mixmodal.documents import Document, Text
from mixmodal.flags import GENERATION_FLAGS, flag_overrides
from mixmodal.inference.config import GenerationConfig, image_sampling_overrides
from mixmodal.inference.engine import Engine
from mixmodal.inference.events import End, Event, GenerationResult
from mixmodal.inference.output import GenerationFiles, save_generation
from mixmodal.inference.prompt import load_prompt_image
# best_of renamed: generate() has a best_of argument
from mixmodal.inference.rerank import best_of as rank_candidates, clip_scorer, shapes_scorer
from mixmodal.model.bundle import BundleError, read_image_sampling, read_retrieval_settings
from mixmodal.retrieval.bank import MemoryBank
from mixmodal.retrieval.document_embedder import DocumentEmbedder
from mixmodal.retrieval.select import Retriever, SelectionConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Generated:
    results: list[GenerationResult]  # one per prompt x sample, prompts outer
    files: GenerationFiles | None  # what was saved (out given)
    seconds: float


def generation_config(*, overrides: Sequence[str] = (), image_sampling: dict | None = None,
                      **options) -> GenerationConfig:
    """Defaults <- the model's stated image sampling (`image_sampling`: its generation.yaml's, e.g. the token
    recipe's plausibility; what `mixmodal generate`, `mixmodal chat` and the server start from) <- the options
    (keywords of GENERATION_FLAGS, mixmodal/flags.py: mode, cfg, image_cfg, steps, max_new_tokens, max_images,
    temperature; None = not given) <- `key=value` overrides (e.g. `image.top_k=100`)."""
    flags = flag_overrides(GENERATION_FLAGS, options, "generation_config")
    return build_config(GenerationConfig, None, [*image_sampling_overrides(image_sampling), *flags, *overrides])


def generate(checkpoint: str | os.PathLike, prompt: str | Sequence[str] = "", *, images: Sequence[str | os.PathLike] = (),
             seed: int = 0, num: int = 1, overrides: Sequence[str] = (), out: str | os.PathLike | None = None,
             device: str = "cpu", dtype: str = "fp32", on_event: Callable[[Event], None] | None = None,
             retrieve: int = 0, index: str | os.PathLike | None = None, encoder: str | os.PathLike | None = None,
             best_of: int = 1, rerank: str = "clip", compile: bool = False, **options) -> Generated:
    """Generate `num` samples of each prompt; document i (prompts outer) draws from seed + i
    (with best_of=n, its candidates from (seed + i) * n + j). Saved under `out` if given.
    `options` set the generation config as `mixmodal generate`'s flags do (GENERATION_FLAGS:
    mode, cfg, image_cfg, steps, max_new_tokens, max_images, temperature); `overrides` go on top. Both go over
    the sampling the model's generation.yaml states (image_sampling, e.g. the token recipe's plausibility).
    `compile`: decoding through compiled blocks (inference/compiled.py; the first call compiles)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    stated = image_sampling_overrides(read_image_sampling(checkpoint))
    config = build_config(GenerationConfig, None,
                          [*stated, *flag_overrides(GENERATION_FLAGS, options, "generate"), *overrides])
    prompt_images = [load_prompt_image(p) for p in images]  # unreadable files fail before the model loads
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    if rerank not in ("clip", "oracle"):
        raise ValueError(f"rerank must be clip or oracle, got {rerank!r}")
    engine = Engine.from_pretrained(checkpoint, device=device, dtype=DTYPES[dtype],
                                    require_image_tokenizer=config.mode != "text" or bool(prompt_images),
                                    compile=compile)
    prompts = [Document([*prompt_images, *([Text(t)] if t else [])]) for t in texts for _ in range(num)]
    seeds = [seed + i for i in range(len(prompts))]  # document i (prompts outer, samples inner): seed + i
    retriever = open_retriever(checkpoint, index, encoder, retrieve, device) if retrieve > 0 else None
    context = retriever.retrieve_documents(prompts) if retriever is not None else None
    started = time.perf_counter()
    if best_of > 1:
        ordered = _best_of(engine, prompts, config, seeds, context, best_of,
                           _scorer(rerank, checkpoint, encoder, index, retriever, device), on_event)
    else:
        results: dict[int, GenerationResult] = {}
        for event in engine.stream(prompts, config, seed=seeds, context=context):
            if on_event is not None:
                on_event(event)
            if isinstance(event, End):
                results[event.index] = event.result
        ordered = [results[i] for i in range(len(prompts))]
    elapsed = time.perf_counter() - started
    for k, (result, s) in enumerate(zip(ordered, seeds)):
        result.document.metadata["seed"] = s
        if context is not None:
            result.document.metadata["retrieved"] = [" ".join(d.texts) for d in context[k]]
    files = None
    if out is not None:
        settings = {"checkpoint": str(checkpoint), "model": engine.mode, **_flat(to_dict(config)),
                    "seconds": round(elapsed, 2), "dtype": dtype, "device": device}
        if retriever is not None:
            settings.update(retrieve=retrieve, index=str(retriever.bank.path))
        if best_of > 1:
            settings.update(best_of=best_of, rerank=rerank)
        files = save_generation([r.document for r in ordered], out, prompts=prompts, settings=settings)
    return Generated(ordered, files, elapsed)


def open_retriever(checkpoint, index, encoder, k: int, device: str = "cpu"):
    """The memory bank for `retrieve=k`: `index`, else the one the model was trained with."""
    trained = read_retrieval_settings(checkpoint) or {}
    index = index or trained.get("index")
    if not index:
        raise BundleError(f"retrieve={k} needs a memory bank: pass --index INDEX (`mixmodal index build`); "
                          f"{checkpoint} was not trained with retrieval, so it names none")
    return Retriever.open(index, SelectionConfig(k=k, query_dropout=0.0), encoder=encoder or trained.get("encoder") or None,
                          device=device)


def _scorer(rerank: str, checkpoint, encoder, index, retriever, device: str):
    """prompt Document -> (generated Document -> score)."""
    if rerank == "oracle":
        return lambda prompt: shapes_scorer(" ".join(prompt.texts))
    if retriever is not None and encoder is None:
        embedder = retriever.embedder
    else:
        trained = read_retrieval_settings(checkpoint) or {}
        path = encoder or trained.get("encoder")
        if not path and (index or trained.get("index")):
            path = MemoryBank.open(index or trained["index"]).encoder_path
        if not path:
            raise BundleError("rerank=clip needs a dual encoder: pass --encoder DIR (`mixmodal train "
                              "configs/retrieval/dual-encoder-shapes-32.yaml`), or --rerank oracle on shapes prompts")
        embedder = DocumentEmbedder.from_pretrained(path, device=device)
    return lambda prompt: clip_scorer(embedder, " ".join(prompt.texts))


def _best_of(engine, prompts, config, seeds, context, n: int, scorer_for, on_event) -> list[GenerationResult]:
    ordered = []
    for k, (prompt, s) in enumerate(zip(prompts, seeds)):
        ranked = rank_candidates(engine, prompt, config, n, scorer_for(prompt), seed=s * n,
                         context=context[k] if context is not None else None)
        best = ranked[0]
        best.index = k
        best.document.metadata["candidates"] = [round(r.score, 4) for r in ranked]
        if on_event is not None:
            on_event(End(k, best))
        ordered.append(best)
    return ordered


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["DTYPES", "Generated", "generate", "generation_config"]
