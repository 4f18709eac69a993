"""Model folders on disk (model/io.py): loading builds nothing twice, keeps a bf16 checkpoint bf16,
gives exactly the saved model, and answers a damaged weights file with one line naming it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.io import ModelDirError, load_model_dir, save_model_dir, write_model_dir
from mixmodal.model.transformer import TransformerConfig


def _model(tie: bool = False, dim: int = 32, layers: int = 2) -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(ModelConfig(text_vocab_size=300, tie_embeddings=tie,
                                   image=ImageConfig(mode="tokens", num_codes=32, grid_size=4),
                                   transformer=TransformerConfig(dim=dim, num_layers=layers, num_heads=4)))


@pytest.mark.parametrize("tie", [False, True])
def test_a_loaded_model_is_the_saved_model(tmp_path, tie):
    model = _model(tie).eval()
    save_model_dir(model, tmp_path)
    loaded = load_model_dir(tmp_path)
    ids = torch.tensor([[1, 20, 30, 40]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert all(p.dtype == torch.float32 and not p.is_meta for p in loaded.parameters())
    if tie:  # one parameter under both names, as the model was built
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_a_bf16_checkpoint_stays_bf16(tmp_path):
    model = _model()
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    write_model_dir(model.config, state, tmp_path)
    bf16 = load_model_dir(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert all(torch.equal(bf16.state_dict()[k], v) for k, v in state.items())
    fp32 = load_model_dir(tmp_path)  # the default upcasts
    assert all(p.dtype == torch.float32 for p in fp32.parameters())


@pytest.mark.parametrize("damage, says", [
    (lambda path: path.write_bytes(b""), r"is empty \(0 bytes\)"),
    (lambda path: path.write_bytes(path.read_bytes()[:-1000]), "is not a readable safetensors file"),
    (lambda path: path.write_bytes(b"PK\x03\x04 a zip, not weights" * 10), "is not a readable safetensors file"),
])
def test_a_damaged_weights_file_is_one_line_naming_it(tmp_path, damage, says):
    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
    from tiny import save_engine_folder, tiny_engine

    texts = (t for d in ShapesSource(ShapesConfig(resolution=32), num=50) for t in d.texts)
    save_engine_folder(tiny_engine("tokens", TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=280))), tmp_path)
    (tmp_path / "manifest.json").unlink()  # a folder from before manifests: the weights reader names the damage
    damage(tmp_path / "model.safetensors")  # (with one, its manifest does: tests/test_corruption.py)
    with pytest.raises(ModelDirError, match=says) as e:
        load_model_dir(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(e.value) and "earlier checkpoint" in str(e.value)
    result = subprocess.run([sys.executable, "-m", "mixmodal", "generate", str(tmp_path), "--out", str(tmp_path / "g")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "model.safetensors" in result.stderr


@pytest.mark.parametrize("change, says", [
    (lambda state: {k: (v.to(torch.int16) if "lm_head" in k else v) for k, v in state.items()}, "holds torch.int16"),
    (lambda state: {("renamed." + k if "lm_head" in k else k): v for k, v in state.items()}, "missing tensors"),
])
def test_a_wrong_dtype_or_renamed_tensor_names_the_tensor(tmp_path, change, says):
    model = _model()
    write_model_dir(model.config, change(dict(model.state_dict())), tmp_path)
    with pytest.raises(ModelDirError, match=says) as e:
        load_model_dir(tmp_path)
    assert "lm_head.weight" in str(e.value) and "model.safetensors" in str(e.value)


def test_loading_a_bf16_checkpoint_peaks_near_the_weights_bytes(tmp_path):
    """A ~30M-parameter bf16 model folder loaded in bf16: the process's peak memory grows by about the
    file's size, not by an fp32 copy or a second copy (meta-device init, memory-mapped weights)."""
    model = _model(dim=512, layers=8)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    write_model_dir(model.config, state, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    script = textwrap.dedent(f"""
        import resource, torch
        from mixmodal.model.io import load_model_dir
        from mixmodal.model.fusion import FusionModel
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = load_model_dir({str(tmp_path)!r}, dtype=torch.bfloat16)
        s = sum(float(p.float().sum()) for p in model.parameters())  # every weight touched
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown <= 1.2 * size, f"peak grew {grown / 2**20:.0f} MiB loading a {size / 2**20:.0f} MiB file"
