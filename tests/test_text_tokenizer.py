"""Byte-level BPE: special ids agree with vocab.py; encode/decode round-trips exactly."""

from __future__ import annotations

import json
import random

import pytest

from mixmodal import vocab as V
from mixmodal.config import ConfigError, build_config
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig

CORPUS = [
    "two red circles above a blue square",
    "a small green triangle in the top left corner",
    "Question: how many stars are there? Answer: three",
    "move the yellow star to the bottom right",
] * 50


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(CORPUS, TextTokenizerConfig(vocab_size=400, min_frequency=2))


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F6FF), (0x10000, 0x1000F), (0x0300, 0x036F), (0x200B, 0x200F), (0xE000, 0xE0FF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_special_tokens_have_vocab_ids(tokenizer):
    for i, token in enumerate(V.SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i
    assert tokenizer.vocab_size <= 400
    v = tokenizer.vocab(num_image_codes=16)
    assert v.text_size == tokenizer.vocab_size and v.image_code_ids.start == tokenizer.vocab_size


def test_merges_were_learned(tokenizer):
    ids = tokenizer.encode("two red circles above a blue square")
    assert len(ids) < len("two red circles above a blue square") / 2
    assert all(i >= V.NUM_SPECIAL for i in ids)


def test_round_trip_arbitrary_unicode(tokenizer):
    rng = random.Random(0)
    samples = ["", " ", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "naïve café Ωμέγα 漢字 🙂👍🏽",
               "e\u0301 vs \u00e9 (not normalised)", "\x00\x01 control", "\ufeffBOM"]
    samples += [_random_unicode(rng, rng.randint(1, 60)) for _ in range(300)]
    for s in samples:
        assert tokenizer.decode(tokenizer.encode(s)) == s, repr(s)


def test_special_strings_in_text_stay_text(tokenizer):
    text = "a literal <boi> and <mask:3> and <|user|> in the data"
    ids = tokenizer.encode(text)
    assert not set(ids) & set(range(V.NUM_SPECIAL)), "text must never produce control ids"
    assert tokenizer.decode(ids) == text


def test_save_load_and_transformers_compatible_files(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = TextTokenizer.load(tmp_path)
    assert again.encode("a blue <boi> star") == tokenizer.encode("a blue <boi> star")
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["pad_token"] == V.PAD
    assert TextTokenizer.load(tmp_path / "tokenizer.json").vocab_size == tokenizer.vocab_size


def test_foreign_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False))
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"special token '<pad>' has id None.*mixmodal tokenizer train"):
        TextTokenizer.load(tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="mixmodal tokenizer train"):
        TextTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        TextTokenizer.load(tmp_path)


def test_config_validation():
    with pytest.raises(ConfigError, match="vocab_size=100 is too small"):
        build_config(TextTokenizerConfig, None, ["vocab_size=100"])
