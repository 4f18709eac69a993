"""The CLIP-style dual encoder behind retrieval: its config, towers, loss and tokenization.

    DualEncoder        a text tower and a vision tower projected into one embed_dim space;
                       module names and arithmetic follow transformers' CLIPModel, so a
                       converted CLIP (interop/hf_clip.py) is a pure renaming of its tensors
    contrastive_loss   CLIP's symmetric InfoNCE over a batch of (text, image) pairs
    tokenize_texts     texts -> (input_ids, attention_mask) rows: <bos> ... <eos>, padded
    load_tokenizer     a tokenizer.json set up for tokenize_texts

The encoder on disk (save_dual_encoder, find_encoder_dir) and the embedder that retrieval
calls (DocumentEmbedder: a saved encoder on a device, texts, images and documents -> float32
L2-normalised numpy rows) are in retrieval/document_embedder.py, which imports from here.

Axes: B batch, L text positions, D tower width, H heads, P = 1 + (image_size / patch_size)^2
vision positions (the class token first), E embed_dim.

Text tower: token + learned position embedding -> pre-LN layers (causal mask and the
padding mask) -> final LayerNorm -> the hidden state at the first eos_id ("eos"), or at
the largest id of the row ("argmax": OpenAI CLIP's <|endoftext|> has the largest id;
transformers keeps that rule for configs with the old eos_token_id == 2) -> text_projection.
Vision tower: patches (a Conv2d without bias) + class token + learned positions ->
pre_layernorm -> layers -> post_layernorm of the class token -> visual_projection.

Pixels come in the library's convention, float (B, 3, H, W) in [-1, 1]; encode_image maps
them to [0, 1] and normalises with the config's mean and std (CLIP's processor statistics
for a converted CLIP), resizing first when H, W differ from vision.image_size.

Tokenization is the same for every tokenizer.json (our byte-level BPE or OpenAI CLIP's):
the text is encoded without the tokenizer's own special tokens or post-processor, then
<bos> ... <eos> come from the config's ids, so both kinds behave alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixmodal.tokenizers.pixels import check_images

if TYPE_CHECKING:
    import tokenizers

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
ENCODER_DIR = "encoder"  # a training run's saved encoder: RUN/encoder
ENCODER_FIX = ("copy the encoder folder again (RUN/encoder of the dual-encoder run, or re-run `mixmodal convert "
               "hf-clip SRC OUT`)")
ACTIVATIONS = ("gelu", "quick_gelu")
POOLINGS = ("eos", "argmax")


class EncoderError(ValueError):
    """A dual-encoder directory or input that cannot be used; the message names what is wrong."""


# --- configs ---------------------------------------------------------------------------------

def _check_tower(where: str, dim: int, num_heads: int, num_layers: int, mlp_dim: int, activation: str) -> None:
    for name, value in (("dim", dim), ("num_heads", num_heads), ("num_layers", num_layers), ("mlp_dim", mlp_dim)):
        if value < 1:
            raise ValueError(f"{where}.{name} must be >= 1, got {value}")
    if dim % num_heads:
        raise ValueError(f"{where}.dim={dim} is not divisible by {where}.num_heads={num_heads}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}.activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")


@dataclass
class TextTowerConfig:
    vocab_size: int = 0  # filled from the tokenizer by the training task / converter
    max_length: int = 64  # positions, <bos> and <eos> included (OpenAI CLIP: 77)
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 512
    activation: str = "gelu"  # gelu | quick_gelu (OpenAI CLIP)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pooling: str = "eos"  # eos: the hidden state at the first eos_id; argmax: at the row's largest id (legacy CLIP)

    def __post_init__(self) -> None:
        _check_tower("text", self.dim, self.num_heads, self.num_layers, self.mlp_dim, self.activation)
        if self.vocab_size < 0:
            raise ValueError(f"text.vocab_size must be >= 0 (0: not filled yet), got {self.vocab_size}")
        if self.max_length < 2:
            raise ValueError(f"text.max_length must be >= 2 (<bos> and <eos>), got {self.max_length}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"text.pooling must be one of {', '.join(POOLINGS)}; got {self.pooling!r}")


@dataclass
class VisionTowerConfig:
    image_size: int = 32
    patch_size: int = 4
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 512
    activation: str = "gelu"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # pixels in [0, 1] are normalised as (x - mean) / std
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        _check_tower("vision", self.dim, self.num_heads, self.num_layers, self.mlp_dim, self.activation)
        if self.patch_size < 1 or self.image_size < self.patch_size or self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size={self.image_size} must be a positive multiple of "
                             f"vision.patch_size={self.patch_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"vision.mean and vision.std must be 3 numbers each (RGB), std > 0; got "
                             f"mean={self.mean}, std={self.std}")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # the class token, then the patches


@dataclass
class DualEncoderConfig:
    embed_dim: int = 128
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), CLIP's initial temperature
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")


# --- the towers ------------------------------------------------------------------------------

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, D / H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask: (B, 1, L, L) bool, True = attend
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, activation: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.activation = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN: x + attention(LN(x)), then x + MLP(LN(x)). Names as in transformers' CLIPEncoderLayer."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, activation: str, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


def _layers(dim: int, num_layers: int, num_heads: int, mlp_dim: int, activation: str, eps: float) -> nn.ModuleList:
    return nn.ModuleList(EncoderLayer(dim, num_heads, mlp_dim, activation, eps) for _ in range(num_layers))


class TextTower(nn.Module):
    def __init__(self, config: TextTowerConfig, eps: float) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise EncoderError("text.vocab_size is unset (0): it comes from the tokenizer; the dual-encoder task's "
                               "prepare() or the converter fills it")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = nn.Embedding(config.max_length, config.dim)
        self.layers = _layers(config.dim, config.num_layers, config.num_heads, config.mlp_dim, config.activation, eps)
        self.final_layer_norm = nn.LayerNorm(config.dim, eps=eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, D) pooled hidden states."""
        B, L = input_ids.shape
        if L > self.config.max_length:
            raise EncoderError(f"text of {L} positions is longer than text.max_length={self.config.max_length}; "
                               "tokenize with DocumentEmbedder.tokenize (it truncates)")
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:L]  # (B, L, D)
        allowed = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None]  # causal: (1, L, L)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]  # and no padded keys: (B, L, L)
            # a query with every key masked (left padding) would give NaN; letting it see itself changes
            # nothing a real position reads (real queries never attend to padding)
            allowed = allowed | torch.eye(L, dtype=torch.bool, device=x.device)
        mask = allowed[:, None]  # (B | 1, 1, L, L)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        if self.config.pooling == "argmax":
            where = input_ids.argmax(dim=-1)  # the first largest id
        else:
            where = (input_ids == self.config.eos_id).int().argmax(dim=-1)  # the first eos (0 when there is none)
        return x[torch.arange(B, device=x.device), where]


class VisionTower(nn.Module):
    def __init__(self, config: VisionTowerConfig, eps: float) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(3, config.dim, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(config.dim))
        self.position_embedding = nn.Embedding(config.num_positions, config.dim)
        self.pre_layernorm = nn.LayerNorm(config.dim, eps=eps)
        self.layers = _layers(config.dim, config.num_layers, config.num_heads, config.mlp_dim, config.activation, eps)
        self.post_layernorm = nn.LayerNorm(config.dim, eps=eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels at image_size S -> (B, D) pooled class token."""
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, P - 1, D)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, P, D)
        x = self.pre_layernorm(x)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class DualEncoder(nn.Module):
    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.text = TextTower(config.text, config.layer_norm_eps)
        self.vision = VisionTower(config.vision, config.layer_norm_eps)
        self.text_projection = nn.Linear(config.text.dim, config.embed_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision.dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        v = config.vision
        self.register_buffer("pixel_mean", torch.tensor(v.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(v.std).view(1, 3, 1, 1), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' CLIP initialisation (factor 1), from the global torch RNG."""
        for tower in (self.text, self.vision):
            dim, num_layers = tower.config.dim, tower.config.num_layers
            in_std = dim ** -0.5 * (2 * num_layers) ** -0.5
            for layer in tower.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    nn.init.normal_(proj.weight, std=in_std)
                nn.init.normal_(layer.self_attn.out_proj.weight, std=dim ** -0.5)
                nn.init.normal_(layer.mlp.fc1.weight, std=(2 * dim) ** -0.5)
                nn.init.normal_(layer.mlp.fc2.weight, std=in_std)
                for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                               layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2):
                    nn.init.zeros_(linear.bias)
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text.position_embedding.weight, std=0.02)
        nn.init.normal_(self.vision.class_embedding, std=self.config.vision.dim ** -0.5)
        nn.init.normal_(self.vision.patch_embedding.weight, std=0.02)
        nn.init.normal_(self.vision.position_embedding.weight, std=0.02)
        nn.init.normal_(self.text_projection.weight, std=self.config.text.dim ** -0.5)
        nn.init.normal_(self.visual_projection.weight, std=self.config.vision.dim ** -0.5)
        self.logit_scale.fill_(float(self.config.logit_scale_init))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids (and a (B, L) 1/0 mask) -> (B, E) projected, not normalised."""
        if input_ids.ndim != 2:
            raise EncoderError(f"input_ids must have shape (B, L); got {tuple(input_ids.shape)}")
        return self.text_projection(self.text(input_ids, attention_mask))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, E) projected, not normalised. Other sizes than
        vision.image_size are resized (bicubic, antialiased) and clamped to [-1, 1], as an
        8-bit image resized by Pillow would be."""
        size = self.config.vision.image_size
        check_images(pixels, size, 1, any_size=True)
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=False,
                                   antialias=True).clamp(-1, 1)
        x = ((pixels + 1) / 2 - self.pixel_mean) / self.pixel_std
        return self.visual_projection(self.vision(x.to(self.vision.patch_embedding.weight.dtype)))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to 100 as in CLIP (beyond that the logits only sharpen ties)."""
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pixels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (text (B, E), image (B, E), scale): both L2-normalised in float32."""
        text = F.normalize(self.encode_text(input_ids, attention_mask).float(), dim=-1)
        image = F.normalize(self.encode_image(pixels).float(), dim=-1)
        return text, image, self.scale().float()


def contrastive_loss(text_embeds: torch.Tensor, image_embeds: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: pair i is the positive of row i and of column i of
    scale * T @ I^T (B, B); the mean of the cross-entropies over rows and over columns."""
    logits = scale * text_embeds.float() @ image_embeds.float().T  # (B texts, B images)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# --- tokenization ----------------------------------------------------------------------------

def tokenize_texts(tokenizer: "tokenizers.Tokenizer", texts: Sequence[str], config: TextTowerConfig,
                   query_dropout: float = 0.0, rng: np.random.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (N, L), attention_mask (N, L)), L the longest row: <bos> tokens <eos>,
    truncated to max_length with <eos> kept last, right-padded with pad_id.

    query_dropout drops each text token (never <bos>/<eos>) independently with that
    probability, before truncation (CM3Leon's query dropout); `rng` makes it reproducible."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got a single string; wrap it in a list")
    if not 0.0 <= query_dropout < 1.0:
        raise ValueError(f"query_dropout must be in [0, 1), got {query_dropout}")
    if query_dropout and rng is None:
        rng = np.random.default_rng()
    room = config.max_length - 2
    rows = []
    for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids = encoding.ids
        if query_dropout:
            ids = [t for t, keep in zip(ids, rng.random(len(ids)) >= query_dropout) if keep]
        rows.append([config.bos_id, *ids[:room], config.eos_id])
    length = max((len(r) for r in rows), default=2)
    input_ids = torch.full((len(rows), length), config.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask


def load_tokenizer(path: str | os.PathLike, fix: str = ENCODER_FIX) -> "tokenizers.Tokenizer":
    """A tokenizer.json as a `tokenizers.Tokenizer` set up for tokenize_texts: no truncation or
    padding of its own, and text that spells a special token gets ordinary tokens for it."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on bad JSON
        raise EncoderError(f"{path} is not a valid tokenizers JSON file ({' '.join(str(e).split())}): it is truncated "
                           f"or not a tokenizer; {fix}") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.encode_special_tokens = True
    return tokenizer


__all__ = ["CONFIG_FILE", "ENCODER_DIR", "TOKENIZER_FILE", "WEIGHTS_FILE", "DualEncoder", "DualEncoderConfig",
           "EncoderError", "TextTowerConfig", "VisionTowerConfig", "contrastive_loss", "load_tokenizer",
           "tokenize_texts"]
