"""image.code_embedding=codebook: image codes enter and leave the transformer through a shared map of
their tokenizer vectors, beside their own rows (model/fusion.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.transformer import TransformerConfig

ROOT = Path(__file__).resolve().parents[1]


def _model(code_embedding: str = "codebook", num_codes: int = 8, features: int = 12, **image) -> FusionModel:
    """A one-layer token model; `image`: further ImageConfig keys (code_map, code_gain, ...)."""
    torch.manual_seed(0)
    config = ModelConfig(text_vocab_size=300, transformer=TransformerConfig(dim=32, num_layers=1, num_heads=2),
                         image=ImageConfig(mode="tokens", num_codes=num_codes, grid_size=2,
                                           code_embedding=code_embedding, code_features=features, **image))
    return FusionModel(config)


def test_codes_that_look_alike_score_alike_and_others_do_not():
    model = _model()
    vectors = torch.randn(8, 12)
    vectors[5] = vectors[3]  # two codes with the same patch
    model.set_code_features(vectors)
    codes = model.vocab.image_code_ids
    with torch.no_grad():  # the codes' own rows equal: only the shared map tells them apart
        model.embed_tokens.weight[codes.start:codes.stop] = 0.1
        model.lm_head.weight[codes.start:codes.stop] = -0.2
    ids = torch.tensor([[1, codes.start + 3, codes.start + 5, codes.start + 4]])
    x = model.embed(ids)
    assert torch.equal(x[0, 1], x[0, 2]) and not torch.allclose(x[0, 1], x[0, 3])
    assert torch.equal(x[0, 0], model.embed_tokens.weight[1])  # text ids: the embedding row only
    logits = model(ids).logits[0, -1]
    assert logits[codes.start + 3] == logits[codes.start + 5] and logits[codes.start + 3] != logits[codes.start + 4]
    plain = model.lm_head(model(ids).hidden_states)[0, -1]
    assert torch.equal(logits[:codes.start], plain[:codes.start])  # text logits untouched
    assert logits.shape[-1] == model.vocab.size


def test_features_are_centred_unit_vectors_and_saved_with_the_weights():
    model = _model()
    model.set_code_features(torch.randn(8, 12) * 5 + 3)
    f = model.code_features
    assert torch.allclose(f.norm(dim=1), torch.ones(8), atol=1e-5)
    assert "code_features" in model.state_dict()  # a saved model carries what it was trained with
    with pytest.raises(ValueError, match=r"code vectors \(8, 11\) do not match .*\(8, 12\)"):
        model.set_code_features(torch.randn(8, 11))
    with pytest.raises(ValueError, match="code_embedding=learned"):
        _model("learned").set_code_features(torch.randn(8, 12))
    with pytest.raises(ValueError, match="code_embedding=codebook needs image.num_codes and image.code_features"):
        _model(features=0)
    with pytest.raises(ValueError, match="image.code_embedding must be 'learned', 'codebook', 'codebook_only' or 'codebook_out'"):
        ImageConfig(code_embedding="pixels")
    with pytest.raises(ValueError, match="is for image codes .* drop the key"):
        ImageConfig(mode="latents", code_embedding="codebook")


def test_a_code_never_a_target_moves_with_the_codes_that_look_like_it():
    """The point of the shared map: after training on code 2, code 7 (never a target, but with a vector
    near code 2's: a held-out shape-colour pair) ranks above every other non-target code; with learned
    rows alone it is one of the crowd."""
    results = {}
    for kind in ("learned", "codebook", "codebook_only"):
        model = _model(kind)
        vectors = torch.randn(8, 12)
        vectors[7] = vectors[2] + 0.05 * torch.randn(12)  # code 7 looks like code 2; 7 is never a target
        if kind != "learned":
            model.set_code_features(vectors)
        codes = model.vocab.image_code_ids
        ids = torch.tensor([[1, 2, 3, codes.start + 2]] * 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(model(ids).logits[:, 2], ids[:, 3])
            opt.zero_grad()
            loss.backward()
            opt.step()
        logp = torch.log_softmax(model(ids).logits[0, 2], -1)[codes.start:codes.stop]
        others = logp[[0, 1, 3, 4, 5, 6]]
        results[kind] = (logp[7] - others.max()).item()  # > 0: code 7 is the runner-up
    assert results["learned"] < 0 < results["codebook"]
    assert results["codebook_only"] > 0


@pytest.mark.parametrize("view", ["tokenizer", "factored", "grouped"])
def test_a_run_fills_the_features_from_its_tokenizer_and_the_engine_reloads_them(tmp_path, view):
    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.inference.config import GenerationConfig
    from mixmodal.inference.engine import Engine
    from mixmodal.tokenizers.image import load_image_tokenizer
    from mixmodal.tokenizers.patch import code_groups
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
    from mixmodal.train.run import load_run_config, train

    tok = load_run_config(ROOT / "configs/tokenizers/kmeans-shapes-48.yaml",
                          ["data.num_images=100", "eval.num_images=8", "eval.num_samples=4",
                           "tokenizer.kmeans.patch_size=16", "tokenizer.kmeans.codebook_size=128"])
    train(tok, tmp_path / "kmeans")
    docs = ShapesSource(ShapesConfig(resolution=48), num=200)
    TextTokenizer.train((t for d in docs for t in d.texts), TextTokenizerConfig(vocab_size=300)).save(tmp_path / "text")
    config = load_run_config(ROOT / "configs/models/tiny-tokens.yaml",
                             [f"data.image_tokenizer={tmp_path / 'kmeans' / 'tokenizer'}", f"data.text_tokenizer={tmp_path / 'text'}",
                              "data.source=shapes:split=train,resolution=48", "data.eval_source=shapes:split=heldout,resolution=48",
                              "data.pipeline.seq_len=128", "trainer.steps=3", "model.image.code_embedding=codebook",
                              f"model.image.code_vectors={view}"]
                             + (["eval.sampling.plausibility=0.5"] if view == "factored" else []))
    train(config, tmp_path / "run")
    engine = Engine.from_pretrained(tmp_path / "run" / "model")
    assert engine.image_sampling == ({"plausibility": 0.5} if view == "factored" else None)  # the recipe's eval.sampling
    if view == "factored":  # a run fine-tuned from it states the same, unless its own eval.sampling says otherwise
        for name, extra, expected in (("tuned", [], {"plausibility": 0.5}), ("own", ["eval.sampling.cfg=3"], {"cfg": 3})):
            tuned = load_run_config(ROOT / "configs/models/tiny-tokens.yaml",
                                    [f"init_from={tmp_path / 'run'}", "data.source=shapes:split=train,resolution=48",
                                     "data.eval_source=shapes:split=heldout,resolution=48", "data.pipeline.seq_len=128",
                                     "trainer.steps=1", *extra])
            train(tuned, tmp_path / name)
            assert Engine.from_pretrained(tmp_path / name / "model").image_sampling == expected
    image_tokenizer = load_image_tokenizer(tmp_path / "kmeans" / "tokenizer")
    structure, colours = code_groups(image_tokenizer.codebook.float())
    widths = {"tokenizer": 3 * 16 * 16, "factored": 4 * 16 * 16 + 6,
              "grouped": 3 * 16 * 16 + int(structure.max()) + 1 + int(colours.max()) + 1}
    assert engine.model.config.image.code_features == widths[view]
    patches = image_tokenizer.code_vectors(view)
    expected = torch.nn.functional.normalize(patches - patches.mean(0), dim=1)
    assert torch.allclose(engine.model.code_features, expected, atol=1e-6)
    result = engine.generate("a photo of a red circle", GenerationConfig(mode="image"), seed=0)[0]
    assert [im.size for im in result.document.images] == [(48, 48)]


def test_a_vq_gives_its_codebook_vectors_in_the_space_codes_are_matched_in():
    from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

    vq = VQTokenizer(VQConfig(codebook_size=16, codebook_dim=8))
    vectors = vq.code_vectors()
    assert vectors.shape == (16, 8) and not vectors.requires_grad
    assert torch.allclose(vectors.norm(dim=1), torch.ones(16), atol=1e-5)  # the l2 codebook: unit vectors


def test_export_to_transformers_refuses_a_codebook_model_by_name(tmp_path):
    from mixmodal.interop.hf_chameleon import ConversionError
    from mixmodal.interop.hf_chameleon_export import convert_to_hf_chameleon
    from mixmodal.model.io import save_model_dir

    save_model_dir(_model(), tmp_path / "m")
    with pytest.raises(ConversionError, match="image.code_embedding=codebook; Chameleon has one embedding"):
        convert_to_hf_chameleon(tmp_path / "m", tmp_path / "hf")


@pytest.mark.parametrize("kind, rows_in, rows_out", [("codebook", True, True), ("codebook_only", False, False),
                                                     ("codebook_out", True, False)])
def test_which_of_the_codes_own_rows_count(kind, rows_in, rows_out):
    """codebook: both tables' image rows; codebook_only: neither (the shared map alone); codebook_out: the
    embedding rows on input, the shared map alone scores a code."""
    model = _model(kind)
    model.set_code_features(torch.randn(8, 12))
    codes = model.vocab.image_code_ids
    ids = torch.tensor([[1, codes.start + 3, 5]])
    before = model(ids).logits
    with torch.no_grad():  # the codes' lm_head rows: they move the codes' scores, or nothing
        model.lm_head.weight[codes.start:codes.stop] += 1.0
    after_head = model(ids).logits
    assert torch.equal(after_head, before) != rows_out
    with torch.no_grad():  # the code's embedding row: it moves what follows the code, or nothing
        model.embed_tokens.weight[codes.start + 3] += 1.0
    after_embed = model(ids).logits
    if rows_in:
        assert not torch.equal(after_embed[0, 2], after_head[0, 2])
    else:
        assert torch.equal(after_embed, after_head)
    with torch.no_grad():  # a text row always counts
        model.embed_tokens.weight[5] += 1.0
    assert not torch.equal(model(ids).logits[0, 2], after_embed[0, 2])


def test_an_mlp_map_scores_what_a_linear_map_of_the_vectors_cannot():
    """Codes 0 and 1 have opposite vectors (+e1, -e1) and both are right: a linear map scores them
    -s and +s, so together they cannot beat the other codes; image.code_map=mlp can rank both first."""
    mass = {}
    for code_map in ("linear", "mlp"):
        model = _model("codebook_only", features=4, code_map=code_map)
        eye = torch.eye(4)
        model.set_code_features(torch.stack([eye[0], -eye[0], eye[1], -eye[1], eye[2], -eye[2], eye[3], -eye[3]]))
        codes = model.vocab.image_code_ids
        ids = torch.tensor([[1, 2, 3, codes.start + 0], [1, 2, 3, codes.start + 1]] * 2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):
            loss = torch.nn.functional.cross_entropy(model(ids).logits[:, 2], ids[:, 3])
            opt.zero_grad()
            loss.backward()
            opt.step()
        p = torch.softmax(model(ids).logits[0, 2], -1)[codes.start:codes.stop]
        mass[code_map] = (p[0] + p[1]).item() / p.sum().item()
    assert mass["linear"] < 0.35 < 0.9 < mass["mlp"], mass
    with pytest.raises(ValueError, match="image.code_map must be 'linear' or 'mlp'"):
        ImageConfig(code_map="conv")


def test_code_gain_scales_the_shared_logits_and_is_not_decayed():
    from mixmodal.train.optim import split_decay

    model = _model("codebook_only")
    gained = _model("codebook_only", code_gain=True)
    gained.load_state_dict({**model.state_dict(), "code_gain": torch.tensor(3.0)})
    h = torch.randn(2, 32)
    codes = model.vocab.image_code_ids
    assert torch.allclose(gained.head(h)[:, codes.start:codes.stop], 3 * model.head(h)[:, codes.start:codes.stop])
    assert torch.equal(gained.head(h)[:, :codes.start], model.head(h)[:, :codes.start])
    assert any(p is gained.code_gain for p in split_decay(gained)[1])  # no weight decay on the gain
    with pytest.raises(ValueError, match="with code_embedding=learned drop them"):
        ImageConfig(code_gain=True)



# 4 x 4 patches of two outlines on a black ground, for the factored / grouped code-vector tests
GROUND = -torch.ones(3, 4, 4)
STAR, CIRCLE = torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)
STAR[1:3, :] = True
STAR[:, 1:3] = True
CIRCLE[1:3, 1:3] = True


def _patch(mask, colour, edge=0.0):
    """An outline in one colour on the black ground, channel-major as the tokenizer's; `edge` shifts one pixel
    (an anti-aliased pixel's 8-bit rounding, which differs by colour)."""
    x = GROUND.clone()
    for c in range(3):
        x[c][mask] = colour[c]
    x[:, 0, 0] += edge
    return x.flatten()


def test_factored_code_vectors_share_structure_across_colours_and_colours_across_outlines():
    from mixmodal.tokenizers.patch import factored_vectors
    from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

    p, ground = 4, GROUND.flatten()
    red, blue = (1.0, -1.0, -1.0), (-1.0, -1.0, 1.0)
    v = factored_vectors(torch.stack([_patch(STAR, red), _patch(STAR, blue), _patch(CIRCLE, red), ground]))
    assert v.shape == (4, 4 * p * p + 6)
    pixels, structure, colours = v[:, :3 * p * p], v[:, 3 * p * p:4 * p * p], v[:, 4 * p * p:]
    assert torch.allclose(structure[0], structure[1]) and not torch.allclose(structure[0], structure[2])
    assert torch.allclose(colours[0], colours[2]) and not torch.allclose(colours[0], colours[1])
    assert not torch.allclose(pixels[0], pixels[1])  # the patch itself still tells every code apart
    assert torch.allclose(structure[3], torch.zeros(p * p))  # a uniform patch has no structure
    with pytest.raises(ValueError, match="image.code_vectors=factored needs a k-means tokenizer"):
        VQTokenizer(VQConfig(codebook_size=16, codebook_dim=8)).code_vectors("factored")
    with pytest.raises(ValueError, match="image.code_vectors=grouped needs a k-means tokenizer"):
        VQTokenizer(VQConfig(codebook_size=16, codebook_dim=8)).code_vectors("grouped")
    with pytest.raises(ValueError, match="image.code_vectors must be 'tokenizer', 'factored' or 'grouped'"):
        ImageConfig(code_vectors="edges")


def test_grouped_code_vectors_give_each_outline_and_each_colour_one_row():
    from mixmodal.tokenizers.patch import code_groups, grouped_vectors

    p = 4
    red, blue, green = (1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0)
    patches = torch.stack([_patch(STAR, red), _patch(STAR, blue, 2 / 255), _patch(CIRCLE, red), GROUND.flatten(),
                           _patch(CIRCLE, green)])
    structure, colours = code_groups(patches)
    assert structure.tolist() == [0, 0, 1, 2, 1]  # numbered in code order; the rounding does not split a star
    assert colours.tolist() == [0, 1, 0, 2, 3]
    v = grouped_vectors(patches)
    assert v.shape == (5, 3 * p * p + 3 + 4)
    assert torch.equal(v[:, 3 * p * p:3 * p * p + 3], torch.nn.functional.one_hot(structure).float())
    assert torch.equal(v[:, 3 * p * p + 3:], torch.nn.functional.one_hot(colours).float())
    assert torch.allclose(v[:, :3 * p * p].norm(dim=1), torch.ones(5))


@pytest.mark.parametrize("code_embedding", ["codebook_only", "codebook_out", "codebook"])
def test_a_code_that_repeats_another_never_takes_its_probability(code_embedding):
    from mixmodal.model.fusion import UNUSED_CODE_LOGIT

    model = _model(code_embedding)
    vectors = torch.randn(8, 12)
    vectors[5:] = vectors[0]  # a k-means codebook's spares repeat its first code; the tokenizer never emits them
    model.set_code_features(vectors)
    codes = model.vocab.image_code_ids
    ids = torch.tensor([[1, codes.start + 3, codes.start + 5]])
    logits = model(ids).logits[0, -1, codes.start:codes.stop]
    if code_embedding == "codebook":  # the codes' own lm_head rows tell them apart (and learn they never occur)
        assert not (logits == UNUSED_CODE_LOGIT).any()
    else:  # only the shared map scores them: the repeats would tie with code 0
        assert (logits[5:] == UNUSED_CODE_LOGIT).all() and (logits[:5] > UNUSED_CODE_LOGIT).all()
        if code_embedding == "codebook_only":  # and a repeat read as input is its first code
            assert torch.allclose(model.embed(ids)[0, 2], model.embed(torch.tensor([[codes.start]]))[0, 0])
    reloaded = _model(code_embedding)
    reloaded.load_state_dict(model.state_dict())  # found again on load: nothing new in the saved weights
    assert torch.equal(reloaded.code_unused, model.code_unused) and "code_unused" not in model.state_dict()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
