"""Dataset statistics: what a source holds, and how many text tokens it makes."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from mixmodal.documents import Document, Image, Text


def dataset_stats(docs: Iterable[Document], tokenizer=None) -> dict:
    """Count documents, parts, layouts, tasks, image sizes and text length (in characters
    and, given a TextTokenizer, in tokens)."""
    num_docs = num_images = num_texts = 0
    layouts: Counter = Counter()
    tasks: Counter = Counter()
    image_sizes: Counter = Counter()
    chars, tokens, vocabulary = [], [], set()
    for doc in docs:
        num_docs += 1
        layouts[" ".join("T" if isinstance(p, Text) else "I" for p in doc.parts)] += 1
        tasks[str(doc.metadata.get("task", "-"))] += 1
        texts = [p.text for p in doc.parts if isinstance(p, Text)]
        num_texts += len(texts)
        for p in doc.parts:
            if isinstance(p, Image):
                num_images += 1
                image_sizes["x".join(map(str, p.image.size))] += 1
        chars.append(sum(len(t) for t in texts))
        for t in texts:
            vocabulary.update(t.lower().split())
        if tokenizer is not None:
            tokens.append(sum(len(ids) for ids in tokenizer.encode_batch(texts)) if texts else 0)
    stats = {
        "documents": num_docs,
        "images": num_images,
        "text_parts": num_texts,
        "layouts": dict(layouts.most_common()),
        "tasks": dict(tasks.most_common()),
        "image_sizes": dict(image_sizes.most_common()),
        "text_chars_per_doc": _summary(chars),
        "distinct_words": len(vocabulary),
    }
    if tokenizer is not None:
        stats["text_tokens_per_doc"] = _summary(tokens)
        stats["text_tokens_total"] = int(sum(tokens))
        stats["chars_per_token"] = round(sum(chars) / max(1, sum(tokens)), 3)
    return stats


def _summary(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "min": 0, "p50": 0, "max": 0}
    a = np.asarray(values)
    return {"mean": round(float(a.mean()), 2), "min": int(a.min()), "p50": int(np.median(a)), "max": int(a.max())}


def format_stats(stats: dict) -> str:
    """A readable multi-line report of `dataset_stats`."""
    lines = []
    for key, value in stats.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}: {v}" for k, v in value.items())
            lines.append(f"  {key:<22} {inner}")
        else:
            lines.append(f"  {key:<22} {value}")
    return "\n".join(lines)
