"""Tiny random image tokenizers and engines shared by the tests (seconds to build, not for pictures)."""

from __future__ import annotations

import torch

from mixmodal.inference.engine import Engine
from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.transformer import TransformerConfig
from mixmodal.objectives.diffusion import DiffusionConfig
from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

TRUNK = dict(resolution=16, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, norm_groups=4)  # 8 x 8


def tiny_image_tokenizer(mode: str):
    torch.manual_seed(0)
    if mode == "tokens":
        return VQTokenizer(VQConfig(**TRUNK, latent_channels=8, codebook_size=32, codebook_dim=4))  # 8 x 8 codes
    return VAETokenizer(VAEConfig(**TRUNK, latent_channels=4))  # 4 x 8 x 8 latents


def tiny_engine(mode: str, text_tokenizer) -> Engine:
    """A random 2-layer model on the tiny tokenizer; init_std 0.5 so its outputs depend on its inputs."""
    torch.manual_seed(0)
    image = (ImageConfig(mode="tokens", num_codes=32, grid_size=8) if mode == "tokens"
             else ImageConfig(mode="latents", latent_channels=4, grid_size=8, patch_size=4))
    config = ModelConfig(text_vocab_size=text_tokenizer.vocab_size, image=image,
                         transformer=TransformerConfig(dim=32, num_layers=2, num_heads=4, num_kv_heads=2, init_std=0.5))
    return Engine(FusionModel(config), text_tokenizer, tiny_image_tokenizer(mode), diffusion=DiffusionConfig())


def save_engine_folder(engine: Engine, out, **generation) -> None:
    """A model folder as `mixmodal train` writes it (weights, both tokenizers, generation.yaml) from an engine."""
    from mixmodal.inference.checkpoint import write_generation_settings
    from mixmodal.model.io import save_model_dir
    from mixmodal.tokenizers.image import save_image_tokenizer

    save_model_dir(engine.model, out)
    engine.text_tokenizer.save(out / "text_tokenizer")
    save_image_tokenizer(engine.image_tokenizer, out / "image_tokenizer")
    diffusion = DiffusionConfig() if engine.mode == "latents" else None
    write_generation_settings(out, max_length=generation.pop("max_length", 512), diffusion=diffusion, **generation)


def prefills(engine: Engine, prompts: list, config) -> list[tuple[list[int], list[int]]]:
    """(ids, positions) of every row of the engine's first forward (the prompt prefill): what each
    prompt and guidance stream was laid out as."""
    seen = []
    model_forward = engine.model.forward

    def spy(ids, positions=None, **kwargs):
        if not seen:  # rows are padded to the longest block; logits_index is each row's last id
            lengths = (kwargs["logits_index"][:, 0] + 1).tolist()
            seen.extend((ids[r, :n].tolist(), positions[r, :n].tolist()) for r, n in enumerate(lengths))
        return model_forward(ids, positions=positions, **kwargs)

    engine.model.forward = spy
    try:
        engine.generate(prompts, config)
    finally:
        engine.model.forward = model_forward
    return seen
