"""Image-tokenizer training: the metrics against references, the tiny presets end to end
through `mixmodal train`, and exact resume of the task."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage

from mixmodal.cli import main
from mixmodal.eval.image_metrics import psnr, ssim
from mixmodal.tokenizers.image import load_image_tokenizer
from mixmodal.train import checkpoint as ckpt
from mixmodal.train.image_data import ImageBatches
from mixmodal.train.metrics import read_metrics

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tokenizers"


def _images(seed: int, shape=(3, 3, 32, 40)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. written out plainly with scipy: (C, H, W) in [0, 1], Gaussian sigma 1.5
    truncated to 11 taps, statistics kept where the window fits inside the image."""
    c1, c2, pad = 0.01**2, 0.03**2, 5
    values = []
    for x, y in zip(a, b):
        blur = lambda t: ndimage.gaussian_filter(t, 1.5, truncate=3.5)[pad:-pad, pad:-pad]  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        values.append((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
    return float(np.mean(values))


def test_identical_images_psnr_inf_ssim_one():
    x = _images(0)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_psnr_of_known_noise():
    x = torch.full((2, 3, 16, 16), 0.5, dtype=torch.float64)
    y = x + 0.1 * torch.tensor([1.0, -1.0]).repeat(384)[: 3 * 16 * 16].reshape(1, 3, 16, 16)  # |error| = 0.1 everywhere
    assert torch.allclose(psnr(x, y), torch.full((2,), 20.0, dtype=torch.float64))  # 10 log10(1 / 0.01)


def test_ssim_matches_a_plain_reference():
    x = _images(1)
    y = (x + 0.1 * _images(2)).clamp(0, 1)
    ours = ssim(x, y)
    for i in range(3):
        assert float(ours[i]) == pytest.approx(reference_ssim(x[i].numpy(), y[i].numpy()), abs=1e-9)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x = _images(3)
    y = (x + 0.2 * (_images(4) - 0.5)).clamp(0, 1)
    ours = ssim(x, y)
    for i in range(3):
        theirs = metrics.structural_similarity(x[i].numpy(), y[i].numpy(), channel_axis=0, data_range=1.0,
                                               gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert float(ours[i]) == pytest.approx(theirs, abs=1e-6)


def _train(tmp_path, preset: str, *extra: str) -> pathlib.Path:
    out = tmp_path / preset
    assert main(["train", str(CONFIGS / f"{preset}.yaml"), "--out", str(out), *extra]) == 0
    return out


@pytest.mark.parametrize("preset", ["vq-tiny", "vae-tiny"])
def test_tiny_preset_trains_end_to_end(tmp_path, preset):
    out = _train(tmp_path, preset, "trainer.steps=12", "trainer.warmup_steps=1")
    result = json.loads((out / "eval.json").read_text())
    expected = {"step", "psnr", "ssim", "oracle_overall", "oracle_count", "oracle_colour", "oracle_shape",
                "oracle_size", "oracle_position", "oracle_background"}
    expected |= {"usage", "perplexity"} if preset.startswith("vq") else {"kl"}
    assert expected <= set(result) and result["step"] == 12
    assert 0 <= result["oracle_overall"] <= 1 and 0 < result["ssim"] <= 1
    with PIL.Image.open(out / "samples" / "step_000012.png") as sheet:
        assert sheet.size[0] > 2 * 32
    tokenizer = load_image_tokenizer(out / "tokenizer")
    assert tokenizer.kind == preset.split("-")[0]
    if tokenizer.kind == "vae":
        assert tokenizer.config.scaling_factor != 1.0  # fitted before saving
    losses = [r["losses"]["rec"] for r in read_metrics(out, "train")]
    assert losses[-1] < losses[0]
    assert (out / "config.yaml").is_file() and "task: image-tokenizer" in (out / "config.yaml").read_text()


def test_gan_switches_on_at_its_start_step(tmp_path):
    out = _train(tmp_path, "vq-tiny", "trainer.steps=4", "loss.gan.weight=0.1", "loss.gan.start_step=2",
                 "loss.gan.channels=8", "trainer.eval_every=0", "trainer.save_every=0")
    records = read_metrics(out, "train")  # log_every 2: steps 1-2 without the GAN, 3-4 with it
    assert "disc_loss" not in records[0]["losses"] and "disc_loss" in records[1]["losses"]
    assert set(records[1]["grad_norm"]) == {"tokenizer", "discriminator"}
    weights = load_file(str(ckpt.latest_checkpoint(out) / ckpt.WEIGHTS))
    assert any(k.startswith("discriminator.") for k in weights)


def test_resume_of_the_tokenizer_task_is_exact(tmp_path):
    straight = _train(tmp_path / "a", "vae-tiny", "trainer.steps=6", "trainer.save_every=3")
    resumed = _train(tmp_path / "b", "vae-tiny", "trainer.steps=6", "trainer.save_every=3")
    # drop the last checkpoint: the run is back at step 3, as if it had been killed there
    for path in ckpt.list_checkpoints(resumed)[1:]:
        shutil.rmtree(path)
    torch.manual_seed(999)
    assert main(["train", str(CONFIGS / "vae-tiny.yaml"), "--out", str(resumed), "--resume",
                 "trainer.steps=6", "trainer.save_every=3"]) == 0
    a = load_file(str(ckpt.latest_checkpoint(straight) / ckpt.WEIGHTS))
    b = load_file(str(ckpt.latest_checkpoint(resumed) / ckpt.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "eval.json").read_text()) == json.loads((resumed / "eval.json").read_text())


def test_shapes_batches_resume_by_index():
    batches = ImageBatches("shapes:split=train", 32, batch_size=4)
    first = [next(batches) for _ in range(3)]
    again = ImageBatches("shapes:split=train", 32, batch_size=4)
    again.load_state_dict({"shapes_index": 8})
    assert torch.equal(next(again), first[2]) and again.state_dict() == {"shapes_index": 12}
    assert first[0].shape == (4, 3, 32, 32) and -1 <= float(first[0].min()) and float(first[0].max()) <= 1


def test_resume_with_another_model_is_refused(tmp_path, capsys):
    out = _train(tmp_path, "vq-tiny", "trainer.steps=2")
    code = main(["train", str(CONFIGS / "vq-tiny.yaml"), "--out", str(out), "--resume", "trainer.steps=4",
                 "tokenizer.vq.codebook_size=32"])
    assert code == 1 and "tokenizer.codebook_size: 64 -> 32" in capsys.readouterr().err


def test_unknown_task_names_the_choices(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("task: nope\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "image-tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["vq-tiny", "vae-tiny"])
def test_image_eval_of_the_saved_tokenizer_reproduces_the_final_eval(tmp_path, capsys, preset):
    """`mixmodal image eval` on RUN/tokenizer measures what the run's final eval measured."""
    out = _train(tmp_path, preset)
    final = json.loads((out / "eval.json").read_text())
    capsys.readouterr()
    assert main(["image", "eval", str(out / "tokenizer"), "--num", "16", "--batch-size", "16",
                 "--out", str(tmp_path / "m.json")]) == 0
    measured = json.loads((tmp_path / "m.json").read_text())
    assert measured["images"] == 16 and "oracle_overall" in measured
    for key in ("psnr", "ssim", "oracle_overall", "usage" if preset.startswith("vq") else "kl"):
        assert measured[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key
