"""A converted Chameleon generates text through mixmodal's Engine as transformers does.

Tiny random `ChameleonForConditionalGeneration`s with a tokenizer made here in Chameleon's
layout (<s> 0, <pad> 1, </s> 2, <unk> 3, IMGIMG codes 4.., <eoss>, <racm3:break>,
<reservedNNNNN> with 08707 renamed <image> as transformers does, then byte-level BPE),
converted with `mixmodal convert hf-chameleon`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mixmodal import vocab as V
from mixmodal.cli import main
from mixmodal.inference.checkpoint import CheckpointError
from mixmodal.inference.config import GenerationConfig, SamplingParams
from mixmodal.inference.engine import Engine
from mixmodal.inference.prompt import PromptError
from mixmodal.interop.chameleon_tokenizer import ChameleonTokenizer
from mixmodal.interop.hf_chameleon import VocabMap, convert_hf_chameleon, image_token_name
from mixmodal.interop.hf_chameleon_export import convert_to_hf_chameleon

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

NUM_CODES, UNNAMED = 64, 6  # the model has 6 ids beyond the tokenizer's, without names
TINY_VQ = dict(base_channels=32, channel_multiplier=[1, 2], resolution=16, num_res_blocks=1, latent_channels=8,
               embed_dim=8, num_embeddings=NUM_CODES, attn_resolutions=[8])
TEXTS = ["the cat sat on the mat", "a red circle and a blue square", "two small dogs ran to the big red house",
         "the sun is over the green hill", "three blue circles sat in a row, then the cat ran"] * 4
GREEDY = GenerationConfig(mode="text", max_new_tokens=24, text=SamplingParams(temperature=0))


def chameleon_tokenizer() -> Tokenizer:
    specials = ["<s>", "<pad>", "</s>", "<unk>", *(image_token_name(c) for c in range(NUM_CODES)), "<eoss>",
                "<racm3:break>", *(f"<reserved{n:05d}>" for n in range(8700, 8724))]
    specials[specials.index("<reserved08707>")] = "<image>"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=len(specials) + 256 + 40, special_tokens=specials, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])  # adds BOS
    assert [tok.token_to_id(n) for n in ("<s>", "<pad>", "</s>", "<unk>", "IMGIMGAZ")] == [0, 1, 2, 3, 4]
    return tok


def hf_chameleon(tok: Tokenizer, seed: int = 0):
    names = tok.get_vocab(with_added_tokens=True)
    config = transformers.ChameleonConfig(
        vocab_size=len(names) + UNNAMED, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vq_config=TINY_VQ, vocabulary_map=names,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    torch.manual_seed(seed)
    model = transformers.ChameleonForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.lm_head.weight.mul_(20)  # peaked logits: greedy is far from ties
    return model.eval()


def never_sample_by_meta(tok: Tokenizer, vocab_size: int) -> list[int]:
    """Meta's VocabInfo, written out here: not text = no name, or a name starting with "<" (but "<"),
    except </s> and <reserved08706> (they end a turn) and <racm3:break> (image_generation decides)."""
    names = {i: n for n, i in tok.get_vocab(with_added_tokens=True).items()}
    keep = ("</s>", "<reserved08706>", "<racm3:break>")
    return [i for i in range(vocab_size)
            if i not in names or (names[i].startswith("<") and names[i] != "<" and names[i] not in keep)]


def build(tmp_path, tok: Tokenizer, hf=None, save_tokenizer: bool = True):
    hf = hf if hf is not None else hf_chameleon(tok)
    hf.save_pretrained(tmp_path / "hf")
    if save_tokenizer:
        tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    _, notes = convert_hf_chameleon(tmp_path / "hf", tmp_path / "ours")
    return hf, tmp_path / "ours", notes


def hf_greedy(hf, tok: Tokenizer, prompt: str, suppress: list[int], max_new_tokens: int = 24) -> list[int]:
    ids = [tok.token_to_id("<s>")] + tok.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                          suppress_tokens=suppress, pad_token_id=tok.token_to_id("<pad>"),
                          eos_token_id=[tok.token_to_id("</s>"), tok.token_to_id("<reserved08706>")])
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.set_num_threads(1)
    tok = chameleon_tokenizer()
    hf, folder, notes = build(tmp_path_factory.mktemp("chameleon"), tok)
    return tok, hf, folder, notes


def test_greedy_text_matches_transformers_token_for_token(converted):
    tok, hf, folder, notes = converted
    engine = Engine.from_pretrained(folder)
    assert isinstance(engine.text_tokenizer, ChameleonTokenizer) and engine.image_generation is False
    index = VocabMap.read(folder / "vocab_map.json").hf_to_mixmodal
    suppress = never_sample_by_meta(tok, hf.config.vocab_size) + [tok.token_to_id("<racm3:break>")]  # images off
    prompts = ["the cat sat on", "a red circle and two blue", "three"]
    results = engine.generate(prompts, GREEDY)  # one batch, prompts of different lengths
    lengths = []
    for prompt, result in zip(prompts, results):
        expected = hf_greedy(hf, tok, prompt, suppress)
        assert result.ids == [index[i] for i in expected], prompt
        stop = expected[-1] in (tok.token_to_id("</s>"), tok.token_to_id("<reserved08706>"))
        assert result.finish_reason == ("eos" if stop else "length")
        assert result.document.texts[0] == tok.decode(expected[:-1] if stop else expected)
        lengths.append(len(expected))
    assert max(lengths) > 5, lengths  # the comparison covers real runs of text


def test_generate_cli_writes_the_same_text_and_refuses_images_on_base_chameleon(converted, tmp_path, capsys):
    tok, hf, folder, _ = converted
    expected = Engine.from_pretrained(folder).generate("the cat sat on", GREEDY)[0]
    assert main(["generate", str(folder), "--prompt", "the cat sat on", "--mode", "text", "--max-new-tokens", "24",
                 "--out", str(tmp_path / "gen"), "text.temperature=0"]) == 0
    record = json.loads((tmp_path / "gen" / "documents.jsonl").read_text().splitlines()[0])
    assert record["parts"][0]["text"] == expected.document.texts[0]
    assert main(["generate", str(folder), "--prompt", "the cat", "--out", str(tmp_path / "x")]) == 2  # interleaved
    err = capsys.readouterr().err
    assert "image_generation: false" in err and "generation.yaml" in err and "mode=text" in err


def test_adapter_round_trips_text_and_names_the_special_slots(converted):
    tok, _, folder, notes = converted
    adapter = Engine.from_pretrained(folder).text_tokenizer
    index = VocabMap.read(folder / "vocab_map.json").hf_to_mixmodal
    for text in ["the cat sat on the mat", " two  dogs\n", "héllo wörld ✓"]:
        ids = adapter.encode(text)
        assert ids == [index[i] for i in tok.encode(text, add_special_tokens=False).ids]  # no <s> added
        assert adapter.decode(ids) == text
    text = "<s> is not <reserved08706> a control id </s>"  # written in text, Chameleon's names stay text
    ids = adapter.encode(text)
    assert adapter.decode(ids) == text and all(V.NUM_SPECIAL <= i < adapter.vocab_size for i in ids)
    assert not set(ids) & set(VocabMap.read(folder / "vocab_map.json").never_sample)
    assert adapter.encode_batch(["the cat", "a dog"]) == [adapter.encode("the cat"), adapter.encode("a dog")]
    chameleon = {V.PAD: "<pad>", V.BOS: "<s>", V.EOS: "</s>", V.BOI: "<racm3:break>", V.EOI: "<eoss>",
                 V.END_OF_TURN: "<reserved08706>"}
    for ours, theirs in chameleon.items():
        slot = V.special_id(ours)
        assert index[tok.token_to_id(theirs)] == slot
        assert adapter.id_to_token(slot) == ours and adapter.token_to_id(ours) == slot
    assert adapter.token_to_id("<eoss>") == V.special_id(V.END_OF_SPAN) != index[tok.token_to_id("<eoss>")]
    fillers = [f"<reserved{n:05d}>" for n in range(8708, 8720)]  # 12 unused ones from 08708 up, in slot order
    others = [t for t in V.SPECIAL_TOKENS if t not in chameleon]
    assert [index[tok.token_to_id(f)] for f in fillers] == [V.special_id(t) for t in others]
    assert adapter.token_to_id("the") == index[tok.token_to_id("the")]
    assert adapter.id_to_token(index[7]) == tok.id_to_token(7)
    assert adapter.decode([V.special_id(V.BOS), *adapter.encode("the cat")]) == "the cat"  # slots are not text
    assert any("<s> -> <bos> 1" in n and "never sampled" in n for n in notes)


def test_never_sample_ids_are_masked_even_when_they_would_win(tmp_path):
    torch.set_num_threads(1)
    tok = chameleon_tokenizer()
    hf = hf_chameleon(tok, seed=1)
    boi, eot = tok.token_to_id("<racm3:break>"), tok.token_to_id("<reserved08706>")
    suppress = never_sample_by_meta(tok, hf.config.vocab_size) + [boi]
    with torch.no_grad():  # every non-text row (and <racm3:break>) scaled up: unmasked, they win every step
        hf.lm_head.weight[suppress] *= 10
    hf, folder, _ = build(tmp_path / "a", tok, hf)
    prompt = "the cat sat on"
    assert set(hf_greedy(hf, tok, prompt, [], 8)) <= set(suppress)  # what the unmasked model writes
    vocab_map = VocabMap.read(folder / "vocab_map.json")
    index = vocab_map.hf_to_mixmodal
    assert sorted(vocab_map.never_sample) == sorted(index[i] for i in suppress if i != boi)
    engine = Engine.from_pretrained(folder)
    banned = set(vocab_map.never_sample) | {V.special_id(V.BOI)}
    for mode in ("text", "free"):  # free mode allows mixmodal's CM3 sentinels: here they are fillers
        greedy = engine.generate(prompt, GenerationConfig(mode=mode, max_new_tokens=16,
                                                          text=SamplingParams(temperature=0)))[0]
        sampled = engine.generate(prompt, GenerationConfig(mode=mode, max_new_tokens=16), seed=3)[0]
        assert greedy.ids and not set(greedy.ids) & banned and not set(sampled.ids) & banned, mode
    greedy = engine.generate(prompt, GREEDY)[0]
    assert greedy.ids == [index[i] for i in hf_greedy(hf, tok, prompt, suppress)]  # and still transformers' tokens

    with torch.no_grad():  # end of turn beats the first (unmasked) winner: both stop at once on <reserved08706>
        hf.lm_head.weight[eot] = hf.lm_head.weight[hf_greedy(hf, tok, prompt, [], 1)[0]] * 2
    hf, folder, _ = build(tmp_path / "b", tok, hf)
    result = Engine.from_pretrained(folder).generate(prompt, GREEDY)[0]
    assert hf_greedy(hf, tok, prompt, suppress) == [eot]
    assert result.ids == [V.special_id(V.END_OF_TURN)] and result.finish_reason == "eos"


def test_image_generation_is_a_setting_of_the_folder(converted, tmp_path):
    _, _, folder, _ = converted
    settings = yaml.safe_load((folder / "generation.yaml").read_text())
    assert settings["image_generation"] is False and settings["max_length"] == 4096
    with pytest.raises(PromptError, match="image_generation: false"):
        Engine.from_pretrained(folder).generate("the cat", GenerationConfig(mode="image"))
    anole = tmp_path / "anole"
    shutil.copytree(folder, anole)
    (anole / "generation.yaml").write_text(yaml.safe_dump({**settings, "image_generation": True}))
    engine = Engine.from_pretrained(anole)
    engine.decode_images = False  # transformers' VQGAN has no decoder: codes only
    result = engine.generate("the cat", GenerationConfig(mode="image", max_new_tokens=engine.per_image + 2))[0]
    vocab = engine.vocab
    assert result.ids[0] == vocab.boi and result.ids[-1] == vocab.eoi
    assert all(vocab.is_image_code(i) for i in result.ids[1:-1]) and len(result.images) == 1


def test_convert_and_back_is_bitwise_with_the_tokenizer(converted, tmp_path):
    tok, hf, folder, _ = converted
    convert_to_hf_chameleon(folder, tmp_path / "back")
    back, info = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "back",
                                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    source, result = hf.state_dict(), back.state_dict()
    assert all(torch.equal(source[k], result[k]) for k in source if not k.startswith("model.vqmodel."))
    copied = folder / "text_tokenizer" / "tokenizer.json"
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == copied.read_bytes()
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocabulary_map"] == hf.config.vocabulary_map


def test_missing_or_unmapped_tokenizer_fails_naming_the_file_and_the_fix(tmp_path):
    torch.set_num_threads(1)
    tok = chameleon_tokenizer()
    _, folder, notes = build(tmp_path / "a", tok, save_tokenizer=False)  # names from config's vocabulary_map
    assert VocabMap.read(folder / "vocab_map.json").special_tokens is not None
    assert any("copy Chameleon's tokenizer" in n for n in notes)
    file = folder / "text_tokenizer" / "tokenizer.json"
    with pytest.raises(CheckpointError, match=r"text_tokenizer/tokenizer.json not found.*copy the transformers "
                                              r"folder's tokenizer.json"):
        Engine.from_pretrained(folder)
    file.parent.mkdir()
    tok.save(str(file))
    assert isinstance(Engine.from_pretrained(folder).text_tokenizer, ChameleonTokenizer)  # the fix works

    other = Tokenizer(models.WordLevel({"<s>": 0, "hello": 1}, unk_token="<s>"))
    other.save(str(file))
    with pytest.raises(CheckpointError, match="not the converted model's"):
        Engine.from_pretrained(folder)

    hf = hf_chameleon(tok)  # a vocabulary without Chameleon's names: converts, cannot generate
    hf.config.vocabulary_map = {(n if n.startswith("IMGIMG") else f"<tok{i}>"): i
                                for n, i in hf.config.vocabulary_map.items()}
    _, plain, notes = build(tmp_path / "b", tok, hf, save_tokenizer=False)
    assert any("cannot generate through mixmodal" in n for n in notes)
    with pytest.raises(CheckpointError, match="reconvert"):
        Engine.from_pretrained(plain)
