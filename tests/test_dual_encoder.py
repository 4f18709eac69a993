"""The dual encoder and DocumentEmbedder (shapes, normalisation, padding, the document rule,
query dropout, saving), and the dual-encoder training task end to end: eval keys, the
saved encoder, and bitwise-exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mixmodal.data.shapes import ShapesConfig
from mixmodal.data.sources import ShapesSource
from mixmodal.documents import Document, Image, Text
from mixmodal.retrieval.document_embedder import DocumentEmbedder, save_dual_encoder
from mixmodal.retrieval.encoder import (DualEncoder, DualEncoderConfig, EncoderError, TextTowerConfig,
                                        VisionTowerConfig, contrastive_loss)
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
from mixmodal.train import checkpoint as ckpt
from mixmodal.train.dual_encoder import PairBatches, document_pairs, equivalent_pairs, recall_at
from mixmodal.train.run import load_run_config, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG_32 = ROOT / "configs/retrieval/dual-encoder-shapes-32.yaml"
SHAPES32 = ShapesConfig(resolution=32, tasks=["caption"])
TINY_RUN = ["model.embed_dim=16", "model.text.dim=32", "model.text.num_layers=1", "model.text.num_heads=2",
            "model.text.mlp_dim=64", "model.vision.patch_size=8", "model.vision.dim=32", "model.vision.num_layers=1",
            "model.vision.num_heads=2", "model.vision.mlp_dim=64", "data.text_vocab_size=300",
            "data.text_tokenizer_documents=200", "data.eval_pairs=24", "trainer.batch_size=8", "trainer.steps=4",
            "trainer.warmup_steps=1", "trainer.precision=fp32", "trainer.log_every=2", "trainer.eval_every=0",
            "trainer.progress=false"]


def tiny_config(vocab_size: int, max_length: int = 64) -> DualEncoderConfig:
    return DualEncoderConfig(
        embed_dim=16,
        text=TextTowerConfig(vocab_size=vocab_size, max_length=max_length, dim=32, num_layers=2, num_heads=2, mlp_dim=64),
        vision=VisionTowerConfig(image_size=32, patch_size=8, dim=32, num_layers=2, num_heads=2, mlp_dim=64))


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> DocumentEmbedder:
    """A random tiny encoder with a BPE trained on shapes captions, saved and loaded back."""
    root = tmp_path_factory.mktemp("encoder")
    texts = (t for doc in ShapesSource(SHAPES32, num=200) for t in doc.texts)
    tokenizer = TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=300))
    torch.manual_seed(0)
    model = DualEncoder(tiny_config(tokenizer.vocab_size))
    return DocumentEmbedder.from_pretrained(save_dual_encoder(model, tokenizer.backend, root / "encoder"))


def shapes_docs(n: int, start: int = 0) -> list[Document]:
    return [doc for i, doc in zip(range(start + n), ShapesSource(SHAPES32)) if i >= start]


# --- the model -------------------------------------------------------------------------------

def test_outputs_have_the_right_shapes_and_norms(embedder):
    model = embedder.model
    ids, mask = embedder.tokenize(["a red circle", "Shapes: a big blue square (top left), a tiny star."])
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        raw_text, raw_image = model.encode_text(ids, mask), model.encode_image(pixels)
        text, image, scale = model(ids, mask, pixels)
    assert raw_text.shape == raw_image.shape == text.shape == image.shape == (2, 16)
    assert not torch.allclose(raw_text.norm(dim=-1), torch.ones(2))  # encode_* are not normalised
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text, F.normalize(raw_text, dim=-1))
    assert float(scale) == pytest.approx(np.exp(2.6592), rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        assert float(model(ids, mask, pixels)[2]) == 100.0  # clamped
        model.logit_scale.fill_(2.6592)


def test_padding_changes_nothing(embedder):
    """A text's embedding is the same alone and padded in a batch with a longer one (the padding
    mask, and the causal mask, against the unpadded reference)."""
    alone = embedder.embed_texts(["a red circle"])
    batched = embedder.embed_texts(["a red circle", "a tiny blue square at the top left and a big star below it"])
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-6)


def test_images_of_other_sizes_are_resized_and_bad_pixels_refused(embedder):
    model = embedder.model
    pixels = torch.rand(2, 3, 48, 40) * 2 - 1
    resized = F.interpolate(pixels, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), model.encode_image(resized))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.encode_image(torch.rand(1, 3, 32, 32) * 255)


def test_contrastive_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    text, image = F.normalize(torch.randn(5, 8, generator=g), dim=-1), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 7.0 * text @ image.T
    expected = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2
    torch.testing.assert_close(contrastive_loss(text, image, 7.0), expected)
    assert float(contrastive_loss(text, text, 100.0)) < 1e-6  # every pair its own best match


def test_recall_counts_the_wrong_items_above_the_best_right_one():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.1, 0.2, 0.3]])
    assert recall_at(similarity, ks=(1, 2)) == {1: pytest.approx(2 / 3), 2: 1.0}
    copies = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])  # items 0, 1 alike
    assert recall_at(similarity, copies, ks=(1,)) == {1: 1.0}


def test_copies_in_the_eval_set_are_equivalent(embedder):
    docs = shapes_docs(3)
    docs.append(Document([Text("another caption"), Image(docs[0].images[0])]))  # the same picture as pair 0
    docs.append(Document([Text(docs[1].texts[0]), Image(PIL.Image.new("RGB", (32, 32), "white"))]))  # pair 1's caption
    batches = list(PairBatches(lambda: docs, embedder.tokenizer, embedder.config.text, 32, 2, endless=False))
    expected = torch.eye(5, dtype=torch.bool)
    expected[0, 3] = expected[3, 0] = expected[1, 4] = expected[4, 1] = True
    assert torch.equal(equivalent_pairs(batches), expected)


# --- tokenization ------------------------------------------------------------------------------

def test_tokenize_wraps_truncates_and_pads(embedder):
    text = embedder.config.text
    ids, mask = embedder.tokenize(["a red circle", "word " * 100, ""])
    assert ids.shape == (3, text.max_length)  # the long row is truncated to max_length
    lengths = mask.sum(1)
    assert lengths.tolist()[1:] == [text.max_length, 2]
    assert (ids[:, 0] == text.bos_id).all()
    assert (ids[torch.arange(3), lengths - 1] == text.eos_id).all()  # eos kept last
    assert (ids[mask == 0] == text.pad_id).all()
    ids, mask = embedder.tokenize(["<eos> <bos> <pad>"])  # text that spells control tokens is ordinary text
    inner = ids[0, 1:int(mask.sum()) - 1].tolist()
    assert inner and not {text.bos_id, text.eos_id, text.pad_id} & set(inner)


def test_query_dropout_drops_about_p_never_the_markers_and_is_seeded(embedder):
    text = embedder.config.text
    texts = [doc.texts[0] for doc in shapes_docs(200)]
    full, full_mask = embedder.tokenize(texts)
    assert torch.equal(embedder.tokenize(texts, query_dropout=0.0)[0], full)
    ids, mask = embedder.tokenize(texts, query_dropout=0.3, rng=np.random.default_rng(0))
    again, _ = embedder.tokenize(texts, query_dropout=0.3, rng=np.random.default_rng(0))
    other, _ = embedder.tokenize(texts, query_dropout=0.3, rng=np.random.default_rng(1))
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    lengths, full_lengths = mask.sum(1), full_mask.sum(1)
    untruncated = full_lengths < text.max_length
    dropped = 1 - (lengths[untruncated] - 2).sum() / (full_lengths[untruncated] - 2).sum()
    assert 0.25 < float(dropped) < 0.35
    assert (ids[:, 0] == text.bos_id).all() and (ids[torch.arange(len(texts)), lengths - 1] == text.eos_id).all()
    with pytest.raises(ValueError, match="query_dropout"):
        embedder.tokenize(texts, query_dropout=1.0)


# --- documents ---------------------------------------------------------------------------------

def test_document_embedding_is_the_normalised_mean_of_its_parts(embedder):
    docs = shapes_docs(2)
    image_a, image_b = docs[0].images[0], docs[1].images[0].resize((40, 40))
    text_only = Document([Text("a red circle"), Text("at the top")], id="t")
    image_only = Document([Image(image_a)], id="i")
    mixed = Document([Text("two images:"), Image(image_a), Text("and"), Image(image_b)], id="m")
    got = embedder.embed_documents([text_only, image_only, mixed], batch_size=2)
    t = embedder.embed_texts(["a red circle at the top", "two images: and"])
    i = embedder.embed_images([image_a, image_b])

    def unit(v):
        return v / np.linalg.norm(v)

    assert got.dtype == np.float32 and got.shape == (3, embedder.dim)
    np.testing.assert_allclose(got[0], t[0], atol=1e-5)
    np.testing.assert_allclose(got[1], i[0], atol=1e-5)
    np.testing.assert_allclose(got[2], unit(t[1] + unit(i[0] + i[1])), atol=1e-5)
    with pytest.raises(EncoderError, match=r"document 1 \(id 'empty'\)"):
        embedder.embed_documents([text_only, Document([Text("  ")], id="empty")])
    assert embedder.embed_documents([]).shape == (0, embedder.dim)


# --- on disk -----------------------------------------------------------------------------------

def test_save_and_load_give_identical_embeddings(embedder, tmp_path):
    docs = shapes_docs(3)
    out = save_dual_encoder(embedder.model, embedder.tokenizer, tmp_path / "copy")
    loaded = DocumentEmbedder.from_pretrained(out)
    assert loaded.fingerprint == embedder.fingerprint and len(loaded.fingerprint) == 64
    np.testing.assert_array_equal(loaded.embed_documents(docs), embedder.embed_documents(docs))
    with torch.no_grad():
        loaded.model.logit_scale.add_(1.0)
    changed = DocumentEmbedder.from_pretrained(save_dual_encoder(loaded.model, loaded.tokenizer, tmp_path / "copy"))
    assert changed.fingerprint != embedder.fingerprint
    assert not (tmp_path / "copy.tmp").exists() and not (tmp_path / "copy.old").exists()


def test_from_pretrained_names_what_is_missing(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        DocumentEmbedder.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("task: fusion\n")
    with pytest.raises(EncoderError, match=r"model\.safetensors, tokenizer\.json missing.*RUN/encoder"):
        DocumentEmbedder.from_pretrained(tmp_path / "run")


# --- training ----------------------------------------------------------------------------------

def test_document_pairs_take_the_nearest_text_before_else_after():
    red, blue = PIL.Image.new("RGB", (4, 4), "red"), PIL.Image.new("RGB", (4, 4), "blue")
    doc = Document([Image(red), Text("first"), Text(" "), Image(blue), Text("last"), Image(red)])
    assert [(t, im is red) for t, im in document_pairs(doc)] == [("first", True), ("first", False), ("last", True)]
    assert document_pairs(Document([Text("only text")])) == []
    assert document_pairs(Document([Image(red)])) == []


def test_pair_batches_resume_exactly(embedder):
    """Positions inside a document (two images each) and after a skipped document survive a resume."""
    docs = shapes_docs(9)
    for doc in docs[::3]:
        doc.parts.append(Image(doc.images[0].transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)))
    docs[4] = Document([Text("text only")])

    def batches():
        return PairBatches(lambda: docs, embedder.tokenizer, embedder.config.text, 32, batch_size=4)

    straight = batches()
    for _ in range(2):
        next(straight)
    assert straight.state_dict() == {"next_document": 6, "next_pair": 1}  # inside document 6, past skipped 4
    resumed = batches()
    resumed.load_state_dict(straight.state_dict())
    for _ in range(5):  # runs past the end of the source into its second pass
        a, b = next(straight), next(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.stats.skipped >= 1


def test_training_writes_an_encoder_and_recall(tmp_path):
    config = load_run_config(CONFIG_32, TINY_RUN)
    result = train(config, tmp_path / "run")
    for key in ("eval_loss", "eval_t2i_r1", "eval_t2i_r5", "eval_t2i_r10", "eval_i2t_r1", "eval_i2t_r5", "eval_i2t_r10"):
        assert 0.0 <= result[key] <= 10.0, key
    assert result["eval_pairs"] == 24
    embedder = DocumentEmbedder.from_pretrained(tmp_path / "run")  # the run directory: its encoder/
    assert embedder.path == tmp_path / "run" / "encoder" and embedder.config.text.vocab_size > 256
    assert embedder.embed_documents(shapes_docs(2)).shape == (2, 16)


def test_resume_is_bitwise_exact(tmp_path):
    common = [*TINY_RUN, "trainer.save_every=2"]
    train(load_run_config(CONFIG_32, common), tmp_path / "straight")
    train(load_run_config(CONFIG_32, [*common, "trainer.steps=2"]), tmp_path / "resumed")
    train(load_run_config(CONFIG_32, [*common, "trainer.resume=true"]), tmp_path / "resumed")
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "resumed") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
