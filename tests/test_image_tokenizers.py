"""Image tokenizers: shapes, quantiser behaviour, the KL posterior, save/load, input checks, CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

import mixmodal
from mixmodal.cli import main
from mixmodal.config import ConfigError
from mixmodal.tokenizers.image import (
    build_image_tokenizer,
    build_image_tokenizer_config,
    load_image_tokenizer,
    save_image_tokenizer,
)
from mixmodal.tokenizers.pixels import images_to_tensor, tensor_to_images
from mixmodal.tokenizers.vae import DiagonalGaussian, VAEConfig, VAETokenizer, fit_latent_scaling
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer, codebook_stats

TINY = dict(resolution=16, base_channels=4, num_res_blocks=1, norm_groups=2)


def tiny_vq(**kw) -> VQTokenizer:
    torch.manual_seed(0)
    fields = dict(TINY, channel_multipliers=[1, 2], latent_channels=8, codebook_size=32, codebook_dim=4)
    return VQTokenizer(VQConfig(**{**fields, **kw}))


def tiny_vae(**kw) -> VAETokenizer:
    torch.manual_seed(0)
    return VAETokenizer(VAEConfig(**{**TINY, "channel_multipliers": [1, 2], "latent_channels": 4, **kw}))


def images(n=2, size=16, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("mults", [[1, 2, 2], [1, 1, 2, 2], [1, 2, 2, 2, 4]], ids=["x4", "x8", "x16"])
@pytest.mark.parametrize("attention", [True, False])
def test_shapes_for_each_downsampling(mults, attention):
    factor = 2 ** (len(mults) - 1)
    vq = tiny_vq(resolution=32, channel_multipliers=mults, attention=attention)
    vae = tiny_vae(resolution=32, channel_multipliers=mults, attention=attention, attention_resolutions=[32 // factor * 2])
    x = images(2, 32)
    codes = vq.encode(x)
    assert codes.shape == (2, 32 // factor, 32 // factor) and codes.dtype == torch.long
    assert vq.grid_size == 32 // factor and vq.num_codes == 32
    assert vq.decode(codes).shape == (2, 3, 32, 32)
    latents = vae.encode(x)
    assert latents.shape == (2, 4, 32 // factor, 32 // factor)
    assert vae.decode(latents).shape == (2, 3, 32, 32)
    # attention_resolutions names the second-lowest level: attention there, in both halves, and nowhere else
    assert vae.decoder.up_blocks[1].attentions is not None and vae.encoder.down_blocks[-2].attentions is not None
    assert vae.decoder.up_blocks[0].attentions is None and vae.encoder.down_blocks[-1].attentions is None
    assert (vae.encoder.mid_block.attentions is not None) == attention
    out = vq(x)
    assert out.reconstruction.shape == x.shape and out.codes.shape == codes.shape
    assert set(out.losses) == {"codebook", "commitment"} and set(out.stats) == {"perplexity", "usage"}


def test_trunk_names_follow_diffusers():
    keys = set(tiny_vae().state_dict())
    for key in ["encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight",
                "encoder.down_blocks.0.downsamplers.0.conv.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.mid_block.attentions.0.to_q.weight", "encoder.mid_block.attentions.0.to_out.0.bias",
                "encoder.mid_block.resnets.1.norm2.weight", "encoder.conv_norm_out.weight", "quant_conv.weight",
                "decoder.up_blocks.0.resnets.1.conv2.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight",
                "decoder.up_blocks.1.resnets.1.norm1.weight", "post_quant_conv.weight", "decoder.conv_out.weight"]:
        assert key in keys, key
    assert "decoder.up_blocks.1.upsamplers.0.conv.weight" not in keys  # the full-resolution block does not upsample


def test_vq_straight_through_reaches_the_encoder():
    vq = tiny_vq()
    out = vq(images())
    out.reconstruction.pow(2).mean().backward()
    grad = vq.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_vq_losses_give_codebook_and_encoder_gradients():
    vq = tiny_vq(codebook="euclidean")
    out = vq(images())
    out.losses["codebook"].backward(retain_graph=True)
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0 and vq.encoder.conv_in.weight.grad is None
    out.losses["commitment"].backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0


def test_l2_codebook_matches_unit_vectors_by_cosine():
    vq = tiny_vq(codebook="l2")
    quantised = vq.quantize.lookup(vq.encode(images()))  # (B, D, h, w)
    assert torch.allclose(quantised.norm(dim=1), torch.ones(()), atol=1e-5)
    z = torch.nn.functional.normalize(vq.encode_latents(images()), dim=1)
    codebook = vq.quantize.codebook_vectors()  # (K, D)
    best = torch.einsum("bdhw,kd->bkhw", z, codebook).argmax(1)
    assert torch.equal(best, vq.encode(images()))


def test_ema_codebook_moves_to_assigned_means_and_has_no_codebook_loss():
    vq = tiny_vq(codebook="ema", ema_decay=0.5, restart_after=0)
    assert not vq.quantize.embedding.weight.requires_grad
    before = vq.quantize.embedding.weight.clone()
    out = vq.train()(images())
    assert float(out.losses["codebook"]) == 0.0 and float(out.losses["commitment"].detach()) > 0
    after = vq.quantize.embedding.weight
    used = torch.unique(out.codes)
    assert not torch.allclose(after[used], before[used])
    unused = torch.ones(vq.num_codes, dtype=torch.bool)
    unused[used] = False
    assert torch.allclose(after[unused], before[unused], rtol=1e-3, atol=1e-6)  # unused codes stay (no blow-up)
    vq.eval()(images())
    assert torch.equal(vq.quantize.embedding.weight, after)  # no updates in eval mode


@pytest.mark.parametrize("codebook", ["l2", "ema", "euclidean"])
def test_dead_codes_are_restarted_from_encoder_outputs(codebook):
    vq = tiny_vq(codebook=codebook, restart_after=2, codebook_size=64).train()
    x = images()
    first = vq(x).codes.unique()
    unused = torch.ones(64, dtype=torch.bool)
    unused[first] = False
    before = vq.quantize.embedding.weight.detach().clone()
    vq(x)  # second step: codes unused twice hit restart_after and are re-initialised
    after = vq.quantize.embedding.weight.detach()
    assert unused.any()
    assert not torch.isclose(after[unused], before[unused]).all(dim=1).any()
    z = vq.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, 4)
    if codebook == "l2":
        z = torch.nn.functional.normalize(z, dim=1)
    # every revived code is one of this batch's encoder outputs
    distance = (after[unused][:, None, :] - z.detach()[None]).abs().amax(dim=2).min(dim=1).values
    assert distance.max() < 1e-6
    assert (vq.quantize.steps_since_used[unused] == 0).all()


def test_codebook_stats():
    assert codebook_stats(torch.tensor([0, 1, 2, 3]), 8) == {"perplexity": pytest.approx(4.0), "usage": 0.5}
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 4)["perplexity"] == pytest.approx(1.0)


def test_kl_zero_for_standard_normal_and_positive_otherwise():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(DiagonalGaussian(zeros, zeros).kl(), torch.zeros(2))
    assert (DiagonalGaussian(zeros + 0.5, zeros).kl() > 0).all()
    assert (DiagonalGaussian(zeros, zeros - 1).kl() > 0).all()
    assert DiagonalGaussian(zeros, torch.full_like(zeros, 100.0)).logvar.max() == 20.0  # diffusers' clamp


def test_vae_sampling_is_reproducible_with_a_generator():
    vae = tiny_vae()
    x = images()
    a = vae(x, generator=torch.Generator().manual_seed(3))
    b = vae(x, generator=torch.Generator().manual_seed(3))
    c = vae(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.reconstruction, b.reconstruction)
    assert not torch.equal(a.latents, c.latents)
    assert a.losses["kl"].ndim == 0 and float(a.losses["kl"].detach()) > 0


def test_latent_scaling_gives_unit_variance():
    vae = tiny_vae()
    batches = [images(4, seed=s) for s in range(3)]
    scale, shift = fit_latent_scaling(vae, batches, center=True)
    assert vae.config.scaling_factor == scale and vae.config.shift_factor == shift
    scaled = vae.scale_latents(torch.cat([vae.encode(b) for b in batches]))
    assert scaled.mean().abs() < 1e-4 and (scaled.std(unbiased=False) - 1).abs() < 1e-4
    z = vae.encode(batches[0])
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_vq, tiny_vae], ids=["vq", "vae"])
def test_save_load_round_trip(tmp_path, make):
    model = make()
    if isinstance(model, VQTokenizer):
        model.train()(images())  # touch the buffers so they are not at their init values
    save_image_tokenizer(model, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.yaml", "manifest.json", "model.safetensors"]
    loaded = mixmodal.load_image_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(model) and not loaded.training and loaded.config == model.config
    model.eval()
    x = images(seed=7)
    with torch.no_grad():
        if isinstance(model, VQTokenizer):
            assert torch.equal(loaded.encode(x), model.encode(x))
            assert torch.equal(loaded(x).reconstruction, model(x).reconstruction)
        else:
            assert torch.equal(loaded.encode(x), model.encode(x))
            assert torch.equal(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_mismatched_checkpoint_names_the_tensor_and_shapes(tmp_path):
    save_image_tokenizer(tiny_vq(), tmp_path / "tok")
    config = yaml.safe_load((tmp_path / "tok" / "config.yaml").read_text())
    assert config["kind"] == "vq"
    config["codebook_size"] = 16
    config["attention"] = False
    (tmp_path / "tok" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"config.yaml (has \d+ bytes, the manifest says|does not match its SHA-256)"):
        load_image_tokenizer(tmp_path / "tok")  # the edit is caught by manifest.json first
    (tmp_path / "tok" / "manifest.json").unlink()  # a folder without one: the tensors are checked against the config
    with pytest.raises(ValueError) as e:
        load_image_tokenizer(tmp_path / "tok")
    message = str(e.value)
    assert "quantize.embedding.weight: checkpoint has shape (32, 4), the config expects (16, 4)" in message
    assert "unexpected tensors" in message and "encoder.mid_block.attentions.0.to_q.weight" in message
    assert "model.safetensors" in message


def test_missing_files_say_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="mixmodal convert"):
        load_image_tokenizer(tmp_path / "nothing")
    save_image_tokenizer(tiny_vae(), tmp_path / "tok")
    (tmp_path / "tok" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model.safetensors is missing \(.*manifest.json\).*re-copy"):
        load_image_tokenizer(tmp_path / "tok")  # manifest.json lists it
    (tmp_path / "tok" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing.*mixmodal train"):
        load_image_tokenizer(tmp_path / "tok")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="norm_groups=3 does not divide 4 channels"):
        VQConfig(**{**TINY, "norm_groups": 3})
    with pytest.raises(ValueError, match="resolution=20 is not divisible by the downsampling factor 8"):
        VAEConfig(resolution=20, channel_multipliers=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="codebook must be"):
        VQConfig(codebook="cosine")
    with pytest.raises(ValueError, match="restart_after"):
        VQConfig(restart_after=-1)
    with pytest.raises(ConfigError, match="kind: expected one of vq, vae"):
        build_image_tokenizer_config({"kind": "gan"})
    with pytest.raises(ConfigError, match="codebook.*allowed values"):
        build_image_tokenizer_config({"kind": "vq"}, ["codebook=cosine"])


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 16, 16, 3), r"channels-first.*permute\(0, 3, 1, 2\)"),
    (torch.zeros(2, 1, 16, 16), "3 \\(RGB\\) channels; got 1"),
    (torch.zeros(2, 4, 16, 16), "3 \\(RGB\\) channels; got 4"),
    (torch.zeros(3, 16, 16), "add a batch axis"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), r"images.float\(\) / 127.5 - 1"),
    (torch.zeros(2, 3, 32, 32), "trained at 16x16"),
    (torch.full((2, 3, 16, 16), 255.0), r"\[-1, 1\].*127.5"),
    (torch.full((2, 3, 16, 16), -1.5), r"must lie in \[-1, 1\]"),
])
@pytest.mark.parametrize("make", [tiny_vq, tiny_vae], ids=["vq", "vae"])
def test_bad_images_fail_at_the_boundary(make, bad, message):
    with pytest.raises(ValueError, match=message):
        make().encode(bad)


def test_any_size_allows_divisible_sizes_only():
    vq = tiny_vq()
    assert vq.encode(images(1, 24), any_size=True).shape == (1, 12, 12)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        vq.encode(images(1, 15), any_size=True)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        vq.decode(torch.full((1, 8, 8), 32))


def test_images_to_tensor_crops_resizes_and_scales():
    wide = PIL.Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # a blue left margin, removed by the centre crop
    x = images_to_tensor([wide, PIL.Image.new("L", (16, 16), 0)], 16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(x[1], torch.full((3, 16, 16), -1.0))
    back = tensor_to_images(x)
    assert back[0].getpixel((0, 0)) == (255, 0, 0)


def test_cli_encode_decode_round_trip(tmp_path, capsys):
    vq, vae = tiny_vq(), tiny_vae()
    save_image_tokenizer(vq, tmp_path / "vq")
    save_image_tokenizer(vae, tmp_path / "vae")
    paths = []
    for i, image in enumerate(tensor_to_images(images(3, seed=5))):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    big = tmp_path / "big.png"
    PIL.Image.new("RGB", (48, 32)).save(big)

    assert main(["image", "encode", str(tmp_path / "vq"), *paths, "--out", str(tmp_path / "codes.npy")]) == 0
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (3, 8, 8) and codes.dtype == np.int32
    expected = vq.eval().encode(images_to_tensor([PIL.Image.open(p) for p in paths], 16))
    assert np.array_equal(codes, expected.numpy())
    assert main(["image", "decode", str(tmp_path / "vq"), str(tmp_path / "codes.npy"), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert PIL.Image.open(tmp_path / "out" / "00000.png").size == (16, 16)

    assert main(["image", "encode", str(tmp_path / "vae"), *paths, str(big), "--resize", "--out", str(tmp_path / "z.npy")]) == 0
    assert np.load(tmp_path / "z.npy").shape == (4, 4, 8, 8)
    assert main(["image", "decode", str(tmp_path / "vae"), str(tmp_path / "z.npy"), "--out", str(tmp_path / "zout")]) == 0
    assert len(list((tmp_path / "zout").iterdir())) == 4
    capsys.readouterr()

    assert main(["image", "encode", str(tmp_path / "vae"), str(big), "--out", str(tmp_path / "x.npy")]) == 2
    assert "big.png: image is 48x32 but the tokenizer was trained at 16x16; pass --resize" in capsys.readouterr().err
    assert main(["image", "encode", str(tmp_path / "vae"), str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.npy")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["image", "decode", str(tmp_path / "vq"), str(tmp_path / "z.npy"), "--out", str(tmp_path / "bad")]) == 2
    assert "integer codes" in capsys.readouterr().err


def test_model_presets_build():
    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "tokenizers" / "models"
    presets = sorted(root.glob("*.yaml"))
    assert {p.stem for p in presets} >= {"vq-tiny", "vae-tiny", "vq-shapes-64", "vae-shapes-64"}
    for path in presets:
        config = build_image_tokenizer_config(path)
        model = build_image_tokenizer(config)
        if path.stem.endswith("tiny"):
            assert sum(p.numel() for p in model.parameters()) < 20_000
        assert dataclasses.asdict(config)  # a plain dataclass, writable as YAML
