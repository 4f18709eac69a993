"""Captioning and VQA metrics: BLEU and CIDEr-D equal pycocoevalcap's on a random corpus (which
repeats n-grams, mixes 1 to 5 references and has 0- and 1-word captions), and the metrics
behave as their definitions say; bad input is refused naming the item."""

from __future__ import annotations

import random

import pytest

from mixmodal.eval.text_metrics import (PTB_PUNCTUATION, bleu, cider_d, normalize_answer, tokenize,
                                        vqa_accuracy)

VOCAB = ["red", "blue", "green", "circle", "square", "triangle", "left", "of", "a", "the"]


def random_corpus(seed: int = 0, num_items: int = 50) -> tuple[list[str], list[list[str]]]:
    """Captions from a 10-word vocabulary (so n-grams repeat across items), with punctuation that
    tokenize drops; some candidates copy a reference, one is empty and some have one word."""
    rng = random.Random(seed)

    def caption(low: int, high: int) -> str:
        words = [rng.choice(VOCAB) for _ in range(rng.randint(low, high))]
        return " ".join(words) + rng.choice(["", ".", " .", "!", ", ok"])

    candidates, references = [], []
    for i in range(num_items):
        refs = [caption(1 if i % 7 == 0 else 3, 12) for _ in range(rng.randint(1, 5))]
        if i % 5 == 0:
            candidate = refs[0].upper()  # a copy, modulo case: every n-gram matches
        else:
            candidate = caption(1, 14)
        candidates.append(candidate)
        references.append(refs)
    candidates[3], candidates[4], candidates[6] = "", "circle.", "Square"
    return candidates, references


def coco_inputs(candidates: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """pycocoevalcap's (gts, res): text tokenized as its PTBTokenizer would hand it over."""
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(tokenize(c))] for i, c in enumerate(candidates)}
    return gts, res


def test_random_corpus_has_the_edge_cases():
    candidates, references = random_corpus()
    lengths = [len(tokenize(c)) for c in candidates]
    assert 0 in lengths and 1 in lengths and max(lengths) >= 10
    assert any(len(tokenize(r)) == 1 for refs in references for r in refs)
    assert {len(refs) for refs in references} == {1, 2, 3, 4, 5}


def test_bleu_matches_pycocoevalcap():
    from_coco = pytest.importorskip("pycocoevalcap.bleu.bleu")
    candidates, references = random_corpus()
    ours = bleu(candidates, references)
    theirs, per_item = from_coco.Bleu(4).compute_score(*coco_inputs(candidates, references), verbose=0)
    for k in range(4):
        assert ours[f"bleu{k + 1}"] == pytest.approx(theirs[k], abs=1e-9, rel=0)
    assert ours["per_item"] == pytest.approx(per_item[3], abs=1e-9, rel=0)
    assert 0.05 < ours["bleu4"] < ours["bleu1"] < 1  # not a degenerate corpus


def test_cider_d_matches_pycocoevalcap():
    from_coco = pytest.importorskip("pycocoevalcap.cider.cider")
    candidates, references = random_corpus()
    score, per_item = cider_d(candidates, references)
    their_score, their_items = from_coco.Cider().compute_score(*coco_inputs(candidates, references))
    assert score == pytest.approx(float(their_score), abs=1e-9, rel=0)
    assert per_item == pytest.approx(their_items.tolist(), abs=1e-9, rel=0)
    assert per_item[3] == 0 and max(per_item) > 1  # the empty candidate; the copies score high


def test_tokenize_drops_coco_punctuation_only():
    assert tokenize('The RED circle, left of "a" square... (twice)!') == \
        ["the", "red", "circle", "left", "of", "a", "square", "twice"]
    assert tokenize("a left-most circle - 2.5 wide, 1,000 of them; ok?") == \
        ["a", "left-most", "circle", "2.5", "wide", "1,000", "of", "them", "ok"]
    for mark in PTB_PUNCTUATION - {"-LRB-", "-RRB-", "-LCB-", "-RCB-"}:  # PTB's names of brackets
        assert tokenize(f"red {mark} circle{mark}") == ["red", "circle"], mark


def test_perfect_candidate_beats_shuffled_one():
    references = [["a small red circle left of a big blue square"], ["the green triangle is above the circle"]]
    perfect = [refs[0] for refs in references]
    shuffled = [" ".join(random.Random(1).sample(r.split(), len(r.split()))) for r in perfect]
    assert bleu(perfect, references)["bleu4"] == pytest.approx(1.0)
    assert bleu(shuffled, references)["bleu4"] < 0.5
    # two items: every n-gram has df 1 and idf log 2, so the copy is a perfect match
    assert cider_d(perfect, references)[0] == pytest.approx(10.0)
    assert cider_d(shuffled, references)[0] < 5.0


def test_bleu4_vanishes_without_a_matching_4gram():
    result = bleu(["red circle blue square green triangle"], [["red circle and blue square and green triangle"]])
    assert result["bleu1"] > 0.5
    assert result["bleu4"] < 1e-3
    assert result["per_item"] == [pytest.approx(result["bleu4"])]


def test_short_candidate_pays_the_brevity_penalty():
    references = [["a red circle left of a blue square"]]
    full, short = bleu(["a red circle left of a blue square"], references), bleu(["a red circle"], references)
    assert short["bleu1"] == pytest.approx(2.718281828 ** (1 - 8 / 3), rel=1e-6)  # all 3 words match
    assert short["length_ratio"] == pytest.approx(3 / 8) and full["length_ratio"] == 1


def test_one_item_corpus_has_zero_cider():
    assert cider_d(["a red circle"], [["a red circle"]]) == (0.0, [0.0])  # idf = log(1 / 1), as pycocoevalcap


def test_vqa_normalisation():
    assert normalize_answer("Two.") == normalize_answer("2") == "2"
    assert normalize_answer("a red circle") == normalize_answer("Red  circle!") == "red circle"
    assert normalize_answer("The 1,000 circles") == "1000 circles"
    assert normalize_answer("2.5") == "2.5"
    assert normalize_answer("ten") == "10" and normalize_answer("eleven") == "eleven"


def test_vqa_accuracy_overall_and_by_type():
    predictions = ["Two.", "a red circle", "blue", "yes", "3"]
    answers = ["2", "red circle", "green", "Yes", "three"]
    types = ["count", "what", "color", "yes/no", "count"]
    result = vqa_accuracy(predictions, answers, types)  # all but "blue" vs "green" match
    assert result["accuracy"] == pytest.approx(0.8) and result["n"] == 5
    assert result["by_type"] == {"color": 0.0, "count": 1.0, "what": 1.0, "yes/no": 1.0}
    assert vqa_accuracy(predictions, answers)["by_type"] == {}


def test_bad_input_is_refused_naming_the_item():
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty.*at least one reference"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"references\[0\] is a string.*\['a red circle'\]"):
        bleu(["a red circle"], ["a red circle"])
    with pytest.raises(ValueError, match=r"references\[0\]\[1\] = '\.\.\.' has no words"):
        bleu(["a"], [["a", "..."]])
    with pytest.raises(ValueError, match=r"candidates\[1\] is NoneType"):
        cider_d(["a", None], [["a"], ["b"]])
    with pytest.raises(ValueError, match="no items"):
        bleu([], [])
    with pytest.raises(ValueError, match="n must be a positive integer"):
        bleu(["a"], [["a"]], n=0)
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        vqa_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="1 types for 2 predictions"):
        vqa_accuracy(["a", "b"], ["a", "b"], ["count"])
    with pytest.raises(ValueError, match=r"answers\[1\] = 'the' is empty after normalisation"):
        vqa_accuracy(["x", "y"], ["x", "the"])
