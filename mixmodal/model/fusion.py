"""The early-fusion model: one transformer over interleaved text and images.

    image.mode = tokens   (Chameleon, CM3Leon)  image codes are ids of the shared vocabulary:
                          embed_tokens -> transformer -> lm_head (image.slot_embedding: + a
                          learned row and column embedding on each code, by its place in the grid).
    image.mode = latents  (Transfusion)         each image is a VAE latent [C, h, w], noised by
                          the objective, cut into (h/p)(w/p) patches of p x p and projected to
                          the model width (a linear layer, or U-Net down blocks); a timestep
                          embedding and a 2-D (row, column) position embedding are added to
                          every patch vector; the sequence holds one placeholder position per
                          patch. The hidden states at those positions go back through the
                          output projection (linear, or U-Net up blocks with skips) to a
                          prediction in latent space (noise or velocity, as the objective says).

Text embedding and LM head are the same in both modes. `model(input_ids)` returns an
output whose `.logits` is [B, T, V], as in transformers.

Packed-row inputs (all optional but input_ids; the data pipeline builds them):
    positions     [B, T]  RoPE positions, restarting per document     (default arange)
    document_ids  [B, T]  document of each position, -1 padding       (default one document)
    image_ids     [B, T]  bidirectional image block, -1 none          (default none)
    image_latents [N, C, h, w]  noisy latents of the row's images, in image-index order
    image_times   [N]     diffusion time in [0, 1] of each image
    image_index   [N, P]  flat index (b * T + t) of each image's P patch positions
    logits_index  [B, K]  compute logits only at these positions (-> [B, K, V]); the engine's use
    slot_start    [B]     image.slot_embedding: codes of the open image already in the cache (default 0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mixmodal.model.masks import AttentionMask, Backend
from mixmodal.model.patches import LinearPatchIn, LinearPatchOut, TimestepEmbedding, UNetPatchIn, UNetPatchOut
from mixmodal.model.transformer import KVCache, Transformer, TransformerConfig, grid_positions
from mixmodal.vocab import Vocab


@dataclass
class ImageConfig:
    mode: Literal["tokens", "latents"] = "tokens"
    num_codes: int = 0  # tokens: the VQ codebook size (filled from the image tokenizer)
    latent_channels: int = 0  # latents: the VAE's latent channels (filled from the image tokenizer)
    grid_size: int = 0  # side of the code / latent grid of one image (filled from the image tokenizer)
    patch_size: int = 2  # latents: p x p latent pixels per sequence position
    # latents: how patches enter and leave the transformer. "linear": Linear in and out (Transfusion's simple
    # layer); "mlp": Linear in, Linear-GELU-Linear out (an output that is not linear in the final state: a
    # shape's mask times a colour); "unet": U-Net down/up blocks (Transfusion's)
    patchify: Literal["linear", "mlp", "unet"] = "linear"
    unet_channels: int = 64  # latents, unet: channels of the U-Net blocks
    bidirectional: bool | None = None  # attention among one image's positions; None: yes for latents, no for tokens
    # latents: init std of the patches' learned row and column embeddings; 0 = the transformer's init_std (0.02),
    # which leaves them ~1/30 of a patch's content (DiT's fixed 2D sin-cos embedding is ~1 per element)
    # (tokens with slot_embedding: the same, for the codes' row and column embeddings)
    position_std: float = 0.0
    # tokens: learned row and column embeddings added to each image code's input by its place in the grid (its
    # "slot", counted from the image's <boi>), as a latent model's patches always have. Without them a code's state
    # knows its cell only through RoPE distances, so text that reads the picture binds objects to cells by its own
    # distance from it (benchmarks/study/reading_gap.py) and a question asked after the picture misplaces them
    slot_embedding: bool = False
    # latents: 2-D rotary positions for the patches (transformer.grid_positions): a patch's rotation carries
    # its row and its column on separate axes instead of its place in the row-major sequence
    rope_2d: bool = False
    # tokens: how a code enters and leaves the transformer. "learned": its own embedding row and lm_head row,
    # as Chameleon. "codebook": those rows plus a learned linear map of the code's tokenizer vector (VQ
    # codebook vector, k-means patch), shared by all codes, so codes that look alike start alike and a code
    # never seen as a target still scores by what it looks like. "codebook_only": the shared map alone (the
    # code's own rows unused), so nothing code-specific can learn that an unseen code is never right;
    # "codebook_out": own rows + the shared map on input, the shared map alone on output (a code's score)
    code_embedding: Literal["learned", "codebook", "codebook_only", "codebook_out"] = "learned"
    code_features: int = 0  # tokens, codebook: width of a code's tokenizer vector (filled from the image tokenizer)
    # tokens, codebook*: which vector of a code the shared map reads. "tokenizer": the tokenizer's own (VQ codebook
    # vector, k-means patch); "factored" (k-means): the patch + its colour-free structure + its shape-free colours;
    # "grouped" (k-means): the patch + a one-hot of its outline + a one-hot of its colours (a free row for each)
    code_vectors: Literal["tokenizer", "factored", "grouped"] = "tokenizer"
    # tokens, codebook*: the shared map. "linear": one matrix; "mlp": Linear-GELU-Linear, which can read
    # features a linear map of pixels cannot (an object's outline whatever its colour)
    code_map: Literal["linear", "mlp"] = "linear"
    # tokens, codebook*: a learned scalar (not weight-decayed) on the shared map's logits, so they can sharpen
    # without the decayed map growing; starts at 1
    code_gain: bool = False
    # latents: an auxiliary classifier over K centroids of clean patches (k-means of the training images' patches,
    # fitted when the run starts and kept with the weights as `patch_codebook`): from the noisy image each patch's
    # final state also predicts which centroid its clean patch is nearest, trained by cross-entropy
    # (diffusion.code_loss_weight), a discrete signal beside the flow loss's regression. 0 = no head
    patch_codes: int = 0

    def __post_init__(self) -> None:
        if self.code_embedding not in ("learned", "codebook", "codebook_only", "codebook_out"):
            raise ValueError("image.code_embedding must be 'learned', 'codebook', 'codebook_only' or 'codebook_out', "
                             f"got {self.code_embedding!r}")
        if not self.position_std >= 0.0:
            raise ValueError(f"image.position_std must be >= 0 (0 = the transformer's init_std), got {self.position_std}")
        if self.patchify not in ("linear", "mlp", "unet"):
            raise ValueError(f"image.patchify must be 'linear', 'mlp' or 'unet', got {self.patchify!r}")
        if self.code_map not in ("linear", "mlp"):
            raise ValueError(f"image.code_map must be 'linear' or 'mlp', got {self.code_map!r}")
        if self.code_vectors not in ("tokenizer", "factored", "grouped"):
            raise ValueError("image.code_vectors must be 'tokenizer', 'factored' or 'grouped', "
                             f"got {self.code_vectors!r}")
        if self.code_embedding == "learned" and (self.code_gain or self.code_map != "linear"
                                                 or self.code_vectors != "tokenizer"):
            raise ValueError("image.code_gain, code_map and code_vectors shape the shared map of image.code_embedding="
                             "codebook, codebook_only or codebook_out; with code_embedding=learned drop them")
        if self.mode == "latents" and self.code_embedding != "learned":
            raise ValueError(f"image.code_embedding={self.code_embedding} is for image codes (image.mode=tokens); "
                             "a latent-mode model has none: drop the key")
        if self.mode == "latents" and self.grid_size and self.grid_size % self.patch_size:
            raise ValueError(f"image.patch_size={self.patch_size} does not divide the latent grid "
                             f"({self.grid_size} x {self.grid_size}); pick a divisor of {self.grid_size}")
        if self.slot_embedding and self.mode != "tokens":
            raise ValueError("image.slot_embedding is for image.mode=tokens (a latent model's patches always have row "
                             "and column embeddings: image.position_std sets them); drop it")
        if self.rope_2d and self.mode != "latents":
            raise ValueError("image.rope_2d is for image.mode=latents (a token model writes its codes one by one); drop it")
        if self.patch_size < 1:
            raise ValueError(f"image.patch_size must be >= 1, got {self.patch_size}")
        if self.patch_codes < 0 or (self.patch_codes and self.mode != "latents"):
            raise ValueError(f"image.patch_codes={self.patch_codes}: a count >= 0 of centroids of latent patches, for "
                             "image.mode=latents only (image codes are already classes); drop the key or set 0")

    @property
    def is_bidirectional(self) -> bool:
        return self.mode == "latents" if self.bidirectional is None else self.bidirectional

    @property
    def positions_per_image(self) -> int:
        """Sequence positions between <boi> and <eoi>."""
        if self.mode == "tokens":
            return self.grid_size ** 2
        return (self.grid_size // self.patch_size) ** 2


@dataclass
class ModelConfig:
    text_vocab_size: int = 0  # ids of the text tokenizer, specials included (filled from it)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    tie_embeddings: bool = False  # share embed_tokens and lm_head (Chameleon does not)
    attention_backend: Backend = "auto"  # auto: FlexAttention on CUDA, SDPA elsewhere

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.text_vocab_size, self.image.num_codes if self.image.mode == "tokens" else 0)


@dataclass
class FusionOutput:
    logits: torch.Tensor  # [B, T, V]
    image_prediction: torch.Tensor | None = None  # [N, C, h, w] (latent mode, when images were given)
    hidden_states: torch.Tensor | None = None  # [B, T, D] after the final norm
    image_code_logits: torch.Tensor | None = None  # [N, P, K] (image.patch_codes = K > 0, when images were given)


# --- the model --------------------------------------------------------------------------------

UNUSED_CODE_LOGIT = -1.0e4  # finite, so guidance's cond - uncond stays a number; exp() of it is 0 in any dtype


def _code_map(image: ImageConfig, t) -> nn.Module:
    """The shared map of a code's tokenizer vector to the model's width (image.code_map); _init_code_map
    initialises it."""
    if image.code_map == "linear":
        return nn.Linear(image.code_features, t.dim, bias=False)
    return nn.Sequential(nn.Linear(image.code_features, t.dim), nn.GELU(), nn.Linear(t.dim, t.dim, bias=False))


def _init_code_map(module: nn.Module, std: float) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class FusionModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        t, image = config.transformer, config.image
        self.vocab = config.vocab
        self.embed_tokens = nn.Embedding(self.vocab.size, t.dim)
        self.transformer = Transformer(t)
        self.lm_head = nn.Linear(t.dim, self.vocab.size, bias=False)
        nn.init.normal_(self.embed_tokens.weight, 0.0, t.init_std)
        nn.init.normal_(self.lm_head.weight, 0.0, t.init_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.code_in = self.code_out = None
        # the codes' own embedding rows / lm_head rows count
        self.code_rows_in = image.code_embedding in ("codebook", "codebook_out")
        self.code_rows_out = image.code_embedding == "codebook"
        if image.mode == "tokens" and image.code_embedding != "learned":
            if not image.code_features or not image.num_codes:
                raise ValueError(f"image.code_embedding={image.code_embedding} needs image.num_codes and "
                                 "image.code_features (from the image tokenizer)")
            # normalised tokenizer vectors (set_code_features), saved with the weights
            self.register_buffer("code_features", torch.zeros(image.num_codes, image.code_features))
            self.code_in = _code_map(image, t)
            self.code_out = _code_map(image, t)
            for code_map in (self.code_in, self.code_out):  # both built, then both drawn: the random order of
                _init_code_map(code_map, t.init_std)         # the linear maps' first version (same weights)
            if image.code_gain:
                self.code_gain = nn.Parameter(torch.ones(()))
            # codes whose vector repeats an earlier code's (a k-means codebook's spares): the tokenizer never
            # emits them, and without their own lm_head rows (codebook_only, codebook_out) they would tie with
            # the code they repeat and take its probability; they score UNUSED_CODE_LOGIT instead
            self.register_buffer("code_unused", torch.zeros(image.num_codes, dtype=torch.bool), persistent=False)
            self.register_load_state_dict_post_hook(lambda model, keys: model._find_unused_codes())
        if image.slot_embedding:  # tokens: the same row and column embeddings a latent model's patches have
            if not image.grid_size:
                raise ValueError("image.slot_embedding needs image.grid_size (from the image tokenizer)")
            std = image.position_std or t.init_std
            self.image_rows = nn.Parameter(torch.randn(image.grid_size, t.dim) * std)
            self.image_cols = nn.Parameter(torch.randn(image.grid_size, t.dim) * std)
        if image.mode == "latents":
            if not image.latent_channels or not image.grid_size:
                raise ValueError("latent mode needs image.latent_channels and image.grid_size (from the VAE tokenizer)")
            side = image.grid_size // image.patch_size
            self.time_embed = TimestepEmbedding(t.dim)
            std = image.position_std or t.init_std
            self.image_rows = nn.Parameter(torch.randn(side, t.dim) * std)
            self.image_cols = nn.Parameter(torch.randn(side, t.dim) * std)
            if image.patchify == "unet":
                self.patch_in, self.patch_out = UNetPatchIn(image, t.dim), UNetPatchOut(image, t.dim)
            else:
                self.patch_in = LinearPatchIn(image, t.dim)
                self.patch_out = LinearPatchOut(image, t.dim, hidden=image.patchify == "mlp")
            if image.patch_codes:
                width = image.latent_channels * image.patch_size ** 2
                self.register_buffer("patch_codebook", torch.zeros(image.patch_codes, width))  # set_patch_codebook
                self.patch_code_head = nn.Linear(t.dim, image.patch_codes)
                nn.init.normal_(self.patch_code_head.weight, 0.0, t.init_std)
                nn.init.zeros_(self.patch_code_head.bias)

    @property
    def is_latent(self) -> bool:
        return self.config.image.mode == "latents"

    @torch.no_grad()
    def set_code_features(self, vectors: torch.Tensor) -> None:
        """The image tokenizer's code vectors [K, F] (code_embedding=codebook), centred over the codes and
        scaled to unit length, so the shared maps see every tokenizer's vectors at one scale."""
        if self.code_in is None:
            raise ValueError("set_code_features: this model has image.code_embedding=learned")
        if tuple(vectors.shape) != tuple(self.code_features.shape):
            raise ValueError(f"code vectors {tuple(vectors.shape)} do not match the model's "
                             f"{tuple(self.code_features.shape)} (image.num_codes x image.code_features)")
        v = vectors.float() - vectors.float().mean(0, keepdim=True)
        self.code_features.copy_(F.normalize(v, dim=1, eps=1e-6))
        self._find_unused_codes()

    @torch.no_grad()
    def set_patch_codebook(self, centroids: torch.Tensor) -> None:
        """image.patch_codes: the K centroids [K, C p p] of clean patches (patchify's layout) the head classifies."""
        if not self.config.image.patch_codes:
            raise ValueError("set_patch_codebook: this model has no patch-code head (image.patch_codes=0)")
        if tuple(centroids.shape) != tuple(self.patch_codebook.shape):
            raise ValueError(f"patch centroids {tuple(centroids.shape)} do not match the model's "
                             f"{tuple(self.patch_codebook.shape)} (image.patch_codes x latent_channels * patch_size^2)")
        self.patch_codebook.copy_(centroids.float())

    def init_buffers(self) -> None:
        """Find the unused codes again (a model built on the meta device and then given its weights has none)."""
        if self.code_in is not None:
            self.code_unused = torch.zeros(len(self.code_features), dtype=torch.bool, device=self.code_features.device)
            self._find_unused_codes()

    @torch.no_grad()
    def _find_unused_codes(self) -> None:
        if self.code_features.is_meta or self.code_unused.is_meta:
            return
        if not self.code_features.any():  # not set yet (set_code_features): all codes alike, none unused
            self.code_unused.zero_()
            return
        _, inverse = torch.unique(self.code_features, dim=0, return_inverse=True)
        index = torch.arange(len(inverse), device=inverse.device)
        first = torch.full_like(inverse, len(inverse)).scatter_reduce(0, inverse, index, "amin")
        self.code_unused.copy_(first[inverse] != index)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] ids -> [B, T, D]: the embedding rows, + the shared map of each image code's vector."""
        x = self.embed_tokens(input_ids)
        if self.code_in is None:
            return x
        codes = input_ids - self.vocab.text_size
        is_code = (codes >= 0) & (codes < self.vocab.num_image_codes)
        shared = self.code_in(self.code_features[codes.clamp(0, self.vocab.num_image_codes - 1)])
        mask = is_code[..., None].to(shared.dtype)
        return x + shared * mask if self.code_rows_in else x * (1 - mask) + shared * mask

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V] logits: lm_head, + each image code's shared map scored against the state."""
        logits = self.lm_head(hidden)
        if self.code_out is None:
            return logits
        start = self.vocab.text_size
        shared = hidden @ self.code_out(self.code_features).to(hidden.dtype).T  # [..., K]
        if self.config.image.code_gain:
            shared = shared * self.code_gain.to(shared.dtype)
        if self.code_rows_out:
            codes = logits[..., start:start + shared.shape[-1]] + shared
        else:
            codes = shared.masked_fill(self.code_unused, UNUSED_CODE_LOGIT)
        return torch.cat([logits[..., :start], codes, logits[..., start + shared.shape[-1]:]], dim=-1)

    def image_position_embedding(self) -> torch.Tensor:  # [P, D]
        return (self.image_rows[:, None] + self.image_cols[None, :]).flatten(0, 1)

    def image_slots(self, input_ids: torch.Tensor, slot_start: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] each image code's place in its image's grid (row-major, counted from the last <boi> before it),
        -1 elsewhere. `slot_start` [B]: codes of an image already in the KV cache before this chunk (the engine's
        decode), the numbering of a row's codes before its first <boi> goes on from there."""
        is_code = self.vocab.is_image_code(input_ids)
        is_boi = input_ids == self.vocab.boi
        count = is_code.long().cumsum(1)  # codes so far in the row
        at_boi = torch.where(is_boi, count, 0).cummax(1).values  # ... as of the last <boi>
        slots = count - at_boi - 1
        if slot_start is not None:
            slots = slots + torch.where(is_boi.long().cummax(1).values.bool(), 0, slot_start.to(slots)[:, None])
        return torch.where(is_code, slots.clamp(0, self.config.image.positions_per_image - 1), -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        image_latents: torch.Tensor | None = None,
        image_times: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: AttentionMask | None = None,
        logits_index: torch.Tensor | None = None,
        slot_start: torch.Tensor | None = None,
    ) -> FusionOutput:
        b, t = input_ids.shape
        if cache is not None and (positions is None or mask is None):
            # the defaults would restart RoPE positions at 0 and align the causal kernel to the first cached key
            raise ValueError("with a KV cache, pass `positions` (continuing the cached ones) and a `mask` built with "
                             "AttentionMask.build(..., key_document_ids=..., query_offset=...)")
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed(input_ids)
        if self.config.image.slot_embedding:
            slots = self.image_slots(input_ids, slot_start)
            rows = self.image_position_embedding()[slots.clamp(min=0)]
            x = x + torch.where(slots[..., None] >= 0, rows, torch.zeros((), dtype=rows.dtype)).to(x.dtype)
        skip = temb = None
        if image_latents is not None:
            if not self.is_latent:
                raise ValueError("image_latents given to a token-mode model (image.mode=tokens); images are ids there")
            if image_times is None or image_index is None:
                raise ValueError("image_latents need image_times [N] (or [N, P], one per patch) and image_index [N, P]")
            if image_times.dim() == 2 and self.config.image.patchify == "unet":
                raise ValueError("per-patch image_times [N, P] need image.patchify linear or mlp; the U-Net patchify "
                                 "adds one time embedding per image")
            temb = self.time_embed(image_times)  # [N, D], or [N, P, D] with a time per patch
            patches, skip = self.patch_in(image_latents, temb)
            patches = patches + self.image_position_embedding()[None] + (temb[:, None] if temb.dim() == 2 else temb)
            x = x.reshape(b * t, -1).index_copy(0, image_index.reshape(-1), patches.reshape(-1, x.shape[-1]).to(x.dtype))
            x = x.view(b, t, -1)
        if mask is None:
            if document_ids is None:
                document_ids = torch.zeros(b, t, dtype=torch.long, device=input_ids.device)
            mask = AttentionMask.build(document_ids, image_ids, backend=self.config.attention_backend)
        if self.config.image.rope_2d and image_latents is not None:
            positions = grid_positions(positions, image_index, self.config.image.grid_size // self.config.image.patch_size)
        hidden = self.transformer(x, positions, mask, cache)
        if logits_index is None:
            logits = self.head(hidden)
        else:  # only the rows' positions asked for ([B, K]): the engine needs one per row, not T x V
            logits = self.head(hidden.gather(1, logits_index[:, :, None].expand(-1, -1, hidden.shape[-1])))
        prediction = code_logits = None
        if image_latents is not None:
            image_hidden = hidden.reshape(b * t, -1)[image_index.reshape(-1)].view(*image_index.shape, -1)
            prediction = self.patch_out(image_hidden, temb, skip)
            if self.config.image.patch_codes:
                code_logits = self.patch_code_head(image_hidden)
        return FusionOutput(logits=logits, image_prediction=prediction, hidden_states=hidden,
                            image_code_logits=code_logits)

    # --- accounting ---------------------------------------------------------------------------

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per sequence position: 6 x the parameters a
        position passes through (all but the embedding table) + attention scores and values
        over a causal context (PaLM appendix B: 6 * L * T * D, half of the full-context 12)."""
        c = self.config.transformer
        return 6.0 * self.num_parameters(non_embedding=True) + 6.0 * c.num_layers * seq_len * c.dim


__all__ = ["FusionModel", "FusionOutput", "ImageConfig", "ModelConfig"]
