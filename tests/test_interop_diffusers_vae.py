"""A tiny random diffusers AutoencoderKL, converted, gives the same latents and images."""

from __future__ import annotations

import json

import pytest
import torch

from mixmodal.cli import main
from mixmodal.interop.common import ConversionError
from mixmodal.interop.diffusers_vae import convert_diffusers_vae, vae_config_from_diffusers

diffusers = pytest.importorskip("diffusers")

CASES = {
    "x2-lpb1-quant": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4),
    "x4-lpb2-lat8": dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=8, latent_channels=8,
                         scaling_factor=0.3, shift_factor=0.1),
    "x4-noquant-noattn": dict(block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=2, latent_channels=4,
                              use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
}


def build_diffusers(kw: dict, size: int = 16):
    torch.manual_seed(0)
    n = len(kw["block_out_channels"])
    model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                    sample_size=size, **kw).eval()
    with torch.no_grad():  # random init leaves norms at identity and some biases at zero: perturb every tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_converted_vae_matches_diffusers(tmp_path, name):
    torch.set_num_threads(1)
    reference = build_diffusers(CASES[name])
    reference.save_pretrained(tmp_path / "src")
    ours, notes = convert_diffusers_vae(tmp_path / "src", tmp_path / "out")
    assert notes == []
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = reference.encode(x).latent_dist
        latents = ours.encode(x)
        assert (latents - posterior.mean).abs().max() <= 1e-5
        assert (ours.encode_distribution(x).logvar - posterior.logvar).abs().max() <= 1e-5
        z = torch.randn(2, CASES[name]["latent_channels"], *latents.shape[2:], generator=torch.Generator().manual_seed(2))
        assert (ours.decode(z) - reference.decode(z).sample).abs().max() <= 1e-5
    assert ours.config.scaling_factor == pytest.approx(CASES[name].get("scaling_factor", 0.18215))
    assert ours.config.shift_factor == pytest.approx(CASES[name].get("shift_factor", 0.0))


def test_old_attention_names_and_model_safetensors(tmp_path):
    """Checkpoints from before diffusers' attention rename (query/key/value/proj_attn as 1x1 convs)."""
    from safetensors.torch import load_file, save_file

    reference = build_diffusers(CASES["x2-lpb1-quant"])
    reference.save_pretrained(tmp_path / "src")
    state = load_file(str(tmp_path / "src" / "diffusion_pytorch_model.safetensors"))
    renamed = {}
    for k, v in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        renamed[k] = v
    (tmp_path / "src" / "diffusion_pytorch_model.safetensors").unlink()
    save_file(renamed, str(tmp_path / "src" / "model.safetensors"))
    ours, _ = convert_diffusers_vae(tmp_path / "src", tmp_path / "out")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert (ours.encode(x) - reference.encode(x).latent_dist.mean).abs().max() <= 1e-5


def test_inexpressible_configs_fail_clearly(tmp_path):
    with pytest.raises(ConversionError, match=r"block_out_channels=\[96, 160\] cannot be written as base_channels"):
        vae_config_from_diffusers({"block_out_channels": [96, 160]})
    with pytest.raises(ConversionError, match="only DownEncoderBlock2D"):
        vae_config_from_diffusers({"down_block_types": ["AttnDownEncoderBlock2D"]})
    with pytest.raises(ConversionError, match="config.json not found"):
        convert_diffusers_vae(tmp_path, tmp_path / "out")
    reference = build_diffusers(CASES["x2-lpb1-quant"])
    reference.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["latent_channels"] = 8
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"quant_conv.weight: checkpoint has shape \(8, 8, 1, 1\), the config expects \(16, 16, 1, 1\)"):
        convert_diffusers_vae(tmp_path / "src", tmp_path / "out")


def test_cli_convert(tmp_path, capsys):
    build_diffusers(CASES["x2-lpb1-quant"]).save_pretrained(tmp_path / "src")
    assert main(["convert", "diffusers-vae", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "kind: vae" in (tmp_path / "out" / "config.yaml").read_text()
    assert main(["convert", "diffusers-vae", str(tmp_path / "nope"), str(tmp_path / "out2")]) == 2
    assert "config.json not found" in capsys.readouterr().err
