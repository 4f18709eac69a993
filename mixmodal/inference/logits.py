"""Turning a row of logits into the next id: masks, guidance, CD-K, penalties, sampling.

All functions take float32 logits of one sequence ([V]) and a boolean `allowed` [V];
an id outside `allowed` is never returned, whatever the settings. Each sequence draws
from its own `torch.Generator`, so a batch samples exactly what its sequences would
sample one by one.
"""

from __future__ import annotations

import math

import torch

from mixmodal.inference.config import ContrastiveConfig, SamplingParams

NEG_INF = float("-inf")


def masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return logits.float().masked_fill(~allowed, NEG_INF).log_softmax(-1)


def guide(streams: list[torch.Tensor], scale: float, image_scale: float | None) -> torch.Tensor:
    """Classifier-free guidance over stream outputs (logits as log-probs, or latent predictions).

    [cond]                -> cond
    [cond, uncond]        -> uncond + scale * (cond - uncond)
    [cond, image, uncond] -> uncond + image_scale * (image - uncond) + scale * (cond - image)"""
    if len(streams) == 1:
        return streams[0]
    if len(streams) == 2:
        cond, uncond = streams
        return uncond + scale * (cond - uncond)
    cond, image, uncond = streams
    return uncond + image_scale * (image - uncond) + scale * (cond - image)


def guided_scores(streams: list[torch.Tensor], allowed: torch.Tensor, scale: float,
                  image_scale: float | None, plausibility: float = 0.0) -> torch.Tensor:
    """Guidance on log-probabilities (as transformers' CFG processor), restricted to `allowed`, and with
    `plausibility` > 0 to the ids whose conditional (first stream) probability is >= plausibility x its
    largest (GuidanceConfig.plausibility)."""
    logps = [masked_log_softmax(s, allowed) for s in streams]
    if len(logps) == 1:
        return logps[0]
    if plausibility > 0:
        allowed = allowed & (logps[0] >= logps[0].max() + math.log(plausibility))
    finite = [lp.masked_fill(~allowed, 0.0) for lp in logps]  # -inf - -inf would be NaN
    return guide(finite, scale, image_scale).masked_fill(~allowed, NEG_INF)


def contrastive_scores(expert: torch.Tensor, amateur: torch.Tensor, allowed: torch.Tensor,
                       config: ContrastiveConfig) -> torch.Tensor:
    """CD-K: log p_expert - log p_amateur on the plausible set {p_expert >= alpha * kth-largest p_expert}."""
    pe = masked_log_softmax(expert, allowed)
    pa = masked_log_softmax(amateur, allowed).masked_fill(~allowed, 0.0)
    k = min(config.k, int(allowed.sum()))
    kth = pe.topk(k).values[-1]
    plausible = allowed & (pe >= kth + math.log(config.alpha))
    return (pe.masked_fill(~allowed, 0.0) - pa).masked_fill(~plausible, NEG_INF)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / transformers: a seen id's logit is divided by `penalty` if positive, multiplied if negative."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    seen = seen.unique()
    values = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def sample(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator, *,
           truncate: bool = True) -> int:
    """Temperature, then top-k and top-p (unless `truncate` is False, as for CD-K scores), then a
    draw from `generator`; temperature 0 takes the argmax. `scores` is -inf outside the allowed ids."""
    scores = scores.float()
    if params.temperature == 0:
        return int(scores.argmax())
    scores = scores / params.temperature
    if truncate and params.top_k:
        k = min(params.top_k, scores.shape[-1])
        kth = scores.topk(k).values[-1]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if truncate and params.top_p < 1.0:
        ordered, order = scores.sort(descending=True)
        probs = ordered.softmax(-1)
        # drop an id when the ids ranked above it already hold top_p of the mass (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        scores = scores.scatter(0, order, ordered.masked_fill(drop, NEG_INF))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


__all__ = ["contrastive_scores", "guide", "guided_scores", "masked_log_softmax", "repetition_penalty", "sample"]
