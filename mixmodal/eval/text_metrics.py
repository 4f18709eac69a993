"""Captioning and VQA metrics: BLEU, CIDEr-D and VQA accuracy, in plain Python.

    tokenize          lower-case, drop coco-caption's punctuation, split on whitespace
    bleu              corpus BLEU-1..n (Papineni et al. 2002, "BLEU: a Method for Automatic
                      Evaluation of Machine Translation"), as coco-caption computes it
    cider_d           CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description
                      Evaluation"), as coco-caption computes it
    normalize_answer  VQA answer normalisation (Antol et al. 2015, "VQA: Visual Question Answering")
    vqa_accuracy      exact match after normalisation, overall and per question type

BLEU and CIDEr-D follow pycocoevalcap (the coco-caption scorers every captioning paper
reports) number for number, including its quirks: BLEU's smoothing constants and "closest"
reference length, CIDEr-D's document frequencies taken over the evaluated set's own
references and its clipped tf-idf weights. tests/test_eval_text_metrics.py pins both against
pycocoevalcap to 1e-9 on a random corpus. Every captioning metric takes raw strings and
tokenizes them with `tokenize`; pycocoevalcap's scorers take text already tokenized by
its PTBTokenizer (which needs Java), so the tests feed them " ".join(tokenize(text)).

Inputs: candidates[i] is one generated string, references[i] the list of reference strings
for the same item (at least one); bad input raises ValueError naming the item.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

# coco-caption's PTBTokenizer drops these tokens (its PUNCTUATIONS) after PTB tokenization
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
# the characters those tokens come from: quotes, (), {}, and .,?!:; -; a period or comma between
# two digits is part of a number (2.5, 1,000) and a hyphen inside a word ("left-most") is kept, as PTB does
_PTB_DROPPED = re.compile(r"""[?!:;`'"(){}]|(?<!\d)[.,]|[.,](?!\d)|(?<!\w)-+|-+(?!\w)""")

MAX_ORDER = 4  # n-grams of 1..4 words: BLEU-4 and CIDEr-D
BLEU_TINY, BLEU_SMALL = 1e-15, 1e-9  # coco-caption's BLEU smoothing: (matches + tiny) / (guesses + small)
CIDER_SIGMA = 6.0  # width of CIDEr-D's Gaussian length penalty, in words
CIDER_SCALE = 10.0  # CIDEr-D is reported x10

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(["a", "an", "the"])
_VQA_PUNCTUATION = re.compile(r"""[;/\[\]"{}()=+\\_\-><@`,?!*#%^&$:|~]|(?<!\d)\.|\.(?!\d)""")

Ngrams = Counter  # n-gram (a tuple of words) -> count


def tokenize(text: str) -> list[str]:
    """Lower-cased words with coco-caption's punctuation removed.

    A simplification of coco-caption's PTBTokenizer (Stanford CoreNLP, Java): the same
    punctuation is dropped and the text lower-cased, but nothing else is split, so a
    contraction stays one word ("don't" -> "dont", PTB: "do n't") and symbols such as $ or %
    stay attached. The shapes world's captions have none of these, so both agree on them."""
    if not isinstance(text, str):
        raise ValueError(f"tokenize takes a string, got {type(text).__name__}")
    return _PTB_DROPPED.sub(" ", text.lower()).split()


def ngram_counts(words: Sequence[str], max_order: int = MAX_ORDER) -> Ngrams:
    """Every n-gram of 1..max_order words with its count; n = len(ngram)."""
    return Counter(tuple(words[i:i + n]) for n in range(1, max_order + 1) for i in range(len(words) - n + 1))


def _check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]], metric: str
                  ) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Tokenized candidates and references; ValueError naming the item on anything malformed."""
    for name, value in (("candidates", candidates), ("references", references)):
        if isinstance(value, str):
            raise ValueError(f"{metric}: {name} is one string; pass a list with one entry per item")
    if len(candidates) != len(references):
        raise ValueError(f"{metric}: {len(candidates)} candidates but {len(references)} reference lists; pass one "
                         "list of reference captions per candidate, in the same order")
    if not candidates:
        raise ValueError(f"{metric}: no items to score (candidates and references are empty)")
    cands, refs = [], []
    for i, (candidate, item_refs) in enumerate(zip(candidates, references)):
        if not isinstance(candidate, str):
            raise ValueError(f"{metric}: candidates[{i}] is {type(candidate).__name__}, not a string; pass one "
                             "generated caption per item")
        if isinstance(item_refs, str):
            raise ValueError(f"{metric}: references[{i}] is a string; each item takes a list of reference captions "
                             f"(write [{item_refs[:40]!r}] for a single one)")
        if len(item_refs) == 0:
            raise ValueError(f"{metric}: references[{i}] is empty; every item needs at least one reference caption "
                             f"(drop item {i} or add its references)")
        words = []
        for j, ref in enumerate(item_refs):
            if not isinstance(ref, str):
                raise ValueError(f"{metric}: references[{i}][{j}] is {type(ref).__name__}, not a string")
            words.append(tokenize(ref))
            if not words[-1]:
                raise ValueError(f"{metric}: references[{i}][{j}] = {ref!r} has no words after tokenization; "
                                 "remove it from the reference list")
        cands.append(tokenize(candidate))  # an empty candidate is allowed: it scores 0
        refs.append(words)
    return cands, refs


# --- BLEU ------------------------------------------------------------------------------------

def _bleu_from_counts(correct: Sequence[float], guess: Sequence[float], test_len: float, ref_len: float
                      ) -> list[float]:
    """BLEU-1..n from clipped matches and guesses per order: the geometric mean of the smoothed
    precisions, times the brevity penalty exp(1 - ref_len / test_len) when the candidate is short."""
    scores, product = [], 1.0
    for k, (c, g) in enumerate(zip(correct, guess)):
        product *= (c + BLEU_TINY) / (g + BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + BLEU_TINY) / (ref_len + BLEU_SMALL)  # smoothed as in coco-caption: no division by 0
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = MAX_ORDER) -> dict:
    """Corpus BLEU-1..n, as pycocoevalcap's Bleu(n).compute_score.

    Per item and order k: matches are the candidate's k-gram counts clipped by the largest
    count in any one reference; guesses are max(0, len - k + 1); the reference length is the
    one closest to the candidate's (ties: the shorter). The corpus score sums matches,
    guesses and lengths over items first, then takes sum-precisions and one brevity penalty.

    -> {"bleu1": ..., "bleu{n}": ..., "per_item": BLEU-n of each item (same smoothing),
        "length_ratio": total candidate words / total closest-reference words}"""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"bleu: n must be a positive integer (the highest n-gram order), got {n!r}")
    cands, refs = _check_corpus(candidates, references, "bleu")
    total_correct, total_guess = [0] * n, [0] * n
    total_test, total_ref = 0, 0
    per_item = []
    for words, item_refs in zip(cands, refs):
        max_ref_counts: Ngrams = Counter()
        for ref in item_refs:
            max_ref_counts |= ngram_counts(ref, n)  # | keeps the larger count of each n-gram
        correct = [0] * n
        for ngram, count in ngram_counts(words, n).items():
            correct[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        guess = [max(0, len(words) - k) for k in range(n)]
        ref_len = min((abs(len(r) - len(words)), len(r)) for r in item_refs)[1]
        per_item.append(_bleu_from_counts(correct, guess, len(words), ref_len)[-1])
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
        total_test += len(words)
        total_ref += ref_len
    scores = _bleu_from_counts(total_correct, total_guess, total_test, total_ref)
    return {**{f"bleu{k + 1}": s for k, s in enumerate(scores)}, "per_item": per_item,
            "length_ratio": total_test / total_ref}


# --- CIDEr-D ---------------------------------------------------------------------------------

def _tfidf(counts: Ngrams, document_frequency: Counter, log_num_items: float) -> tuple[list[dict], list[float]]:
    """Per order n: {ngram: tf * idf} and that vector's L2 norm."""
    vectors: list[dict] = [{} for _ in range(MAX_ORDER)]
    for ngram, tf in counts.items():
        # idf = log(N / df); an n-gram in no reference gets df 1, the largest idf
        vectors[len(ngram) - 1][ngram] = tf * (log_num_items - math.log(max(1.0, document_frequency[ngram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
    return vectors, norms


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """CIDEr-D, as pycocoevalcap's Cider().compute_score -> (corpus score, per-item scores).

    For n = 1..4, a caption is a vector of tf-idf weights over its n-grams, with document
    frequency df(g) = the number of items whose references contain g (over the evaluated
    set itself, so a score depends on the whole corpus) and idf = log(N / max(1, df)).
    Per reference: sum over the candidate's n-grams of min(w_cand, w_ref) * w_ref (CIDEr-D's
    clipping) divided by both norms, times exp(-(length difference)^2 / (2 * 6^2)); then the
    mean over references and orders, x10. The corpus score is the mean over items. A corpus of
    one item scores 0 (every idf is log(1/1) = 0), as in pycocoevalcap."""
    cands, refs = _check_corpus(candidates, references, "cider_d")
    ref_counts = [[ngram_counts(r) for r in item_refs] for item_refs in refs]
    document_frequency: Counter = Counter()
    for item_counts in ref_counts:
        document_frequency.update(set().union(*item_counts))  # each item counts once per n-gram
    log_num_items = math.log(len(cands))
    gaussian = 2 * CIDER_SIGMA ** 2
    scores = []
    for words, item_refs, item_counts in zip(cands, refs, ref_counts):
        vec, norm = _tfidf(ngram_counts(words), document_frequency, log_num_items)
        total = [0.0] * MAX_ORDER
        for ref, counts in zip(item_refs, item_counts):
            vec_ref, norm_ref = _tfidf(counts, document_frequency, log_num_items)
            # pycocoevalcap measures lengths in bigrams (words - 1 for a non-empty caption); only
            # the difference enters, references are never empty and an empty candidate scores 0
            # whatever its penalty, so word counts give the same scores
            penalty = math.exp(-((len(words) - len(ref)) ** 2) / gaussian)
            for k in range(MAX_ORDER):
                dot = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] and norm_ref[k]:
                    dot /= norm[k] * norm_ref[k]
                total[k] += dot * penalty
        scores.append(CIDER_SCALE * sum(total) / MAX_ORDER / len(item_refs))
    return sum(scores) / len(scores), scores


# --- VQA -------------------------------------------------------------------------------------

def normalize_answer(answer: str) -> str:
    """VQA's answer normalisation (the official evaluation's processPunctuation and
    processDigitArticle, simplified: no table of contractions): lower-case; apostrophes
    removed ("don't" -> "dont"); other punctuation -> a space, except a decimal point ("2.5"
    stays) and a thousands comma ("1,000" -> "1000"); number words zero..ten -> digits;
    articles a, an, the dropped; single spaces."""
    if not isinstance(answer, str):
        raise ValueError(f"normalize_answer takes a string, got {type(answer).__name__}")
    text = answer.lower().replace("'", "")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    words = _VQA_PUNCTUATION.sub(" ", text).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str], types: Sequence[str] | None = None) -> dict:
    """VQA accuracy with one reference answer per question.

    VQA scores an answer min(#annotators who gave it / 3, 1) over its 10 human answers; with
    one reference per question that is exact match of the normalised strings (normalize_answer).

    -> {"accuracy": mean over questions, "n": number of questions,
        "by_type": {question type: accuracy} (empty without `types`)}"""
    for name, value in (("predictions", predictions), ("answers", answers), ("types", types)):
        if isinstance(value, str):
            raise ValueError(f"vqa_accuracy: {name} is one string; pass a list with one entry per question")
    if len(predictions) != len(answers):
        raise ValueError(f"vqa_accuracy: {len(predictions)} predictions but {len(answers)} answers; pass one "
                         "reference answer per prediction, in the same order")
    if types is not None and len(types) != len(predictions):
        raise ValueError(f"vqa_accuracy: {len(types)} types for {len(predictions)} predictions; pass one question "
                         "type per prediction, or types=None")
    if not predictions:
        raise ValueError("vqa_accuracy: no questions to score (predictions and answers are empty)")
    correct = []
    for i, (prediction, answer) in enumerate(zip(predictions, answers)):
        for name, value in (("predictions", prediction), ("answers", answer)):
            if not isinstance(value, str):
                raise ValueError(f"vqa_accuracy: {name}[{i}] is {type(value).__name__}, not a string")
        reference = normalize_answer(answer)
        if not reference:
            raise ValueError(f"vqa_accuracy: answers[{i}] = {answer!r} is empty after normalisation (articles and "
                             "punctuation are dropped); fix or drop that question")
        correct.append(normalize_answer(prediction) == reference)
    by_type: dict[str, float] = {}
    if types is not None:
        groups: dict[str, list[bool]] = {}
        for i, (kind, ok) in enumerate(zip(types, correct)):
            if not isinstance(kind, str):
                raise ValueError(f"vqa_accuracy: types[{i}] is {type(kind).__name__}, not a string")
            groups.setdefault(kind, []).append(ok)
        by_type = {kind: sum(oks) / len(oks) for kind, oks in sorted(groups.items())}
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "by_type": by_type}


__all__ = ["ARTICLES", "NUMBER_WORDS", "PTB_PUNCTUATION", "bleu", "cider_d", "ngram_counts", "normalize_answer",
           "tokenize", "vqa_accuracy"]
