"""The patch tokenizers computed in closed form (tokenizers/patch.py, `task: patch-tokenizer`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixmodal.config import ConfigError
from mixmodal.data.shapes import Scene, score
from mixmodal.tokenizers.image import load_image_tokenizer, save_image_tokenizer
from mixmodal.tokenizers.patch import (KMeansConfig, KMeansTokenizer, PCAConfig, PCATokenizer, factor_patches, from_patches,
                                       to_patches, unfactor_patches)
from mixmodal.tokenizers.pixels import tensor_to_images
from mixmodal.train.image_data import eval_images
from mixmodal.train.run import load_run_config, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes48():
    train_images, _ = eval_images("shapes:split=train", 48, 300)
    all_images, _ = eval_images("shapes:split=all", 48, 300)
    heldout, scenes = eval_images("shapes:split=heldout-combos", 48, 24)
    return train_images, all_images, heldout, scenes


def _oracle_exact(images: torch.Tensor, scenes: list[dict]) -> float:
    return sum(score(im, Scene.from_dict(sc))["overall"] for im, sc in zip(tensor_to_images(images.clamp(-1, 1)), scenes)) / len(scenes)


def test_patches_round_trip_and_follow_the_grid():
    x = torch.randn(2, 3, 16, 16)
    p = to_patches(x, 4)
    assert p.shape == (2, 4, 4, 48)
    assert torch.equal(from_patches(p, 4), x)
    assert torch.equal(p[1, 2, 3].reshape(3, 4, 4), x[1, :, 8:12, 12:16])  # patch (row 2, col 3)


def test_pca_writes_held_out_combinations_back_exactly(shapes48):
    train_images, _, heldout, scenes = shapes48
    tok = PCATokenizer(PCAConfig(resolution=48, patch_size=4, latent_channels=12))
    stats = tok.fit(train_images)  # never saw a held-out shape-colour pair
    assert 0.9 < stats["explained_variance"] < 1.0
    latents = tok.encode(train_images[:64])
    assert latents.shape == (64, 12, 12, 12)
    assert latents.std(dim=(0, 2, 3)).sub(1).abs().max() < 0.3  # whitened: about unit variance per channel
    assert _oracle_exact(tok.decode(tok.encode(heldout)), scenes) == 1.0
    few = PCATokenizer(PCAConfig(resolution=48, patch_size=4, latent_channels=2))
    few.fit(train_images)
    assert _oracle_exact(few.decode(few.encode(heldout)), scenes) < 0.5  # the number of components matters


def test_factor_patches_splits_outline_from_colour_and_back():
    p = 8
    yy, xx = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    disc = ((yy - 3.5) ** 2 + (xx - 3.5) ** 2 < 6).float()  # an outline, centred
    bar = (xx >= 6).float()  # off centre: lower at the centre than on average
    ground = torch.tensor([-1.0, -0.5, 0.2])

    def paint(coverage, colour):
        return (ground[:, None, None] + (colour - ground)[:, None, None] * coverage).reshape(-1)

    red, blue = torch.tensor([0.9, -0.8, -0.9]), torch.tensor([-0.9, -0.7, 0.8])
    patches = torch.stack([paint(disc, red), paint(disc, blue), paint(bar, red), ground[:, None].expand(3, p * p).reshape(-1)])
    pattern, colour, grounds = factor_patches(patches, p)
    assert torch.allclose(pattern[0], disc.reshape(-1), atol=1e-5)  # the coverage, in any colour
    assert torch.allclose(pattern[1], disc.reshape(-1), atol=1e-5)
    assert torch.allclose(pattern[2], 1 - bar.reshape(-1), atol=1e-5)  # signed high at the centre
    assert torch.allclose(colour[0], red - ground, atol=1e-5) and torch.allclose(colour[1], blue - ground, atol=1e-5)
    assert torch.allclose(grounds[:2], ground.expand(2, 3), atol=1e-5)
    assert torch.equal(pattern[3], torch.zeros(p * p)) and torch.equal(colour[3], torch.zeros(3))  # uniform: ground only
    assert torch.allclose(unfactor_patches(pattern, colour, grounds), patches, atol=1e-5)
    two = patches[0] + paint(bar, blue) - paint(torch.zeros(p, p), blue)  # two colours: only the dominant one is kept
    assert not torch.allclose(unfactor_patches(*factor_patches(two[None], p)), two[None], atol=1e-2)


def test_factored_pca_composes_held_out_pairs_and_round_trips(tmp_path, shapes48):
    train_images, _, heldout, scenes = shapes48
    tok = PCATokenizer(PCAConfig(resolution=48, patch_size=16, latent_channels=18, factored=True))
    stats = tok.fit(train_images)  # never saw a held-out shape-colour pair
    assert stats["rank1_explained"] > 0.9999 and stats["explained_variance"] > 0.999
    latents = tok.encode(heldout)
    assert latents.shape == (24, 18, 3, 3)
    assert _oracle_exact(tok.decode(latents), scenes) == 1.0
    # the same outline in two colours: equal pattern channels, different colour channels
    pattern, colour, _ = factor_patches(to_patches(heldout, 16), 16)
    cells = pattern.reshape(-1, 256)
    same = (torch.cdist(cells, cells) < 1e-2) & (torch.cdist(colour.reshape(-1, 3), colour.reshape(-1, 3)) > 0.5)
    i, j = same.nonzero()[0]
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 18)
    assert (flat[i, :12] - flat[j, :12]).abs().max() < 0.05 and (flat[i, 12:15] - flat[j, 12:15]).abs().max() > 1
    assert tok.std[15:].min() >= 0.1  # one ground in the fitted images: its scale is floored, not whitened noise
    save_image_tokenizer(tok, tmp_path / "fpca")
    loaded = load_image_tokenizer(tmp_path / "fpca")
    assert loaded.config.factored and torch.equal(loaded.encode(heldout), latents)
    with pytest.raises(ValueError, match=r"with factored=true, latent_channels .* must lie in \[7, 262\]"):
        PCAConfig(resolution=48, patch_size=16, latent_channels=6, factored=True)


def test_kmeans_codebook_is_the_distinct_patches_when_they_fit(shapes48):
    _, all_images, heldout, _ = shapes48
    tok = KMeansTokenizer(KMeansConfig(resolution=48, patch_size=8, codebook_size=512))
    stats = tok.fit(all_images)
    assert stats["distinct_patches"] <= 385 and stats["quantisation_mse"] == 0.0
    codes = tok.encode(heldout)
    assert codes.shape == (24, 6, 6) and codes.dtype == torch.long
    assert codes.max() < stats["distinct_patches"]  # spare codes are never chosen
    assert torch.equal(tok.decode(codes), heldout)  # lossless


def test_kmeans_clusters_with_faiss_when_patches_outnumber_codes(shapes48):
    _, all_images, heldout, _ = shapes48
    tok = KMeansTokenizer(KMeansConfig(resolution=48, patch_size=8, codebook_size=16, seed=1))
    stats = tok.fit(all_images[:100])
    assert stats["distinct_patches"] > 16 and stats["quantisation_mse"] > 0
    codes = tok.encode(heldout)
    assert 0 <= int(codes.min()) and int(codes.max()) < 16
    again = KMeansTokenizer(KMeansConfig(resolution=48, patch_size=8, codebook_size=16, seed=1))
    again.fit(all_images[:100])
    assert torch.equal(again.codebook, tok.codebook)  # seeded: reproducible


@pytest.mark.parametrize("kind", ["pca", "kmeans"])
def test_save_load_round_trip_and_errors(tmp_path, shapes48, kind):
    train_images, _, heldout, _ = shapes48
    tok = (PCATokenizer(PCAConfig(resolution=48, patch_size=4, latent_channels=8)) if kind == "pca"
           else KMeansTokenizer(KMeansConfig(resolution=48, patch_size=8, codebook_size=400)))
    with pytest.raises(ValueError, match=f"this {kind} tokenizer has not been fitted"):
        tok.encode(heldout)
    tok.fit(train_images)
    save_image_tokenizer(tok, tmp_path / kind)
    loaded = load_image_tokenizer(tmp_path / kind)
    assert type(loaded) is type(tok) and loaded.kind == kind and loaded.discrete == (kind == "kmeans")
    assert torch.equal(loaded.encode(heldout), tok.encode(heldout))
    with pytest.raises(ValueError, match="trained at 48x48"):
        tok.encode(torch.zeros(1, 3, 32, 32))
    if kind == "pca":
        with pytest.raises(ValueError, match=r"latents must have shape \(B, 8, h, w\)"):
            tok.decode(torch.zeros(1, 4, 12, 12))
    else:
        with pytest.raises(ValueError, match=r"codes must lie in \[0, 400\)"):
            tok.decode(torch.full((1, 6, 6), 400))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="not divisible by patch_size=5"):
        PCAConfig(resolution=48, patch_size=5)
    with pytest.raises(ValueError, match=r"latent_channels must lie in \[1, 48\]"):
        PCAConfig(resolution=48, patch_size=4, latent_channels=49)
    with pytest.raises(ValueError, match="codebook_size must be >= 2"):
        KMeansConfig(codebook_size=1)


def _fit_run(kind: str, out: Path, *extra: str) -> dict:
    config = load_run_config(ROOT / f"configs/tokenizers/{kind}-shapes-48.yaml",
                             ["data.num_images=200", "eval.num_images=16", "eval.num_samples=4", *extra])
    return train(config, out)


def test_the_task_writes_a_tokenizer_run_a_model_run_can_name(tmp_path):
    result = _fit_run("pca", tmp_path / "pca")
    run = tmp_path / "pca"
    assert result["oracle_overall"] == 1.0 and result["fit_seconds"] > 0
    assert json.loads((run / "eval.json").read_text())["oracle_overall"] == 1.0
    assert (run / "samples" / "step_000000.png").is_file() and (run / "tokenizer" / "manifest.json").is_file()
    assert not (run / "checkpoints").exists()
    _fit_run("kmeans", tmp_path / "kmeans")

    # a model run takes its image fields from either, and refuses the wrong mode by name
    text = tmp_path / "text"
    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig

    docs = ShapesSource(ShapesConfig(resolution=48), num=200)
    TextTokenizer.train((t for d in docs for t in d.texts), TextTokenizerConfig(vocab_size=300)).save(text)
    from mixmodal.train.fusion import fill_model_config

    def model_config(mode: str, tokenizer: str):
        return load_run_config(ROOT / f"configs/models/tiny-{mode}.yaml",
                               [f"data.image_tokenizer={tmp_path / tokenizer / 'tokenizer'}", f"data.text_tokenizer={text}",
                                "data.pipeline.seq_len=256"])

    latents = model_config("latents", "pca")
    fill_model_config(latents)
    assert (latents.model.image.latent_channels, latents.model.image.grid_size) == (12, 12)
    tokens = model_config("tokens", "kmeans")
    fill_model_config(tokens)
    assert (tokens.model.image.num_codes, tokens.model.image.grid_size) == (512, 6)
    with pytest.raises(ConfigError, match=r"mode=tokens needs a discrete image tokenizer.*PCA patch tokenizer"):
        fill_model_config(model_config("tokens", "pca"))
    with pytest.raises(ConfigError, match=r"mode=latents needs a continuous image tokenizer.*k-means patch tokenizer"):
        fill_model_config(model_config("latents", "kmeans"))


@pytest.mark.parametrize("mode", ["latents", "tokens"])
def test_a_model_trains_and_draws_on_a_patch_tokenizer(tmp_path, mode):
    kind = "pca" if mode == "latents" else "kmeans"
    _fit_run(kind, tmp_path / kind)
    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.inference.config import GenerationConfig
    from mixmodal.inference.engine import Engine
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig

    docs = ShapesSource(ShapesConfig(resolution=48), num=200)
    TextTokenizer.train((t for d in docs for t in d.texts), TextTokenizerConfig(vocab_size=300)).save(tmp_path / "text")
    config = load_run_config(ROOT / f"configs/models/tiny-{mode}.yaml",
                             [f"data.image_tokenizer={tmp_path / kind / 'tokenizer'}", f"data.text_tokenizer={tmp_path / 'text'}",
                              "data.source=shapes:split=train,resolution=48", "data.eval_source=shapes:split=heldout,resolution=48",
                              "data.pipeline.seq_len=256", "trainer.steps=3"])
    result = train(config, tmp_path / "run")
    assert torch.isfinite(torch.tensor(result["eval_text_ce"]))
    engine = Engine.from_pretrained(tmp_path / "run" / "model")
    assert engine.image_tokenizer.kind == kind
    result = engine.generate("a photo of a red circle", GenerationConfig(mode="image", diffusion_steps=2), seed=0)[0]
    assert [im.size for im in result.document.images] == [(48, 48)]  # decoded by the patch tokenizer
