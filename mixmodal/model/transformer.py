"""The decoder backbone: embeddings in, hidden states out. No losses, no sampling, no parallelism.

    h = x + attn(norm(x)); h = h + mlp(norm(h))            pre-norm (Llama)
    h = x + norm(attn(x)); h = h + norm(mlp(h))            swin_norm (Chameleon-7B/34B)

- RMSNorm (statistics in float32), rotary position embeddings on per-token positions (a
  packed row restarts them per document), SwiGLU feed-forward, grouped-query attention,
  and Chameleon's QK-norm: a LayerNorm over head_dim whose gain and bias are per head.
- Submodule names follow transformers' Chameleon/Llama (`layers.i.self_attn.q_proj`,
  `mlp.gate_proj`, `input_layernorm`, ...) and RoPE uses the rotate-half convention of
  its (already permuted) q/k weights, so converting a transformers checkpoint is a
  renaming (interop/hf_chameleon.py).
- Init: every matrix N(0, init_std); the two projections that write into the residual
  stream (o_proj, down_proj) are scaled by 1/sqrt(2 * num_layers) (GPT-2, Megatron), so the
  residual's variance does not grow with depth; norms start at gain 1, bias 0.

Axes: B batch, T positions, D model dim, H heads, Hkv key/value heads, d head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mixmodal.model.masks import AttentionMask


@dataclass
class TransformerConfig:
    dim: int = 256  # model width D
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads (plain multi-head)
    ffn_dim: int | None = None  # SwiGLU hidden width; None = 8/3 * dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0
    qk_norm: bool = True  # Chameleon's per-head LayerNorm on queries and keys
    swin_norm: bool = False  # Chameleon's norm re-ordering: h = x + norm(attn(x))
    attention_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0  # on each residual branch
    attention_dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("dim", "num_layers", "num_heads", "ffn_multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / num_heads = {self.head_dim} must be even for rotary embeddings")
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ValueError(f"ffn_dim must be >= 1 (or null for 8/3 * dim), got {self.ffn_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        m = self.ffn_multiple_of
        return (int(8 * self.dim / 3) + m - 1) // m * m


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class HeadNorm(nn.Module):
    """LayerNorm over head_dim with a gain and bias per head (Chameleon's QK-norm; eps 1e-5 as there)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H, d]
        return F.layer_norm(x, x.shape[-1:], None, None, self.eps) * self.weight + self.bias


class Rotary(nn.Module):
    """cos/sin tables for per-token positions (rotate-half layout, as transformers' Llama/Chameleon)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim))

    def init_buffers(self) -> None:
        """Recompute the frequencies (a model built on the meta device has none)."""
        self.inv_freq = self._inv_freq(torch.device("cpu") if self.inv_freq.is_meta else self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B, T] -> 2 x [B, 1, T, d]
        """[B, T] positions, or [B, T, 3] (sequence, row, column: `grid_positions`), where frequency i turns
        with axis i % 3 (interleaved multimodal RoPE, as Qwen3-VL: every axis gets high and low frequencies).
        A token whose three axes are equal gets exactly the 1-D rotation."""
        inv_freq = self.inv_freq.to(positions.device)
        if positions.dim() == 3:
            axis = torch.arange(len(inv_freq), device=positions.device) % positions.shape[-1]
            freqs = positions.float().index_select(-1, axis) * inv_freq
        else:
            freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


def grid_positions(positions: torch.Tensor, image_index: torch.Tensor, side: int) -> torch.Tensor:
    """[B, T] sequence positions -> [B, T, 3] (sequence, row, column) for 2-D rotary positions of images
    (image.rope_2d): a text token's three axes are its position; the patch at (r, c) of an image whose first
    patch sits at position s gets (s, s + r, s + c), so a token attends to a patch by its row and column,
    and patches side by side in the picture are side by side in the rotation (in 1-D RoPE the last patch of
    a row neighbours the first of the next). image_index [N, P]: each image's patches as flat indices into
    B * T, in row-major order (P = side * side)."""
    b, t = positions.shape
    flat = positions.reshape(-1, 1).repeat(1, 3)
    index = image_index.reshape(-1)
    start = flat[image_index[:, 0], 0][:, None]  # [N, 1]
    k = torch.arange(image_index.shape[1], device=positions.device)
    grid = torch.stack([start.expand(-1, len(k)), start + k // side, start + k % side], dim=-1)  # [N, P, 3]
    flat = flat.index_copy(0, index, grid.reshape(-1, 3).to(flat.dtype))
    return flat.view(b, t, 3)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(Protocol):
    """What the inference engine's cache offers a layer: append this step's keys/values, get all."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int) -> None:
        super().__init__()
        c = config
        self.layer, self.num_heads, self.kv_heads, self.head_dim = layer, c.num_heads, c.kv_heads, c.head_dim
        self.attention_dropout = c.attention_dropout
        self.q_proj = nn.Linear(c.dim, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.dim, bias=c.attention_bias)
        self.q_norm = HeadNorm(c.num_heads, c.head_dim) if c.qk_norm else None
        self.k_norm = HeadNorm(c.kv_heads, c.head_dim) if c.qk_norm else None
        self.qkv_proj: nn.Linear | None = None  # inference copies only: q/k/v in one matmul (fuse_projections)

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """[B, T, D] -> q [B, H, T, d], k and v [B, KV, T, d]: the projections, QK-norm and RoPE."""
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2, -1)
            q = q.view(b, t, self.num_heads, self.head_dim)
            k, v = k.view(b, t, self.kv_heads, self.head_dim), v.view(b, t, self.kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
            v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # QK-norm and RoPE run in fp32; attention computes in v's dtype (bf16 under autocast, which would cast
        # q and k to it inside SDPA anyway): casting here keeps the KV cache in that dtype, rather than a
        # float32 cache re-cast whole at every decoding step
        return apply_rotary(q, *rope).to(v.dtype), apply_rotary(k, *rope).to(v.dtype), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
               cache: KVCache | None = None) -> torch.Tensor:
        """Append k/v to the cache, attend: [B, H, T, d] (before the output projection)."""
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return mask.attend(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)

    def output(self, out: torch.Tensor) -> torch.Tensor:  # [B, H, T, d] -> [B, T, D]
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache: KVCache | None = None) -> torch.Tensor:
        return self.output(self.attend(*self.project(x, rope), mask, cache))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=config.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None  # inference copies only: gate and up in one matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.swin_norm = config.swin_norm
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    # A block is three steps: `before_attention` (norm, projections, QK-norm, RoPE), the attention over the
    # cache (whose length changes every decoding step), and `after_attention` (output projection, residuals,
    # MLP). The first and last have fixed shapes while decoding, which is what inference/compiled.py compiles.
    def before_attention(self, x: torch.Tensor, rope):
        return self.self_attn.project(x if self.swin_norm else self.input_layernorm(x), rope)

    def after_attention(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = self.self_attn.output(out)
        if self.swin_norm:
            x = x + self.dropout(self.input_layernorm(out))
            return x + self.dropout(self.post_attention_layernorm(self.mlp(x)))
        x = x + self.dropout(out)
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))

    def forward(self, x: torch.Tensor, rope, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.before_attention(x, rope)
        return self.after_attention(x, self.self_attn.attend(q, k, v, mask, cache))


class Transformer(nn.Module):
    """Blocks + final norm over input embeddings [B, T, D]; returns normalised hidden states [B, T, D]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, out_std if name.endswith(("o_proj", "down_proj")) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: AttentionMask,
                cache: KVCache | None = None) -> torch.Tensor:
        rope = self.rotary(positions)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        return self.norm(x)


def _fused(linears: list[nn.Linear]) -> nn.Linear | None:
    """One Linear computing the outputs of `linears` side by side, or None if any is not a plain Linear
    (a LoRA wrapper) or they differ in bias or dtype."""
    if any(type(m) is not nn.Linear for m in linears) or len({m.bias is None for m in linears}) > 1 \
            or len({m.weight.dtype for m in linears}) > 1:
        return None
    w = linears[0].weight
    fused = nn.Linear(w.shape[1], sum(m.out_features for m in linears), bias=linears[0].bias is not None,
                      device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused.requires_grad_(False)


def fuse_projections(model: nn.Module) -> nn.Module:
    """For an inference copy (inference/precision.py): every attention's q/k/v projections become one matmul
    and every SwiGLU's gate/up one, in place; the separate weights are dropped from the copy. Fewer, larger
    matmuls are what a decoding step of one token per row is short of (benchmarks/RESULTS.md, issue 19).
    The outputs are the same columns of the same products. Not for training: the parameter names change."""
    for m in model.modules():
        if isinstance(m, Attention) and m.qkv_proj is None:
            fused = _fused([m.q_proj, m.k_proj, m.v_proj])
            if fused is not None:
                m.qkv_proj, m.q_proj, m.k_proj, m.v_proj = fused, None, None, None
        elif isinstance(m, MLP) and m.gate_up_proj is None:
            fused = _fused([m.gate_proj, m.up_proj])
            if fused is not None:
                m.gate_up_proj, m.gate_proj, m.up_proj = fused, None, None
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["Attention", "Block", "HeadNorm", "KVCache", "MLP", "RMSNorm", "Rotary", "Transformer",
           "TransformerConfig", "apply_rotary", "count_parameters", "fuse_projections", "grid_positions"]
