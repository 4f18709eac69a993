"""transformers' Chameleon <-> mixmodal: converted models give transformers' logits on every
vocabulary column (through the id permutation), and hf -> mixmodal -> hf is bitwise."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mixmodal.cli import main
from mixmodal.interop.common import ConversionError
from mixmodal.interop.hf_chameleon import VocabMap, convert_hf_chameleon, image_code_of, image_token_name
from mixmodal.interop.hf_chameleon_export import convert_to_hf_chameleon
from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.io import load_model_dir, save_model_dir
from mixmodal.model.transformer import TransformerConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # the load report of a random vqmodel is expected noise here

VOCAB_SIZE, NUM_IMAGE_TOKENS = 200, 64  # 136 text ids: mixmodal pads 200 -> 256 rows
TINY_VQ = dict(base_channels=32, channel_multiplier=[1, 2], resolution=16, num_res_blocks=1, latent_channels=8,
               embed_dim=8, num_embeddings=NUM_IMAGE_TOKENS, attn_resolutions=[8])


def vocabulary_map(seed: int = 0) -> tuple[dict[str, int], list[int]]:
    """Image tokens at scattered ids (not contiguous, not at the end), codes in shuffled order."""
    rng = random.Random(seed)
    image_ids = sorted(rng.sample(range(20, VOCAB_SIZE - 10), NUM_IMAGE_TOKENS))
    codes = list(range(NUM_IMAGE_TOKENS))
    rng.shuffle(codes)
    names = {f"<tok{i}>": i for i in range(VOCAB_SIZE) if i not in set(image_ids)}
    names.update({image_token_name(c): i for i, c in zip(image_ids, codes)})
    names["<image>"] = names.pop("<tok5>")
    return names, image_ids


def tiny_chameleon(swin_norm: bool, num_kv_heads: int, attn: str = "sdpa", **fields):
    names, image_ids = vocabulary_map()
    config = transformers.ChameleonConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, swin_norm=swin_norm, vq_config=TINY_VQ, vocabulary_map=names,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **fields)
    torch.manual_seed(0)
    model = transformers.ChameleonForConditionalGeneration(config)
    with torch.no_grad():  # move norms off 1/0 and biases off 0, so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.config._attn_implementation = attn
    return model.eval(), image_ids


def tokens(image_ids: list[int], seed: int = 1) -> torch.Tensor:
    """Two rows of Chameleon ids, text and image tokens mixed."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, VOCAB_SIZE, (2, 40), generator=g)
    image = torch.tensor(image_ids)[torch.randint(0, len(image_ids), (2, 40), generator=g)]
    return torch.where(torch.rand(2, 40, generator=g) < 0.5, text, image)


def test_image_token_names_follow_transformers():
    assert image_token_name(0) == "IMGIMGAZ" and image_token_name(8191) == "IMGIMGIBJBZ"
    assert image_code_of("IMGIMGIBJBZ") == 8191 and image_code_of("<image>") is None
    mapping = transformers.models.chameleon.modeling_chameleon.ChameleonImageVocabularyMapping(
        {image_token_name(c): 100 + c for c in range(1000)})
    assert mapping.bpe2img == {100 + c: c for c in range(1000)}


@pytest.mark.parametrize("swin_norm,num_kv_heads,attn", [(False, 4, "sdpa"), (True, 2, "eager"), (True, 4, "sdpa"),
                                                         (False, 2, "eager")])
def test_converted_logits_match_transformers(tmp_path, swin_norm, num_kv_heads, attn):
    torch.set_num_threads(1)
    hf, image_ids = tiny_chameleon(swin_norm, num_kv_heads, attn)
    hf.save_pretrained(tmp_path / "hf")
    config, notes = convert_hf_chameleon(tmp_path / "hf", tmp_path / "ours")
    assert any("padded from 200 to 256" in n for n in notes)
    ours = load_model_dir(tmp_path / "ours")
    t = config.transformer
    assert (t.swin_norm, t.kv_heads, t.rope_theta, config.image.num_codes, config.image.grid_size) == \
        (swin_norm, num_kv_heads, 500.0, NUM_IMAGE_TOKENS, 8)
    vocab_map = VocabMap.read(tmp_path / "ours" / "vocab_map.json")
    index = vocab_map.index()  # hf id -> our id
    assert not torch.equal(index, torch.arange(VOCAB_SIZE))  # the permutation is exercised
    assert torch.equal(index[torch.tensor(image_ids)].sort().values, torch.arange(136, 200))

    x = tokens(image_ids)
    with torch.no_grad():
        expected = hf.lm_head(hf.model(input_ids=x).last_hidden_state)  # every column, image tokens included
        masked = hf(input_ids=x).logits  # image columns set to finfo.min by transformers
        logits = ours(index[x]).logits  # [B, T, 256]
    got = logits[..., index]  # back to Chameleon's column order
    diff = (got - expected).abs().max().item()
    print(f"max |logit difference| swin={swin_norm} kv={num_kv_heads} {attn}: {diff:.2e}")
    assert diff <= 1e-4
    text_columns = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    text_columns[image_ids] = False
    assert (got[..., text_columns] - masked[..., text_columns]).abs().max() <= 1e-4
    assert torch.equal(logits[..., VOCAB_SIZE:], torch.zeros_like(logits[..., VOCAB_SIZE:]))  # zero padding rows

    # the VQGAN came along: same codes as transformers' encoder
    from mixmodal.tokenizers.image import load_image_tokenizer

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        codes = load_image_tokenizer(tmp_path / "ours" / "image_tokenizer").encode(images)
        assert torch.equal(codes.flatten(), hf.model.vqmodel.encode(images).image_tokens)


def test_round_trip_is_bitwise_in_the_stored_dtype_from_shards(tmp_path):
    hf, _ = tiny_chameleon(True, 2)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert_hf_chameleon(tmp_path / "hf", tmp_path / "ours")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    hf_config, _ = convert_to_hf_chameleon(tmp_path / "ours", tmp_path / "back")
    back, info = transformers.ChameleonForConditionalGeneration.from_pretrained(
        tmp_path / "back", dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    source, result = hf.state_dict(), back.state_dict()
    assert source.keys() == result.keys()
    lm = [k for k in source if not k.startswith("model.vqmodel.")]
    assert all(torch.equal(source[k], result[k]) for k in lm)  # bitwise, bf16 kept
    vq = [k for k in source if k.startswith("model.vqmodel.")]
    assert all(torch.equal(source[k].float(), result[k].float()) for k in vq)  # via the fp32 image tokenizer
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("vocabulary_map", "bos_token_id", "eos_token_id", "max_position_embeddings", "image_token_id"):
        assert hf_config[key] == original[key]


def test_tied_embeddings_convert_both_ways(tmp_path):
    hf, image_ids = tiny_chameleon(False, 2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")  # lm_head.weight is not in the file
    config, _ = convert_hf_chameleon(tmp_path / "hf", tmp_path / "ours")
    ours = load_model_dir(tmp_path / "ours")
    assert config.tie_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    index = VocabMap.read(tmp_path / "ours" / "vocab_map.json").index()
    x = tokens(image_ids)
    with torch.no_grad():
        assert (ours(index[x]).logits[..., index] - hf.lm_head(hf.model(input_ids=x).last_hidden_state)).abs().max() <= 1e-4
    convert_to_hf_chameleon(tmp_path / "ours", tmp_path / "back")
    back, info = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and back.lm_head.weight is back.model.embed_tokens.weight
    assert all(torch.equal(tensor, back.state_dict()[name]) for name, tensor in hf.state_dict().items())


def test_native_model_exports_with_its_own_ids(tmp_path):
    torch.set_num_threads(1)
    config = ModelConfig(text_vocab_size=100, image=ImageConfig(num_codes=48, grid_size=4),
                         transformer=TransformerConfig(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, swin_norm=True,
                                                       rope_theta=1234.0, ffn_dim=80))
    torch.manual_seed(0)
    ours = FusionModel(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model_dir(ours, tmp_path / "ours")
    hf_config, notes = convert_to_hf_chameleon(tmp_path / "ours", tmp_path / "hf")
    assert any("no vocab_map.json" in n for n in notes) and any("random" in n for n in notes)
    hf, info = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith("model.vqmodel.") for k in info["missing_keys"])
    hf.eval()
    assert hf.model.vocabulary_mapping.image_tokens == list(range(100, 148))
    assert hf.model.vocabulary_mapping.bpe2img == {100 + c: c for c in range(48)}
    x = torch.randint(0, 148, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf.lm_head(hf.model(input_ids=x).last_hidden_state)
        got = ours(x).logits[..., :148]
    assert (got - expected).abs().max() <= 1e-4
    # and back: ids unchanged, padding rows zero, the rest bitwise
    convert_hf_chameleon(tmp_path / "hf", tmp_path / "again")
    again = load_model_dir(tmp_path / "again")
    for name, tensor in ours.state_dict().items():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(again.state_dict()[name][:148], tensor[:148])
        else:
            assert torch.equal(again.state_dict()[name], tensor), name


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), r"rope_parameters.rope_type='linear'"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope_scaling="),
    (dict(num_attention_heads=5), r"hidden_size=64 is not divisible by num_attention_heads=5"),
    (dict(num_key_value_heads=3), r"num_key_value_heads=3 does not divide num_attention_heads=4"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    (dict(model_type="llama"), r"not a Chameleon config \(model_type='llama'"),
    (dict(vocabulary_map={"<image>": 3}), r"no IMGIMG\* entries"),
])
def test_unsupported_configs_fail_naming_the_field(tmp_path, changes, message):
    hf, _ = tiny_chameleon(False, 4)
    hf.save_pretrained(tmp_path / "hf")
    _edit_config(tmp_path / "hf", **changes)
    with pytest.raises(ConversionError, match=message):
        convert_hf_chameleon(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    hf, _ = tiny_chameleon(False, 4)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-chameleon", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "converted Chameleon (2 layers, dim 64" in out and "vocab_map.json" in out
    assert main(["convert", "to-hf-chameleon", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert "wrote transformers ChameleonForConditionalGeneration" in capsys.readouterr().out

    (tmp_path / "empty").mkdir()
    cases = [(["hf-chameleon", str(tmp_path / "missing")], "is not a directory"),
             (["hf-chameleon", str(tmp_path / "empty")], "config.json not found"),
             (["hf-chameleon", str(tmp_path / "ours")], "this is a mixmodal model directory"),
             (["to-hf-chameleon", str(tmp_path / "hf")], "config.yaml not found")]
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "weights.bak")
    cases.append((["hf-chameleon", str(tmp_path / "hf")], "no model.safetensors or model.safetensors.index.json"))
    for args, message in cases:
        assert main(["convert", *args, str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
