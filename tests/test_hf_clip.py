"""transformers' CLIPModel -> mixmodal's dual encoder: the converted encoder gives transformers'
text and image features (both pooling rules, padded batches, the pixel convention), and
what cannot be converted safely is refused with a message saying why."""

from __future__ import annotations

import json

import pytest
import torch

from mixmodal.cli import main
from mixmodal.interop.common import ConversionError
from mixmodal.interop.hf_clip import OPENAI_CLIP_MEAN, convert_hf_clip
from mixmodal.retrieval.document_embedder import DocumentEmbedder

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

NUM_WORDS = 120
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)


def tiny_tokenizer(legacy: bool):
    """A WordLevel tokenizer over w0..w119. legacy: <|endoftext|> has the largest id (as in OpenAI
    CLIP, which argmax pooling relies on); otherwise the special tokens come first."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(NUM_WORDS)]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    names = ["<unk>", *words, *specials] if legacy else [*specials, "<unk>", *words]
    tokenizer = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def tiny_clip(tmp_path, legacy: bool, activation: str = "quick_gelu", preprocessor: bool = True):
    """A random CLIPModel folder (safetensors, tokenizer.json, preprocessor_config.json); every tensor
    perturbed so that none is at its trivial init."""
    tokenizer = tiny_tokenizer(legacy)
    eos = tokenizer.token_to_id("<|endoftext|>")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=NUM_WORDS + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act=activation,
                         bos_token_id=tokenizer.token_to_id("<|startoftext|>"), eos_token_id=2 if legacy else eos,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act=activation),
        projection_dim=16, logit_scale_init_value=2.0)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    src = tmp_path / "hf"
    model.save_pretrained(src)
    tokenizer.save(str(src / "tokenizer.json"))
    if preprocessor:
        (src / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return model, src


def texts(seed: int = 0) -> list[str]:
    """Rows of different lengths; the last is longer than max_length and gets truncated."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, NUM_WORDS, (n,), generator=g)) for n in (2, 7, 13, 30)]


def features(output) -> torch.Tensor:
    """transformers 5 returns an output object (pooler_output = projected features); 4.x a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


@pytest.mark.parametrize("legacy,activation", [(True, "quick_gelu"), (False, "gelu")])
def test_converted_features_match_transformers(tmp_path, legacy, activation):
    torch.set_num_threads(1)
    hf, src = tiny_clip(tmp_path, legacy, activation)
    embedder, notes = convert_hf_clip(src, tmp_path / "ours")
    config = embedder.config
    assert config.text.pooling == ("argmax" if legacy else "eos")
    assert any("legacy" in n for n in notes) == legacy
    assert config.vision.mean == MEAN and config.vision.std == STD
    model = embedder.model

    ids, mask = embedder.tokenize(texts())
    assert (mask.sum(1) < ids.shape[1]).any()  # a padded batch
    assert (ids[torch.arange(4), mask.sum(1) - 1] == config.text.eos_id).all()  # eos ends every row
    assert ids.shape[1] == 16  # the long row is truncated to max_position_embeddings
    with torch.no_grad():
        theirs = features(hf.get_text_features(input_ids=ids, attention_mask=mask))
        ours = model.encode_text(ids, mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if legacy:  # <|endoftext|> is the largest id: argmax finds it
        assert (ids.argmax(-1) == (ids == config.text.eos_id).int().argmax(-1)).all()

    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1  # the library's convention
    hf_pixels = ((pixels + 1) / 2 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs = features(hf.get_image_features(pixel_values=hf_pixels))
        ours = model.encode_image(pixels)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logit_scale, hf.logit_scale)
        out = hf(input_ids=ids[:3], attention_mask=mask[:3], pixel_values=hf_pixels)
        text, image, scale = model(ids[:3], mask[:3], pixels)
    torch.testing.assert_close(scale * text @ image.T, out.logits_per_text, atol=1e-4, rtol=1e-4)


def test_eos_pooling_differs_from_argmax_on_a_new_config(tmp_path):
    """Guards the test above: with <|endoftext|> not the largest id, pooling by argmax would be wrong."""
    hf, src = tiny_clip(tmp_path, legacy=False)
    embedder, _ = convert_hf_clip(src, tmp_path / "ours")
    ids, mask = embedder.tokenize(texts())
    assert not (ids.argmax(-1) == (ids == embedder.config.text.eos_id).int().argmax(-1)).all()


def test_missing_preprocessor_config_uses_openai_statistics(tmp_path):
    _, src = tiny_clip(tmp_path, legacy=True, preprocessor=False)
    embedder, notes = convert_hf_clip(src, tmp_path / "ours")
    assert embedder.config.vision.mean == OPENAI_CLIP_MEAN
    assert any("preprocessor_config.json" in n for n in notes)


def test_pickled_weights_are_refused(tmp_path):
    _, src = tiny_clip(tmp_path, legacy=True)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")  # never unpickled, so any bytes will do
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*never unpickled.*safetensors"):
        convert_hf_clip(src, tmp_path / "ours")


def test_unconvertible_folders_are_refused_by_name(tmp_path):
    _, src = tiny_clip(tmp_path, legacy=True)
    (src / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    with pytest.raises(ConversionError, match="CLIPTokenizerFast"):
        convert_hf_clip(src, tmp_path / "ours")
    (tmp_path / "tokenizer.json").rename(src / "tokenizer.json")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "siglip"}))
    with pytest.raises(ConversionError, match="model_type='siglip'"):
        convert_hf_clip(src, tmp_path / "ours")
    config["text_config"]["hidden_act"] = "gelu_new"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="text_config.hidden_act='gelu_new'"):
        convert_hf_clip(src, tmp_path / "ours")
    config["text_config"]["hidden_act"] = "quick_gelu"
    (src / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    save_file({**state, "text_projection.bias": torch.zeros(16)}, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="text_projection.bias"):
        convert_hf_clip(src, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()  # nothing half-written


def test_cli_writes_a_directory_the_embedder_loads(tmp_path, capsys):
    hf, src = tiny_clip(tmp_path, legacy=False)
    assert main(["convert", "hf-clip", str(src), str(tmp_path / "ours")]) == 0
    assert "converted CLIP" in capsys.readouterr().out
    embedder = DocumentEmbedder.from_pretrained(tmp_path / "ours")
    embeds = embedder.embed_texts(texts())
    ids, mask = embedder.tokenize(texts())
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(features(hf.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
    assert embeds.shape == (4, 16)
    torch.testing.assert_close(torch.from_numpy(embeds), theirs, atol=1e-5, rtol=1e-5)
    assert main(["convert", "hf-clip", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
