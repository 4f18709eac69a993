"""`mixmodal generate` end to end on a tiny saved checkpoint, and its errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image as PILImage

from mixmodal.cli import main
from mixmodal.data.shapes import ShapesConfig
from mixmodal.data.sources import ShapesSource
from mixmodal.inference.checkpoint import write_generation_settings
from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.io import save_model_dir
from mixmodal.model.transformer import TransformerConfig
from mixmodal.objectives.diffusion import DiffusionConfig
from mixmodal.tokenizers.image import save_image_tokenizer
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

TRUNK = dict(resolution=16, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, norm_groups=4)


@pytest.fixture(scope="module", params=["tokens", "latents"])
def checkpoint(request, tmp_path_factory):
    """A model folder as `mixmodal train` writes it: weights, both tokenizers, generation.yaml."""
    mode = request.param
    out = tmp_path_factory.mktemp(f"ckpt-{mode}") / "model"
    torch.manual_seed(0)
    texts = (t for doc in ShapesSource(ShapesConfig(resolution=32), num=100) for t in doc.texts)
    text = TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=280))
    if mode == "tokens":
        image_tok = VQTokenizer(VQConfig(**TRUNK, latent_channels=8, codebook_size=32, codebook_dim=4))
        image = ImageConfig(mode="tokens", num_codes=32, grid_size=8)
    else:
        image_tok = VAETokenizer(VAEConfig(**TRUNK, latent_channels=4))
        image = ImageConfig(mode="latents", latent_channels=4, grid_size=8, patch_size=4)
    model = FusionModel(ModelConfig(text_vocab_size=text.vocab_size, image=image,
                                    transformer=TransformerConfig(dim=32, num_layers=2, num_heads=4)))
    save_model_dir(model, out)
    text.save(out / "text_tokenizer")
    save_image_tokenizer(image_tok, out / "image_tokenizer")
    write_generation_settings(out, max_length=160, diffusion=DiffusionConfig() if mode == "latents" else None)
    return out


def test_generate_writes_documents_pngs_and_a_page(checkpoint, tmp_path, capsys):
    image = tmp_path / "in.png"
    PILImage.new("RGB", (20, 20), (200, 30, 30)).save(image)
    out = tmp_path / "gen"
    code = main(["generate", str(checkpoint), "--prompt", "a red circle", "--prompt", "a blue square", "--image",
                 str(image), "--mode", "image", "--cfg", "2", "--seed", "3", "--num", "2", "--steps", "3",
                 "--out", str(out), "image.top_k=10"])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed
    records = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert len(records) == 4 and [r["metadata"]["seed"] for r in records] == [3, 4, 5, 6]
    assert all(r["parts"][0]["type"] == "image" for r in records)
    assert len(list((out / "images").glob("*.png"))) == 4
    page = (out / "index.html").read_text()
    assert page.count("<img") == 4 + 4  # 4 prompt images, 4 generated
    assert "image.top_k" in page and "10" in page


def test_generate_python_api_mirrors_the_cli(checkpoint, tmp_path):
    import mixmodal

    out = mixmodal.generate(checkpoint, "a red circle", mode="interleaved", cfg=1.5, seed=0, steps=2,
                            max_new_tokens=80, out=tmp_path / "py")
    assert len(out.results) == 1 and out.files.html.is_file()
    again = mixmodal.generate(checkpoint, "a red circle", mode="interleaved", cfg=1.5, seed=0, steps=2, max_new_tokens=80)
    assert again.results[0].ids == out.results[0].ids  # seeded


def test_generate_errors_are_one_clear_line(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    assert main(["generate", str(checkpoint), "--image", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "readable PNG or JPEG" in err and "Traceback" not in err

    assert main(["generate", str(checkpoint), "--prompt", "a red circle " * 80, "--out", str(tmp_path / "o")]) == 2
    assert "context is 160" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["generate", str(checkpoint), "--mode", "video", "--out", str(tmp_path / "o")])
    assert "invalid choice: 'video'" in capsys.readouterr().err

    assert main(["generate", str(checkpoint), "key.nope=1", "--out", str(tmp_path / "o")]) == 2
    assert "key" in capsys.readouterr().err

    stripped = tmp_path / "no-image-tokenizer"
    shutil.copytree(checkpoint, stripped)
    shutil.rmtree(stripped / "image_tokenizer")
    assert main(["generate", str(stripped), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no image_tokenizer/ folder" in err and "--mode text" in err
    assert main(["generate", str(stripped), "--prompt", "x", "--mode", "text", "--out", str(tmp_path / "o2")]) == 0

    assert main(["generate", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err

    import mixmodal.inference.compiled as compiled  # --compile reaches the engine, which names what is missing

    with pytest.MonkeyPatch.context() as m:
        m.setattr(compiled.shutil, "which", lambda name: None)
        assert main(["generate", str(checkpoint), "--prompt", "x", "--compile", "--out", str(tmp_path / "o3")]) == 2
    assert "C++ compiler" in capsys.readouterr().err
