"""Best-of-N with re-ranking (CM3Leon): half the candidates by nucleus (top-p) sampling, half
by CD-K contrastive decoding, all in one batch, then sorted by a scorer.

    best = best_of(engine, "two red circles", GenerationConfig(mode="image"), n=8,
                   scorer=lambda doc: clip_score(doc, prompt))[0]

The scorer takes the generated Document and returns a float, higher is better (CM3Leon uses
CLIP: `clip_scorer` with mixmodal's dual encoder; on the shapes world the oracle's score
against the prompt's scene is exact, see `shapes_scorer`). Candidate k draws from seed + k.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from mixmodal.documents import Document, Image
from mixmodal.inference.config import ContrastiveConfig, GenerationConfig
from mixmodal.inference.events import GenerationResult
from mixmodal.inference.prompt import PromptLike


def best_of(engine, prompt: PromptLike, config: GenerationConfig, n: int, scorer: Callable[[Document], float], *,
            seed: int = 0, top_p: float = 0.9, contrastive: ContrastiveConfig | None = None,
            context: Sequence[Document] | None = None) -> list[GenerationResult]:
    """n candidates (n // 2 top-p, the rest CD-K; token mode) sorted best first; each has `.score`.
    A latent-mode model has no codes to contrast: all n are then sampled with `config` as given.
    `context`: retrieved documents laid out before the prompt (Engine.stream)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    nucleus = dataclasses.replace(config, image=dataclasses.replace(config.image, top_p=top_p), contrastive=None)
    configs = [nucleus] * n
    if engine.mode == "tokens":
        cd = dataclasses.replace(config, contrastive=contrastive or config.contrastive or ContrastiveConfig())
        configs = [nucleus] * (n // 2) + [cd] * (n - n // 2)
    results = engine.generate([prompt] * n, configs, seed=[seed + k for k in range(n)],
                              context=[list(context)] * n if context else None)
    for result, c in zip(results, configs):
        result.score = float(scorer(result.document))
        result.document.metadata["score"] = result.score
        result.document.metadata["sampling"] = "cd-k" if c.contrastive is not None else f"top-p {top_p}"
    return sorted(results, key=lambda r: -r.score)


def shapes_scorer(caption: str) -> Callable[[Document], float]:
    """The shapes oracle's overall score of a document's first image against the scene a caption describes."""
    from mixmodal.data.shapes import parse_caption, score  # late: it brings scipy (~0.4 s); rerank=oracle only

    scene = parse_caption(caption)

    def scorer(doc: Document) -> float:
        images = [p.image for p in doc.parts if isinstance(p, Image)]
        return float(score(images[0], scene)["overall"]) if images else 0.0

    return scorer


def clip_scorer(embedder, caption: str) -> Callable[[Document], float]:
    """Cosine similarity of the dual encoder's embeddings of `caption` and of a document's first
    image (CM3Leon re-ranks its samples with CLIP); `embedder` is a retrieval.DocumentEmbedder."""
    text = embedder.embed_texts([caption])[0]

    def scorer(doc: Document) -> float:
        images = [p.image for p in doc.parts if isinstance(p, Image)]
        return float(embedder.embed_images(images[:1])[0] @ text) if images else -1.0

    return scorer


__all__ = ["best_of", "clip_scorer", "shapes_scorer"]
