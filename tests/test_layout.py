"""The one sequence layout (mixmodal/data/layout.py): a prompt is the prefix of the training
layout of the document it begins (ids and positions), and conditioning dropout trains exactly
the unconditional stream that guidance feeds at generation, for uncond=empty and uncond=mask."""

from __future__ import annotations

import pytest
import torch

from mixmodal.data.layout import drop_conditioning, join_flats, lay_out, unconditional
from mixmodal.data.pipeline import DocumentEncoder, FusionBatches, PipelineConfig
from mixmodal.data.segments import Segment
from mixmodal.data.shapes import ShapesConfig
from mixmodal.data.sources import ShapesSource
from mixmodal.documents import Document
from mixmodal.inference import GenerationConfig
from mixmodal.inference.config import GuidanceConfig
from mixmodal.inference.engine import Engine
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
from mixmodal.vocab import Vocab
from tiny import prefills, tiny_engine

SHAPES = ShapesConfig(resolution=32, tasks=["caption", "vqa"], max_objects=2)


@pytest.fixture(scope="module")
def text_tokenizer():
    texts = (t for doc in ShapesSource(SHAPES, num=200) for t in doc.texts)
    return TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=300))


def _rows(engine: Engine, docs: list[Document], training: bool = True, **pipeline) -> tuple[dict, FusionBatches]:
    encoder = DocumentEncoder(engine.text_tokenizer, engine.image_tokenizer, engine.vocab, engine.mode)
    batches = FusionBatches(lambda: docs, encoder, PipelineConfig(seq_len=256, **pipeline), len(docs),
                            engine.per_image, endless=False, training=training)
    return next(iter(batches)), batches


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_a_prompt_is_the_prefix_of_its_documents_training_layout(text_tokenizer, mode):
    engine = tiny_engine(mode, text_tokenizer)
    caption_first = [d for d in ShapesSource(ShapesConfig(resolution=32, tasks=["caption"], max_objects=2), num=2)]
    for doc in caption_first:
        doc.metadata["keep_order"] = True
    batch, _ = _rows(engine, caption_first[:1])
    text = Document(caption_first[0].parts[:1])
    (ids, positions), = prefills(engine, [text], GenerationConfig(mode="image", max_new_tokens=engine.per_image + 2))
    n = len(ids)
    assert ids == batch["input_ids"][0, :n].tolist()
    assert positions == batch["positions"][0, :n].tolist() == list(range(n))
    assert batch["input_ids"][0, n].item() == engine.vocab.boi  # what image mode forces next
    # an image prompt (captioning): <bos> <boi> IMAGE <eoi>, as the image-first training row begins
    image_first = Document(caption_first[1].parts[::-1], {"keep_order": True})
    batch, _ = _rows(engine, [image_first])
    (ids, positions), = prefills(engine, [Document(image_first.parts[:1])], GenerationConfig(mode="text", max_new_tokens=2))
    n = len(ids)
    assert n == engine.per_image + 3
    assert ids == batch["input_ids"][0, :n].tolist() and positions == batch["positions"][0, :n].tolist()


@pytest.mark.parametrize("uncond", ["empty", "mask"])
@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_conditioning_dropout_trains_the_unconditional_stream_generation_feeds(text_tokenizer, mode, uncond):
    engine = tiny_engine(mode, text_tokenizer)
    doc = next(iter(ShapesSource(ShapesConfig(resolution=32, tasks=["caption"], max_objects=2), num=1)))
    doc.metadata["keep_order"] = True  # caption first
    batch, batches = _rows(engine, [doc], cond_dropout=1.0, uncond=uncond)
    vocab = engine.vocab
    config = GenerationConfig(mode="image", max_new_tokens=engine.per_image + 2,
                              guidance=GuidanceConfig(scale=3.0, uncond=uncond))
    cond, (uncond_ids, uncond_positions) = prefills(engine, [Document(doc.parts[:1])], config)
    # the unconditional stream's prompt, then the image it is guided towards: exactly the dropped row
    n = len(uncond_ids)
    assert uncond_ids == ([vocab.bos] if uncond == "empty" else [vocab.bos, vocab.mask(0)])
    row = batch["input_ids"][0]
    assert row[:n].tolist() == uncond_ids and batch["positions"][0, :n].tolist() == uncond_positions
    assert row[n].item() == vocab.boi and row[n + 1 + engine.per_image].item() == vocab.eoi
    assert row[n + 2 + engine.per_image].item() == vocab.eos
    # ... whose <eos> is no target: "image, then the end" would teach captioning to stop at once
    assert batch["labels"][0, n + 1 + engine.per_image].item() == -100
    assert batches.stats.cond_dropped == 1
    if mode == "latents":
        assert batch["image_limited"].tolist() == [False]  # trained at every noise level, as guidance uses it
    else:
        assert (batch["labels"][0, n:n + engine.per_image] >= vocab.image_code_ids.start).all()  # codes are targets


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_conditioning_dropout_of_a_question_drops_its_answer(text_tokenizer, mode):
    # a VQA document (question -> image -> answer) with its question dropped is the unconditional stream's
    # image and nothing after: kept, "Answer: ..." after a bare picture taught captions to start as answers
    engine = tiny_engine(mode, text_tokenizer)
    doc = next(iter(ShapesSource(ShapesConfig(resolution=32, tasks=["vqa"], max_objects=2), num=1)))
    assert [p.__class__.__name__ for p in doc.parts] == ["Text", "Image", "Text"]
    batch, batches = _rows(engine, [doc], cond_dropout=1.0)
    vocab = engine.vocab
    row, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    eoi = row.index(vocab.eoi)
    assert row[:2] == [vocab.bos, vocab.boi] and row[eoi + 1] == vocab.eos and batches.stats.cond_dropped == 1
    assert all(label == -100 for label in labels[eoi:])  # no text target after the picture
    kept, _ = _rows(engine, [doc], cond_dropout=0.0)  # undropped, the answer is the target it always was
    kept_row, kept_labels = kept["input_ids"][0].tolist(), kept["labels"][0].tolist()
    assert any(label != -100 for label in kept_labels[kept_row.index(vocab.eoi):])


def test_conditioning_dropout_rate_and_what_it_leaves_alone(text_tokenizer):
    engine = tiny_engine("tokens", text_tokenizer)
    docs = list(ShapesSource(SHAPES, num=400))
    _, batches = _rows(engine, docs, cond_dropout=0.1)
    for _ in batches:
        pass
    # only documents with text before their image (80% of these one-text-one-image documents) can drop it
    assert 0.05 < batches.stats.cond_dropped / batches.stats.documents < 0.13, batches.stats.as_dict()
    _, held_out = _rows(engine, docs[:50], training=False, cond_dropout=0.1)
    for _ in held_out:
        pass
    assert held_out.stats.cond_dropped == 0  # held-out losses measure the conditional model
    vocab = Vocab(300, 32)
    image = Segment("image", [1] * 4, image=0)
    text = Segment("text", [5, 6])
    assert drop_conditioning([image, text], "empty", vocab) is None  # image first: nothing conditions it
    # the prompt goes, and what answered it: a VQA answer after a bare picture would teach captions to be answers
    assert drop_conditioning([text, image, text], "empty", vocab) == [image]
    second = Segment("image", [2] * 4, image=1)
    assert drop_conditioning([text, image, text, second], "mask", vocab) == [Segment("text", [vocab.mask(0)], loss=False), image]
    assert unconditional([text, image, text], "mask", vocab, keep_images=True)[0].ids == [vocab.mask(0)]
    with pytest.raises(ValueError, match="uncond"):
        PipelineConfig(uncond="nothing")


def test_an_image_is_read_when_a_text_target_follows_it(text_tokenizer):
    """`read` (diffusion.noise_limit_read caps it too): a caption or answer after the image reads it; a
    prompt after it does not (no target), nor does the text before it."""
    vocab = Vocab(300, 32)
    image = Segment("image", [], image=0)
    caption, prompt = Segment("text", [5, 6]), Segment("text", [7], loss=False)
    flags = {}
    for name, parts in {"image first": [image, caption], "caption first": [caption, image],
                        "vqa": [prompt, image, caption], "no target after": [caption, image, prompt]}.items():
        flat, _ = lay_out(parts, vocab, "latents", 4)
        flags[name] = (flat.limited, flat.read)
    assert flags == {"image first": ([True], [True]), "caption first": ([False], [False]),
                     "vqa": ([False], [True]), "no target after": ([False], [False])}
    joined = join_flats([lay_out([image, caption], vocab, "latents", 4)[0],
                         lay_out([caption, image], vocab, "latents", 4)[0]], [0.0, 1.0])
    assert joined.read == [True, False]  # per document: the second part's text does not read the first's image
    engine = tiny_engine("latents", text_tokenizer)
    vqa = list(ShapesSource(ShapesConfig(resolution=32, tasks=["vqa"], max_objects=2), num=4))
    batch, _ = _rows(engine, vqa)
    assert batch["image_read"].tolist() == [True] * 4 and batch["image_limited"].tolist() == [False] * 4


def test_lay_out_truncates_at_a_part_boundary_and_drops_empty_documents():
    vocab = Vocab(300, 32)
    text, image = Segment("text", [5, 6, 7]), Segment("image", [vocab.image_code_to_id(torch.tensor(0)).item()] * 4,
                                                       image=0)
    flat, status = lay_out([text, image], vocab, "tokens", 4, max_len=8)
    assert status == "truncated" and flat.ids == [vocab.bos, 5, 6, 7, vocab.eos]
    flat, status = lay_out([text, image], vocab, "tokens", 4)
    assert status == "" and flat.ids[4] == vocab.boi and flat.images == [(5, 4, 0)] and flat.limited == [False]
    assert lay_out([], vocab, "tokens", 4) == (None, "dropped")
    prompt, _ = lay_out([text], vocab, "tokens", 4, eos=False)
    assert prompt.ids == flat.ids[:4]


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_position_gap_moves_only_the_text_after_each_image_and_only_in_training(text_tokenizer, mode):
    """pipeline.position_gap: a picture's positions stay consecutive after its <boi>, everything after its
    <eoi> moves on by one draw in 0..gap per image, the tokens are unchanged, the draws are the document's
    own (the same on a second pass), and evaluation rows keep 0, 1, 2, ..."""
    engine = tiny_engine(mode, text_tokenizer)
    docs = list(ShapesSource(ShapesConfig(resolution=32, tasks=["vqa", "edit"], max_objects=2), num=16))
    plain, _ = _rows(engine, docs)
    gapped, _ = _rows(engine, docs, position_gap=6)
    again, _ = _rows(engine, docs, position_gap=6)
    assert torch.equal(plain["input_ids"], gapped["input_ids"]) and torch.equal(gapped["positions"], again["positions"])
    moved = 0
    for r in range(gapped["input_ids"].shape[0]):
        for d in gapped["document_ids"][r].unique().tolist():
            if d < 0:
                continue  # padding
            where = gapped["document_ids"][r] == d
            ids, pos = gapped["input_ids"][r][where].tolist(), gapped["positions"][r][where].tolist()
            steps = [b - a for a, b in zip(pos, pos[1:])]
            eoi = [k for k in range(len(ids) - 1) if ids[k] == engine.vocab.eoi]
            assert pos[0] == 0 and eoi, (r, d)
            assert all(s == 1 for k, s in enumerate(steps) if k not in eoi), (r, d)  # in a picture, in a text: +1
            assert all(1 <= steps[k] <= 7 for k in eoi), (r, d)  # after a picture: +1 and a gap of 0..6
            moved += sum(steps[k] > 1 for k in eoi)
            assert plain["positions"][r][where].tolist() == list(range(len(ids)))
    assert moved > 0  # some gap was drawn
    evaluation, _ = _rows(engine, docs, training=False, position_gap=6)
    assert torch.equal(evaluation["positions"], plain["positions"])
    with pytest.raises(ValueError, match="position_gap"):
        PipelineConfig(position_gap=-1)
