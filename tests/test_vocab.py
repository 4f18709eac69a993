"""vocab.py is the one source of ids: layout, ranges and conversions."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch

from mixmodal import vocab as V


def test_special_ids_are_distinct_and_first():
    v = V.Vocab(text_size=1000, num_image_codes=8192)
    ids = [v.pad, v.bos, v.eos, v.boi, v.eoi, v.end_of_span, v.system, v.user, v.assistant, v.end_of_turn, *v.mask_ids]
    assert len(set(ids)) == len(ids) == V.NUM_SPECIAL
    assert set(ids) == set(v.special_ids)
    assert v.pad == 0  # padding id 0 lets zero-initialised buffers mean "pad"
    assert [v.mask(k) for k in range(V.NUM_MASK_SENTINELS)] == list(v.mask_ids)
    assert V.special_id("<boi>") == v.boi


def test_ranges_do_not_overlap_and_size_is_padded():
    v = V.Vocab(text_size=1000, num_image_codes=8192, pad_to_multiple=64)
    assert v.text_ids.start == V.NUM_SPECIAL and v.text_ids.stop == 1000
    assert v.image_code_ids.start == 1000 and v.image_code_ids.stop == 9192
    assert v.size == 9216 and v.size % 64 == 0 and v.size >= 9192
    assert V.Vocab(text_size=1000).size == 1024


@pytest.mark.parametrize("codes", [5, np.array([0, 8191]), torch.tensor([[0, 17], [8191, 3]])])
def test_image_code_round_trip(codes):
    v = V.Vocab(text_size=1000, num_image_codes=8192)
    ids = v.image_code_to_id(codes)
    assert bool(np.all(np.asarray(v.is_image_code(ids))))
    back = v.id_to_image_code(ids)
    assert np.array_equal(np.asarray(back), np.asarray(codes))
    assert not bool(v.is_image_code(999)) and not bool(v.is_image_code(9192))


def test_invalid_layouts_are_refused():
    with pytest.raises(ValueError, match="special tokens"):
        V.Vocab(text_size=V.NUM_SPECIAL)
    with pytest.raises(ValueError, match="mask sentinel index"):
        V.mask_token(V.NUM_MASK_SENTINELS)
    with pytest.raises(KeyError, match="known"):
        V.special_id("<img>")


def test_dict_round_trip_and_mismatched_special_tokens():
    v = V.Vocab(text_size=1000, num_image_codes=16)
    assert V.Vocab.from_dict(v.to_dict()) == v
    bad = v.to_dict() | {"special_tokens": ["<pad>", "<eos>"]}
    with pytest.raises(ValueError, match="different special-token list"):
        V.Vocab.from_dict(bad)


# Chameleon's own vocabulary spells two of its tokens like ours (its <eoss> ends an image, ours ends a
# CM3 span): the adapter must name them as Chameleon does, not ask vocab.py.
FOREIGN_NAMES = {("interop/chameleon_tokenizer.py", "<pad>"), ("interop/chameleon_tokenizer.py", "<eoss>")}


def test_no_other_module_hard_codes_special_token_strings():
    """Special-token strings live only in vocab.py; everything else asks it."""
    root = pathlib.Path(__file__).resolve().parents[1] / "mixmodal"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "vocab.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in V.SPECIAL_TOKENS \
                    and (path.relative_to(root).as_posix(), node.value) not in FOREIGN_NAMES:
                offenders.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
