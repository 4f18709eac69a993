"""CM3 causal masking: nothing is lost or invented, spans stay inside one segment, images
move whole, and the sentinels pair each hole with its content."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from mixmodal.data.cm3 import CM3Config, cm3_transform
from mixmodal.data.segments import Segment
from mixmodal.vocab import NUM_MASK_SENTINELS, Vocab

VOCAB = Vocab(text_size=1000, num_image_codes=64)
ALWAYS = CM3Config(rate=1.0)


def text(start: int, length: int, loss: bool = True) -> Segment:
    """A text segment of distinct ids, so every token can be traced back to its place."""
    return Segment("text", list(range(VOCAB.text_ids.start + start, VOCAB.text_ids.start + start + length)), loss=loss)


def image(index: int, num_codes: int = 16) -> Segment:
    codes = np.arange(index * num_codes, (index + 1) * num_codes) % VOCAB.num_image_codes
    return Segment("image", [int(i) for i in VOCAB.image_code_to_id(codes)], image=index)


def document() -> list[Segment]:
    latent_image = Segment("image", [], image=2)  # latent mode: no ids
    return [text(0, 12), image(0), text(100, 5), text(200, 3, loss=False), image(1), text(300, 1), latent_image]


def flatten(segments: list[Segment]) -> list:
    """Text ids as ints, each image as one ("image", index, ids) item."""
    out: list = []
    for s in segments:
        out += s.ids if s.kind == "text" else [("image", s.image, tuple(s.ids))]
    return out


def undo(out: list[Segment]) -> tuple[list, dict[int, list]]:
    """(the original flattened document, {k: content of span k}) from a transformed one."""
    items = flatten(out)
    sentinels = set(VOCAB.mask_ids)
    tail_start = [i for i, x in enumerate(items) if x == VOCAB.mask(0)][1]
    body, tail = items[:tail_start], items[tail_start:]
    contents: dict[int, list] = {}
    for x in tail:
        if x in sentinels:
            k = VOCAB.mask_ids.index(x)
            assert k not in contents, "a sentinel appears twice in the tail"
            contents[k] = []
        else:
            contents[k].append(x)
    restored: list = []
    for x in body:
        restored += contents[VOCAB.mask_ids.index(x)] if x in sentinels else [x]
    return restored, contents


def is_slice(part: list, whole: list) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


def split_tail(out: list[Segment]) -> tuple[list[Segment], list[Segment]]:
    """(body, tail): the tail starts at the second <mask:0> segment."""
    tail_start = [i for i, s in enumerate(out) if s.ids == [VOCAB.mask(0)]][1]
    return out[:tail_start], out[tail_start:]


def test_transform_is_invertible_and_spans_stay_inside_one_segment():
    doc = document()
    originals = flatten(doc)
    for seed in range(300):
        out = cm3_transform(doc, VOCAB, np.random.default_rng(seed), ALWAYS)
        restored, contents = undo(out)
        n = len(contents)
        assert restored == originals
        assert 1 <= n <= ALWAYS.max_spans and sorted(contents) == list(range(n))
        items = flatten(out)
        # the same tokens, plus each sentinel exactly twice
        assert Counter(items) == Counter(originals) + Counter({VOCAB.mask(k): 2 for k in range(n)})
        for k, content in contents.items():
            assert content, "an empty span"
            if isinstance(content[0], tuple):
                assert len(content) == 1  # a whole image, alone
            else:
                assert any(is_slice(content, s.ids) for s in doc if s.kind == "text" and s.loss), content
        # sentinels in the body come in reading order: <mask:0> first
        body, _ = split_tail(out)
        assert [x for x in flatten(body) if x in VOCAB.mask_ids] == [VOCAB.mask(k) for k in range(n)]


def test_loss_flags_sentinels_off_moved_content_on_and_images_moved_whole():
    doc = document()
    moved_images = set()
    for seed in range(300):
        out = cm3_transform(doc, VOCAB, np.random.default_rng(seed), ALWAYS)
        body, tail = split_tail(out)
        for s in out:
            is_sentinel = s.kind == "text" and len(s.ids) == 1 and s.ids[0] in VOCAB.mask_ids
            assert s.loss is not (is_sentinel or s is doc[3])
            if s.kind == "image":
                assert any(s is original for original in doc)  # the very segment, never a copy or a piece
        assert [s.ids[0] for s in tail[::2]] == [VOCAB.mask(k) for k in range(len(tail) // 2)]
        moved_images |= {s.image for s in tail if s.kind == "image"}
        # the loss=False segment is never masked: it reaches the output unchanged, in place
        assert any(s is doc[3] for s in body)
    assert moved_images == {0, 1, 2}  # token-mode and latent-mode images alike


def test_rate_zero_is_the_identity_and_rate_is_the_fraction_transformed():
    doc = document()
    rng = np.random.default_rng(0)
    assert all(cm3_transform(doc, VOCAB, rng, CM3Config(rate=0.0)) is doc for _ in range(20))
    rng = np.random.default_rng(0)
    transformed = sum(cm3_transform(doc, VOCAB, rng, CM3Config(rate=0.3)) is not doc for _ in range(2000))
    assert abs(transformed / 2000 - 0.3) < 0.04


def test_nothing_maskable_returns_the_document_unchanged():
    rng = np.random.default_rng(0)
    only_images = [image(0), image(1)]
    assert cm3_transform(only_images, VOCAB, rng, CM3Config(rate=1.0, mask_images=False)) is only_images
    no_targets = [text(0, 5, loss=False), Segment("text", [])]
    assert cm3_transform(no_targets, VOCAB, rng, ALWAYS) is no_targets
    assert cm3_transform([], VOCAB, rng, ALWAYS) == []


def test_mask_images_off_moves_only_text():
    doc = document()
    for seed in range(100):
        out = cm3_transform(doc, VOCAB, np.random.default_rng(seed), CM3Config(rate=1.0, mask_images=False))
        _, contents = undo(out)
        assert all(isinstance(x, int) for c in contents.values() for x in c)


@pytest.mark.parametrize("max_spans", [1, 3, NUM_MASK_SENTINELS])
def test_span_count_is_a_clamped_poisson(max_spans):
    doc = [text(0, 400)]  # room for any number of spans
    rng = np.random.default_rng(1)
    config = CM3Config(rate=1.0, max_spans=max_spans)
    counts = Counter(len(undo(cm3_transform(doc, VOCAB, rng, config))[1]) for _ in range(3000))
    assert min(counts) >= 1 and max(counts) <= max_spans
    expected = Counter()
    for draw in range(30):  # Poisson(1), clamped
        expected[min(max(draw, 1), max_spans)] += math.exp(-1) / math.factorial(draw)
    for j, p in expected.items():
        assert abs(counts[j] / 3000 - p) < 0.03, (j, counts[j] / 3000, p)


def test_reproducible_with_a_seeded_generator():
    doc = document()
    a = [cm3_transform(doc, VOCAB, np.random.default_rng(s), ALWAYS) for s in range(20)]
    b = [cm3_transform(doc, VOCAB, np.random.default_rng(s), ALWAYS) for s in range(20)]
    assert a == b
    assert len({tuple(map(repr, x)) for x in a}) > 10


def test_config_and_segment_errors_name_the_field():
    with pytest.raises(ValueError, match="max_spans"):
        CM3Config(max_spans=NUM_MASK_SENTINELS + 1)
    with pytest.raises(ValueError, match="rate"):
        CM3Config(rate=1.5)
    with pytest.raises(ValueError, match="image segment needs the index"):
        Segment("image", [1, 2])
    with pytest.raises(ValueError, match="kind"):
        Segment("audio", [1])
