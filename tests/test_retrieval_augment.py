"""Retrieval-augmented training data and generation: retrieved documents share the attention
segment of the document they were retrieved for, carry RA-CM3's alpha when asked, survive a
resume exactly, and are laid out at generation time as in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmodal.data.pipeline import IGNORE, DocumentEncoder, FusionBatches, PipelineConfig, join_flats, lay_out
from mixmodal.data.shapes import ShapesConfig
from mixmodal.data.sources import ShapesSource
from mixmodal.inference import GenerationConfig
from mixmodal.inference.config import GuidanceConfig
from mixmodal.objectives.next_token import next_token_loss
from mixmodal.retrieval.augment import RetrievalAugmenter, RetrievalConfig
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
from mixmodal.vocab import Vocab
from tiny import tiny_engine, tiny_image_tokenizer

SHAPES = ShapesConfig(resolution=32, tasks=["caption"], max_objects=2)


@pytest.fixture(scope="module")
def text_tokenizer():
    texts = (t for doc in ShapesSource(SHAPES, num=200) for t in doc.texts)
    return TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=300))


class _Bank:
    def __init__(self, docs):
        self.docs = docs
        self.fetched: list[int] = []

    def documents(self, ids):
        self.fetched += list(ids)
        return [self.docs[i] for i in ids]


class _Retriever:
    """k documents per query; in training the choice depends on the random stream it is given."""

    def __init__(self, docs, k: int) -> None:
        self.bank, self.k = _Bank(docs), k

    def retrieve(self, docs, *, training=False, rng=None):
        n = len(self.bank.docs)
        return [[(int(rng.integers(n)) if training else q) + j for j in range(self.k)] for q, _ in enumerate(docs)]


def _batches(text_tokenizer, mode: str, *, alpha: float = 1.0, k: int = 2, seq_len: int = 400, encode_batch: int = 4):
    vocab = Vocab(text_tokenizer.vocab_size, 32 if mode == "tokens" else 0)
    encoder = DocumentEncoder(text_tokenizer, tiny_image_tokenizer(mode), vocab, mode)
    bank = list(ShapesSource(SHAPES, split="heldout", num=40))
    augmenter = RetrievalAugmenter(RetrievalConfig(k=k, alpha=alpha), encoder, seed=0,
                                   retriever=_Retriever(bank, k))
    per_image = 64 if mode == "tokens" else 16
    it = FusionBatches(lambda: ShapesSource(SHAPES), encoder, PipelineConfig(seq_len=seq_len, encode_batch=encode_batch),
                       2, per_image, seed=0, augmenter=augmenter)
    return it, vocab, augmenter


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_retrieved_documents_share_the_segment_and_carry_alpha(text_tokenizer, mode):
    it, vocab, augmenter = _batches(text_tokenizer, mode, alpha=0.1)
    batch = next(it)
    ids, labels, docs, positions = batch["input_ids"], batch["labels"], batch["document_ids"], batch["positions"]
    weights = batch["loss_weights"]
    segments = 0
    for r in range(ids.shape[0]):
        for d in docs[r].unique().tolist():
            if d < 0:
                continue
            where = (docs[r] == d).nonzero().flatten()
            seq = ids[r, where]
            assert (positions[r, where] == torch.arange(len(where))).all()  # one segment, continuous positions
            bos = (seq == vocab.bos).nonzero().flatten().tolist()
            eos = (seq == vocab.eos).nonzero().flatten().tolist()
            assert len(bos) == len(eos) == 3, "two retrieved documents, then the document: <bos> .. <eos> each"
            assert bos[0] == 0 and all(e + 1 == b for e, b in zip(eos, bos[1:]))
            w = weights[r, where]
            lab = labels[r, where]
            main = eos[1]  # the label at the last retrieved <eos> is the document's <bos>: no target
            assert lab[main] == IGNORE
            assert torch.allclose(w[:main][lab[:main] != IGNORE], torch.tensor(0.1))
            assert torch.allclose(w[main + 1:][lab[main + 1:] != IGNORE], torch.tensor(1.0))
            assert (w[lab == IGNORE] == 0).all()
            segments += 1
    assert segments >= 2 and it.stats.retrieved == 2 * it.stats.documents
    if mode == "latents":
        n_images = batch["image_latents"].shape[0]
        assert n_images % 3 == 0
        torch.testing.assert_close(batch["image_weights"], torch.tensor([0.1, 0.1, 1.0] * (n_images // 3)))
    # the bank's documents are encoded once, then served from the cache
    fetched = len(augmenter.retriever.bank.fetched)
    next(it)
    assert len(augmenter.retriever.bank.fetched) - fetched < 2 * it.stats.documents


def test_a_bank_that_fits_is_encoded_once_before_training(text_tokenizer):
    class Sized(_Bank):
        def __len__(self):
            return len(self.docs)

    vocab = Vocab(text_tokenizer.vocab_size, 32)
    encoder = DocumentEncoder(text_tokenizer, tiny_image_tokenizer("tokens"), vocab, "tokens")
    retriever = _Retriever(list(ShapesSource(SHAPES, split="heldout", num=30)), 2)
    retriever.bank = Sized(retriever.bank.docs)
    augmenter = RetrievalAugmenter(RetrievalConfig(k=2), encoder, retriever=retriever)
    assert sorted(retriever.bank.fetched) == list(range(30)) and augmenter.precompute_seconds > 0
    it = FusionBatches(lambda: ShapesSource(SHAPES), encoder, PipelineConfig(seq_len=400, encode_batch=3), 2, 64,
                       augmenter=augmenter)
    next(it)
    assert len(retriever.bank.fetched) == 30, "nothing is read from the bank during training"
    big = _Retriever(retriever.bank.docs, 2)
    big.bank = Sized(retriever.bank.docs)
    small = RetrievalAugmenter(RetrievalConfig(k=2, cache_size=10), encoder, retriever=big)
    assert small.precompute_seconds == 0.0 and not big.bank.fetched  # too big for the cache: encoded on first use


def test_alpha_one_emits_no_weights_and_a_tight_row_drops_the_least_relevant(text_tokenizer):
    it, vocab, _ = _batches(text_tokenizer, "tokens", alpha=1.0, seq_len=256)
    batch = next(it)
    assert "loss_weights" not in batch
    assert it.stats.retrieval_dropped > 0 and it.stats.retrieved > 0  # 256 holds the document and one more


def test_resume_retrieves_exactly_what_the_straight_run_did(text_tokenizer):
    straight, _, _ = _batches(text_tokenizer, "tokens", encode_batch=3)
    batches = [next(straight) for _ in range(5)]
    first, _, _ = _batches(text_tokenizer, "tokens", encode_batch=3)
    for _ in range(2):
        next(first)
    state = first.state_dict()
    assert state["next_document"] % 3 != 0, "the resume point should fall inside a chunk to test the alignment"
    resumed, _, _ = _batches(text_tokenizer, "tokens", encode_batch=3)
    resumed.load_state_dict(state)
    for want in batches[2:]:
        got = next(resumed)
        for key in want:
            assert torch.equal(want[key], got[key]), key


def test_weighted_next_token_loss_is_a_weighted_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 4] = IGNORE
    weights = torch.rand(2, 5)
    out = next_token_loss(logits, labels, weights=weights, z_loss_weight=0.0)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none", ignore_index=IGNORE)
    w = torch.where(labels.flatten() != IGNORE, weights.flatten(), 0.0)
    torch.testing.assert_close(out["ce"], (w * ce).sum() / w.sum())
    ones = next_token_loss(logits, labels, weights=torch.ones(2, 5), z_loss_weight=1e-4)
    plain = next_token_loss(logits, labels, z_loss_weight=1e-4)
    torch.testing.assert_close(ones["ce"], plain["ce"])
    torch.testing.assert_close(ones["z_loss"], plain["z_loss"])


# --- generation --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_generation_lays_out_retrieved_documents_as_training_does(text_tokenizer, mode):
    engine = tiny_engine(mode, text_tokenizer)
    context = list(ShapesSource(SHAPES, split="heldout", num=2))
    prompt = "a red circle"
    seen = []
    forward = engine._forward

    def spy(live, cache):
        seen.append([list(b.ids) for b in live[0].blocks])
        return forward(live, cache)

    engine._forward = spy
    engine.generate(prompt, GenerationConfig(mode="text", max_new_tokens=2, guidance=GuidanceConfig(scale=2.0, text=True)),
                    context=[context])
    cond, uncond = seen[0]
    vocab = engine.vocab
    encoder = DocumentEncoder(text_tokenizer, engine.image_tokenizer, vocab, mode)
    per = engine.per_image
    flats = []
    for enc in encoder.encode(list(enumerate(context))):
        flat, _ = lay_out(enc.segments, vocab, mode, per, max_len=10_000, latents=enc.latents)
        flats.append(flat)
    expected = join_flats(flats, [1.0, 1.0]).ids + [vocab.bos] + text_tokenizer.encode(prompt)
    if mode == "latents":  # placeholders: the engine writes the clean latents there
        expected = [vocab.pad if i == vocab.pad else i for i in expected]
    assert cond == expected
    assert uncond == [vocab.bos], "the unconditional stream sees neither the prompt nor what was retrieved for it"


def test_context_counts_against_the_context_length(text_tokenizer):
    from mixmodal.inference.prompt import PromptError

    engine = tiny_engine("tokens", text_tokenizer)
    engine.max_length = 100
    context = list(ShapesSource(SHAPES, split="heldout", num=2))
    with pytest.raises(PromptError, match="retrieved documents"):
        engine.generate("a red circle", GenerationConfig(mode="text", max_new_tokens=4), context=[context])
    with pytest.raises(ValueError, match="context lists"):
        engine.generate(["a", "b"], GenerationConfig(mode="text"), context=[context])


def test_retrieval_config_is_checked():
    with pytest.raises(ValueError, match="alpha"):
        RetrievalConfig(alpha=2.0)
    with pytest.raises(ValueError, match="query_dropout"):
        RetrievalConfig(query_dropout=1.0)
    assert not RetrievalConfig(k=2).enabled and RetrievalConfig(index="x", k=2).enabled
    np.testing.assert_equal(RetrievalConfig(k=3).selection().k, 3)


# --- end to end: a bank, RA training through `mixmodal train`, `mixmodal generate --retrieve` -----

@pytest.fixture(scope="module")
def bank(tmp_path_factory, text_tokenizer):
    """A memory bank of 40 shapes caption documents under a tiny random dual encoder."""
    from mixmodal.retrieval.bank import MemoryBank
    from mixmodal.retrieval.document_embedder import DocumentEmbedder, save_dual_encoder
    from mixmodal.retrieval.encoder import DualEncoder, DualEncoderConfig, TextTowerConfig, VisionTowerConfig

    root = tmp_path_factory.mktemp("bank")
    tower = dict(dim=16, num_layers=1, num_heads=2, mlp_dim=32)
    config = DualEncoderConfig(embed_dim=16, text=TextTowerConfig(vocab_size=text_tokenizer.vocab_size, **tower),
                               vision=VisionTowerConfig(image_size=32, patch_size=8, **tower))
    torch.manual_seed(0)
    encoder = save_dual_encoder(DualEncoder(config), text_tokenizer.backend, root / "encoder")
    MemoryBank.build(ShapesSource(SHAPES, split="train", num=40), DocumentEmbedder.from_pretrained(encoder),
                     root / "index", progress=False)
    return root / "index"


def test_ra_training_and_generation_end_to_end(tmp_path, bank, text_tokenizer, capsys):
    import json
    from pathlib import Path

    from mixmodal.cli import main
    from mixmodal.inference.checkpoint import read_retrieval_settings
    from mixmodal.tokenizers.image import save_image_tokenizer
    from mixmodal.train.run import load_run_config, train

    root = Path(__file__).resolve().parents[1]
    save_image_tokenizer(tiny_image_tokenizer("tokens"), tmp_path / "vq")
    text_tokenizer.save(tmp_path / "text")
    config = load_run_config(root / "configs/models/tiny-tokens.yaml", [
        f"data.image_tokenizer={tmp_path / 'vq'}", f"data.text_tokenizer={tmp_path / 'text'}",
        "data.source=shapes:split=train,resolution=32,tasks=caption,max_objects=2",
        "data.eval_source=shapes:split=heldout,resolution=32,tasks=caption,max_objects=2",
        f"data.retrieval.index={bank}", "data.retrieval.k=2", "data.retrieval.alpha=0.1", "data.pipeline.seq_len=400",
        "trainer.steps=2", "trainer.batch_size=2", "data.eval_batches=1", "trainer.progress=false"])
    result = train(config, tmp_path / "run")
    assert result["data"]["retrieved"] > 0 and result["eval_loss"] > 0
    assert read_retrieval_settings(tmp_path / "run") == {"index": str(bank.resolve()), "encoder": "", "k": 2}

    out = tmp_path / "gen"
    code = main(["generate", str(tmp_path / "run"), "--prompt", "a red circle", "--mode", "image", "--retrieve", "2",
                 "--best-of", "2", "--seed", "1", "--out", str(out), "--quiet"])  # the index the model was trained with
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "documents.jsonl").read_text().splitlines()[0])
    meta = record["metadata"]
    assert len(meta["retrieved"]) == 2 and all(meta["retrieved"])
    assert len(meta["candidates"]) == 2 and meta["candidates"][0] >= meta["candidates"][1]


def test_retrieve_without_an_index_is_refused(tmp_path, capsys, text_tokenizer):
    from mixmodal.cli import main
    from mixmodal.model.io import save_model_dir

    engine = tiny_engine("tokens", text_tokenizer)
    save_model_dir(engine.model, tmp_path / "model")
    engine.text_tokenizer.save(tmp_path / "model" / "text_tokenizer")
    code = main(["generate", str(tmp_path / "model"), "--prompt", "a", "--mode", "text", "--retrieve", "2",
                 "--out", str(tmp_path / "gen")])
    assert code != 0
    assert "--index" in capsys.readouterr().err
