"""Who may attend to whom inside a packed row, and the attention call that obeys it.

A training row packs several documents; each position carries two labels:

    document_ids [B, T]  which document of the row it belongs to (-1: padding)
    image_ids    [B, T]  which bidirectional image block it belongs to (-1: none)

and a query q may see a key k iff they are in the same document and either k comes
no later than q (causal) or both lie in the same image block (bidirectional inside an
image: always in latent mode, optional in token mode). A padding query sees only
itself, so no softmax row is empty (empty rows would give NaN).

Two implementations of the same rule:
- `dense_mask`: the boolean [B, Tq, Tk] reference, written as plainly as possible;
- `AttentionMask.build(...)` -> `.attend(q, k, v)`: the fast path. A row that is one
  causal document with no image block takes SDPA's `is_causal` kernel; otherwise SDPA
  with the boolean mask, or a FlexAttention block mask on CUDA (`backend="flex"`, or
  "auto" there), which skips whole blocks that are masked out. Training through
  torch.compile on a CPU, a causal mask (one document, or packed documents without
  image blocks) takes `banded_attention`: a band of queries at a time against only the
  keys up to the band's end, which inductor fuses; its backward is 1.3-1.9x faster
  than SDPA's CPU flash backward at head dim 32, and FlexAttention has no CPU backward.
The tests check the fast paths against `reference_attention(dense_mask(...))`.

Queries may be a suffix of the keys (a KV cache): `query_offset` is the index of the first
query among the keys; key labels default to the query labels when Tq == Tk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "sdpa", "flex", "reference"]


def dense_mask(
    document_ids: torch.Tensor,
    image_ids: torch.Tensor,
    *,
    key_document_ids: torch.Tensor | None = None,
    key_image_ids: torch.Tensor | None = None,
    query_offset: int = 0,
) -> torch.Tensor:
    """Boolean [B, Tq, Tk]: True where query q may attend to key k."""
    kdoc = document_ids if key_document_ids is None else key_document_ids
    kimg = image_ids if key_image_ids is None else key_image_ids
    tq, tk = document_ids.shape[1], kdoc.shape[1]
    qi = torch.arange(tq, device=document_ids.device)[:, None] + query_offset
    ki = torch.arange(tk, device=document_ids.device)[None, :]
    qdoc, qimg = document_ids[:, :, None], image_ids[:, :, None]
    kd, kim = kdoc[:, None, :], kimg[:, None, :]
    same_doc = (qdoc == kd) & (qdoc >= 0)
    same_image = (qimg == kim) & (qimg >= 0)
    allowed = same_doc & ((ki <= qi) | same_image)
    padding_self = (qdoc < 0) & (qi == ki)
    return allowed | padding_self


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention probabilities [B,H,Tq,Tk] in float32. q [B,H,Tq,D], k [B,Hkv,Tk,D] (GQA repeats k),
    mask [B,Tq,Tk]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    return scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """Plain softmax attention in float32. q [B,H,Tq,D], k/v [B,Hkv,Tk,D] (GQA repeats k/v), mask [B,Tq,Tk]."""
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return (attention_weights(q, k, mask, scale) @ v.float()).to(q.dtype)


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class AttentionMask:
    """The attention rule for one forward pass, prepared once and shared by every layer."""

    kind: Literal["causal", "dense", "flex", "full", "reference"]  # full: every query sees every key
    dense: torch.Tensor | None = None  # [B, 1, Tq, Tk] bool (kind dense/reference)
    block_mask: object | None = None  # FlexAttention BlockMask (kind flex)
    causal_band: bool = False  # kind dense: no key after its query (no image block, no cache)

    @classmethod
    def build(
        cls,
        document_ids: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        *,
        key_document_ids: torch.Tensor | None = None,
        key_image_ids: torch.Tensor | None = None,
        query_offset: int = 0,
        backend: Backend = "auto",
    ) -> "AttentionMask":
        if image_ids is None:
            image_ids = torch.full_like(document_ids, -1)
        if key_document_ids is not None and key_image_ids is None:
            key_image_ids = torch.full_like(key_document_ids, -1)
        cached = key_document_ids is not None or query_offset
        if backend == "reference":
            mask = dense_mask(document_ids, image_ids, key_document_ids=key_document_ids,
                              key_image_ids=key_image_ids, query_offset=query_offset)
            return cls("reference", dense=mask[:, None])
        if not cached and bool((document_ids == document_ids[:, :1]).all()) and bool((document_ids >= 0).all()) \
                and not bool((image_ids >= 0).any()):
            return cls("causal")  # one document per row, no image block: the plain causal kernel
        use_flex = backend == "flex" or (backend == "auto" and document_ids.is_cuda and _flex_available())
        if use_flex and not cached:
            return cls("flex", block_mask=_flex_block_mask(document_ids, image_ids))
        mask = dense_mask(document_ids, image_ids, key_document_ids=key_document_ids,
                          key_image_ids=key_image_ids, query_offset=query_offset)
        return cls("dense", dense=mask[:, None], causal_band=not cached and not bool((image_ids >= 0).any()))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
               scale: float | None = None) -> torch.Tensor:
        """q [B,H,Tq,D], k/v [B,Hkv,Tk,D] -> [B,H,Tq,D]."""
        gqa = q.shape[1] != k.shape[1]
        if self.kind == "reference":
            if dropout_p:
                raise ValueError("the reference attention has no dropout; use backend='sdpa' to train")
            return reference_attention(q, k, v, self.dense[:, 0], scale)
        if self.kind == "flex":
            if dropout_p:
                raise ValueError("FlexAttention has no attention dropout; set model.transformer.attention_dropout=0 "
                                 "or model.attention_backend=sdpa")
            return _flex_attention(q.is_cuda)(q, k, v, block_mask=self.block_mask, scale=scale, enable_gqa=gqa)
        if self._banded(q, k, dropout_p):
            return banded_attention(q, k, v, self.dense, scale=scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.dense, is_causal=self.kind == "causal", dropout_p=dropout_p, scale=scale,
            enable_gqa=gqa)

    def _banded(self, q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
        """Take `banded_attention`: a CPU training step traced by torch.compile, with a mask inside the causal band."""
        causal = self.kind == "causal" or (self.kind == "dense" and self.causal_band)
        return (causal and not dropout_p and q.device.type == "cpu" and q.requires_grad
                and q.shape[2] == k.shape[2] > BAND and torch.compiler.is_compiling())


BAND = 64  # queries per band in banded_attention (32 and 128 measured no better at T = 512)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
                     scale: float | None = None, band: int = BAND) -> torch.Tensor:
    """Causal attention one band of queries at a time, each against the keys up to the band's end only.

    q [B,H,T,D], k/v [B,Hkv,T,D]; `mask` [B,1,T,T] bool, inside the causal band (None: plain causal).
    A query head group shares its key head by broadcasting (no repeated k/v), and q and k are cast
    to float32 once: scores and softmax in float32, as SDPA's kernels accumulate. Under torch.compile
    each band's mask and softmax fuse into one loop, and the work above the diagonal is skipped band
    by band.
    """
    b, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    queries = (q.float() * scale).view(b, kv_heads, heads // kv_heads, length, dim)
    keys, values = k.float()[:, :, None], v[:, :, None]
    out = []
    for start in range(0, length, band):
        end = min(start + band, length)
        scores = queries[:, :, :, start:end] @ keys[..., :end, :].transpose(-1, -2)  # [B, Hkv, G, band, end]
        allowed = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(start)
        if mask is not None:
            allowed = allowed & mask[:, :, None, start:end, :end]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out.append(scores.softmax(-1).to(v.dtype) @ values[..., :end, :])
    return torch.cat(out, dim=3).view(b, heads, length, dim)


_COMPILED_FLEX = None


def _flex_attention(compiled: bool):
    """flex_attention, compiled into a fused kernel on CUDA (eager elsewhere: tests and CPU runs)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _flex_block_mask(document_ids: torch.Tensor, image_ids: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, q, k):
        qdoc, kdoc = document_ids[b, q], document_ids[b, k]
        qimg, kimg = image_ids[b, q], image_ids[b, k]
        allowed = (qdoc == kdoc) & (qdoc >= 0) & ((k <= q) | ((qimg == kimg) & (qimg >= 0)))
        return allowed | ((qdoc < 0) & (q == k))

    batch, length = document_ids.shape
    return create_block_mask(rule, batch, None, length, length, device=document_ids.device)


__all__ = ["AttentionMask", "attention_weights", "banded_attention", "dense_mask", "reference_attention"]
