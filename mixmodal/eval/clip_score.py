"""CLIP score of image-caption pairs with mixmodal's dual encoder (retrieval/encoder.py).

    clip_score(embedder, images, texts)   per pair 100 * max(cos(image, text), 0); their mean

The definition is the one torchmetrics' CLIPScore documents: CLIP-S of Hessel et al. 2021
("CLIPScore: A Reference-free Evaluation Metric for Image Captioning"), w * max(cos, 0), with
w = 100 instead of the paper's 2.5. Two differences from torchmetrics (1.9) to know when
comparing numbers:

- torchmetrics' CLIPScore module clamps the mean of the raw cosines, max(mean(100 cos), 0);
  here each pair is clamped first, as the formula says. They agree whenever no pair has a
  negative cosine (the usual case for a trained CLIP).
- texts longer than the encoder's text.max_length are truncated with the end token kept
  (DocumentEmbedder.tokenize); torchmetrics cuts the token row, dropping it.

Images go through DocumentEmbedder.embed_images: centre-cropped to a square, then resized to
vision.image_size (bicubic); transformers' CLIPProcessor resizes the short side first, then
crops, so the pixels (and the scores) are the same for images already at the model's
resolution. tests/test_clip_score.py checks the scores against torchmetrics on a converted
transformers CLIP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import PIL.Image

    from mixmodal.retrieval.document_embedder import DocumentEmbedder

CLIP_SCORE_WEIGHT = 100.0  # torchmetrics' scale; Hessel et al. use 2.5


def clip_score(embedder: "DocumentEmbedder", images: Sequence["PIL.Image.Image"], texts: Sequence[str],
               batch_size: int = 64) -> dict:
    """CLIP score of (images[i], texts[i]) for every i.

    embedder: a DocumentEmbedder (DocumentEmbedder.from_pretrained(DIR): a dual-encoder run's
    encoder, or `mixmodal convert hf-clip` output); anything with embed_images / embed_texts
    returning L2-normalised (N, E) rows works.

    -> {"clip_score": mean of the per-pair scores, "scores": [100 * max(cos, 0) per pair], "n": N}"""
    import PIL.Image

    for name, value in (("images", images), ("texts", texts)):
        if isinstance(value, (str, PIL.Image.Image)):
            raise ValueError(f"clip_score: {name} is a single {type(value).__name__}; pass a list with one entry "
                             "per pair")
    if len(images) != len(texts):
        raise ValueError(f"clip_score: {len(images)} images but {len(texts)} texts; pass one caption per image, "
                         "in the same order")
    if not images:
        raise ValueError("clip_score: no pairs to score (images and texts are empty)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"clip_score: batch_size must be a positive integer, got {batch_size!r}")
    for i, (image, text) in enumerate(zip(images, texts)):
        if not isinstance(image, PIL.Image.Image):
            hint = (" (a tensor in [-1, 1]: mixmodal.tokenizers.pixels.tensor_to_images converts a batch)"
                    if hasattr(image, "shape") else "")
            raise ValueError(f"clip_score: images[{i}] is {type(image).__name__}, not a PIL image{hint}")
        if not isinstance(text, str):
            raise ValueError(f"clip_score: texts[{i}] is {type(text).__name__}, not a string")
    image_embeds = np.asarray(embedder.embed_images(list(images), batch_size=batch_size), dtype=np.float64)  # (N, E)
    text_embeds = np.asarray(embedder.embed_texts(list(texts), batch_size=batch_size), dtype=np.float64)  # (N, E)
    if image_embeds.shape != text_embeds.shape or image_embeds.shape[0] != len(images):
        raise ValueError(f"clip_score: the embedder returned {image_embeds.shape} image and {text_embeds.shape} text "
                         f"embeddings for {len(images)} pairs; expected two (N, E) arrays")
    cosines = (image_embeds * text_embeds).sum(axis=1)  # rows are unit vectors: the dot product is the cosine
    scores = CLIP_SCORE_WEIGHT * np.maximum(cosines, 0.0)
    return {"clip_score": float(scores.mean()), "scores": scores.tolist(), "n": len(scores)}


__all__ = ["CLIP_SCORE_WEIGHT", "clip_score"]
