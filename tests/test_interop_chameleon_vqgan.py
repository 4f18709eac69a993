"""Chameleon's VQGAN converts: same codes as transformers' ChameleonVQVAE, and as a plain
taming VQModel forward (written here, independently of mixmodal's trunk) from a
Lightning-style vqgan.ckpt, whose decoded images match too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from mixmodal.cli import main
from mixmodal.interop.chameleon_vqgan import convert_chameleon_vqgan
from mixmodal.interop.common import ConversionError

# --- a reference taming VQModel, as functions over its state dict ---------------------------

DD = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
N_EMBED, EMBED_DIM = 64, 4


def norm(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def conv(x, sd, p, padding=1, stride=1):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride=stride, padding=padding)


def resnet(x, sd, p):
    h = conv(F.silu(norm(x, sd, p + ".norm1")), sd, p + ".conv1")
    h = conv(F.silu(norm(h, sd, p + ".norm2")), sd, p + ".conv2")
    if p + ".nin_shortcut.weight" in sd:
        x = conv(x, sd, p + ".nin_shortcut", padding=0)
    return x + h


def attention(x, sd, p):
    B, C, H, W = x.shape
    h = norm(x, sd, p + ".norm")
    q, k, v = (conv(h, sd, f"{p}.{n}", padding=0).reshape(B, C, H * W) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * C**-0.5, dim=2)  # (B, query, key)
    h = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
    return x + conv(h, sd, p + ".proj_out", padding=0)


def taming_encode(x, sd):
    h = conv(x, sd, "encoder.conv_in")
    res = DD["resolution"]
    for i in range(len(DD["ch_mult"])):
        for j in range(DD["num_res_blocks"]):
            h = resnet(h, sd, f"encoder.down.{i}.block.{j}")
            if res in DD["attn_resolutions"]:
                h = attention(h, sd, f"encoder.down.{i}.attn.{j}")
        if i != len(DD["ch_mult"]) - 1:
            h = conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{i}.downsample.conv", padding=0, stride=2)
            res //= 2
    h = resnet(h, sd, "encoder.mid.block_1")
    h = attention(h, sd, "encoder.mid.attn_1")
    h = resnet(h, sd, "encoder.mid.block_2")
    h = conv(F.silu(norm(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    z = conv(h, sd, "quant_conv", padding=0)  # (B, D, h, w)
    e = sd["quantize.embedding.weight"]
    flat = z.permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
    return torch.cdist(flat.double(), e.double()).argmin(1).reshape(z.shape[0], *z.shape[2:])


def taming_decode(codes, sd):
    z = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    h = conv(conv(z, sd, "post_quant_conv", padding=0), sd, "decoder.conv_in")
    h = resnet(h, sd, "decoder.mid.block_1")
    h = attention(h, sd, "decoder.mid.attn_1")
    h = resnet(h, sd, "decoder.mid.block_2")
    res = DD["resolution"] // 2 ** (len(DD["ch_mult"]) - 1)
    for i in reversed(range(len(DD["ch_mult"]))):
        for j in range(DD["num_res_blocks"] + 1):
            h = resnet(h, sd, f"decoder.up.{i}.block.{j}")
            if res in DD["attn_resolutions"]:
                h = attention(h, sd, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv")
            res *= 2
    return conv(F.silu(norm(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def taming_state_dict(seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under taming's names and shapes for DD (plus a `loss.*` tensor to be ignored)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add_conv(p, cin, cout, k=3):
        sd[p + ".weight"] = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        sd[p + ".bias"] = torch.randn(cout, generator=g) * 0.1

    def add_norm(p, c):
        sd[p + ".weight"] = 1 + torch.randn(c, generator=g) * 0.1
        sd[p + ".bias"] = torch.randn(c, generator=g) * 0.1

    def add_resnet(p, cin, cout):
        add_norm(p + ".norm1", cin), add_conv(p + ".conv1", cin, cout), add_norm(p + ".norm2", cout)
        add_conv(p + ".conv2", cout, cout)
        if cin != cout:
            add_conv(p + ".nin_shortcut", cin, cout, 1)

    def add_attention(p, c):
        add_norm(p + ".norm", c)
        for n in ("q", "k", "v", "proj_out"):
            add_conv(f"{p}.{n}", c, c, 1)

    ch, mult, z = DD["ch"], DD["ch_mult"], DD["z_channels"]
    add_conv("encoder.conv_in", 3, ch)
    res, cin = DD["resolution"], ch
    for i, m in enumerate(mult):
        for j in range(DD["num_res_blocks"]):
            add_resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if res in DD["attn_resolutions"]:
                add_attention(f"encoder.down.{i}.attn.{j}", cin)
        if i != len(mult) - 1:
            add_conv(f"encoder.down.{i}.downsample.conv", cin, cin)
            res //= 2
    for part in ("encoder", "decoder"):
        top = ch * mult[-1]
        add_resnet(f"{part}.mid.block_1", top, top), add_attention(f"{part}.mid.attn_1", top)
        add_resnet(f"{part}.mid.block_2", top, top)
    add_norm("encoder.norm_out", cin), add_conv("encoder.conv_out", cin, z)
    add_conv("quant_conv", z, EMBED_DIM, 1), add_conv("post_quant_conv", EMBED_DIM, z, 1)
    sd["quantize.embedding.weight"] = torch.randn(N_EMBED, EMBED_DIM, generator=g)
    add_conv("decoder.conv_in", z, ch * mult[-1])
    cin = ch * mult[-1]
    for i in reversed(range(len(mult))):
        for j in range(DD["num_res_blocks"] + 1):
            add_resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if res in DD["attn_resolutions"]:
                add_attention(f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            add_conv(f"decoder.up.{i}.upsample.conv", cin, cin)
            res *= 2
    add_norm("decoder.norm_out", cin), add_conv("decoder.conv_out", cin, 3)
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4, generator=g)  # training-only: dropped
    return sd


def write_taming_checkpoint(folder, sd) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.4.2", "state_dict": sd,
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5)}},
            "optimizer_states": [], "lr_schedulers": []}
    torch.save(ckpt, folder / "vqgan.ckpt")
    (folder / "vqgan.yaml").write_text(yaml.safe_dump(
        {"model": {"target": "taming.models.vqgan.VQModel",
                   "params": {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": DD, "lossconfig": {"target": "x"}}}}))
    return str(folder / "vqgan.ckpt")


def images(n=3, seed=1):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- tests --------------------------------------------------------------------------------

def test_taming_checkpoint_matches_reference_forward(tmp_path):
    torch.set_num_threads(1)
    sd = taming_state_dict()
    ckpt = write_taming_checkpoint(tmp_path / "src", sd)
    ours, notes = convert_chameleon_vqgan(ckpt, tmp_path / "out")
    assert notes == [] and ours.config.codebook == "euclidean" and not ours.config.encoder_only
    x = images()
    with torch.no_grad():
        codes = ours.encode(x)
        assert torch.equal(codes, taming_encode(x, sd))
        assert (ours.decode(codes) - taming_decode(codes, sd)).abs().max() <= 1e-5


def test_transformers_chameleon_vqvae_gives_the_same_codes(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.ChameleonVQVAEConfig(
        base_channels=32, channel_multiplier=[1, 2, 2], resolution=16, num_res_blocks=2, latent_channels=8,
        embed_dim=8, num_embeddings=64, attn_resolutions=[8])
    reference = transformers.ChameleonVQVAE(config).eval()
    with torch.no_grad():  # perturb the init (unit norms, zero biases) so every tensor matters
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.save_pretrained(tmp_path / "src")
    ours, notes = convert_chameleon_vqgan(tmp_path / "src", tmp_path / "out")
    assert ours.config.encoder_only and "no decoder" in notes[0]
    x = images(4)
    with torch.no_grad():
        expected = reference.encode(x).image_tokens.reshape(4, 4, 4)
        assert torch.equal(ours.encode(x), expected)
        assert len(torch.unique(expected)) > 1  # a meaningful comparison, not all one code
    with pytest.raises(ValueError, match="encoder-only"):
        ours.decode(expected)


def test_unsafe_pickles_are_refused_with_a_clear_error(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    ckpt = write_taming_checkpoint(tmp_path / "src", taming_state_dict())
    torch.save({"state_dict": taming_state_dict(), "hyper_parameters": Payload()}, ckpt)
    with pytest.raises(ConversionError, match=r"weights_only=True\) refused this checkpoint \(it pickles print\).*"
                       "extract the weights once"):
        convert_chameleon_vqgan(ckpt, tmp_path / "out")
    assert "must never run" not in capsys.readouterr().out


def test_mismatched_config_and_unknown_tensors_are_named(tmp_path):
    sd = taming_state_dict()
    ckpt = write_taming_checkpoint(tmp_path / "src", sd)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"model": {"params": {"embed_dim": EMBED_DIM, "n_embed": 128, "ddconfig": DD}}}))
    with pytest.raises(ConversionError, match=r"quantize.embedding.weight: checkpoint has shape \(64, 4\), the config expects \(128, 4\)"):
        convert_chameleon_vqgan(ckpt, tmp_path / "out", config=wrong)
    sd["encoder.extra.weight"] = torch.zeros(1)
    write_taming_checkpoint(tmp_path / "src", sd)
    with pytest.raises(ConversionError, match="no mixmodal counterpart.*encoder.extra.weight"):
        convert_chameleon_vqgan(ckpt, tmp_path / "out")
    (tmp_path / "src" / "vqgan.yaml").unlink()
    with pytest.raises(ConversionError, match="pass --config vqgan.yaml"):
        convert_chameleon_vqgan(ckpt, tmp_path / "out")


def test_cli_convert_then_encode(tmp_path, capsys):
    ckpt = write_taming_checkpoint(tmp_path / "src", taming_state_dict())
    assert main(["convert", "chameleon-vqgan", ckpt, str(tmp_path / "tok")]) == 0
    assert "converted vq tokenizer" in capsys.readouterr().out
    from mixmodal.tokenizers.pixels import tensor_to_images

    tensor_to_images(images(1))[0].save(tmp_path / "a.png")
    assert main(["image", "encode", str(tmp_path / "tok"), str(tmp_path / "a.png"), "--out", str(tmp_path / "c.npy")]) == 0
    assert main(["image", "decode", str(tmp_path / "tok"), str(tmp_path / "c.npy"), "--out", str(tmp_path / "png")]) == 0
