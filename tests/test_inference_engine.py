"""The generation engine on tiny random models, in both image modes: cached decoding equals
the full forward, guidance, masks, batching, streaming, stop strings and bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mixmodal.data.shapes import ShapesConfig
from mixmodal.data.sources import ShapesSource
from mixmodal.documents import Document, Text
from mixmodal.inference import (ContrastiveConfig, End, Engine, GenerationConfig, GuidanceConfig, ImageDone,
                                ImagePreview, ImageStarted, SamplingParams, TextDelta)
from mixmodal.inference.detokenize import IncrementalDetokenizer
from mixmodal.inference.engine import RunningBatch
from mixmodal.inference.logits import contrastive_scores, guided_scores, masked_log_softmax, sample
from mixmodal.inference.precision import HalfWeights, cast_linears, inference_copy
from mixmodal.inference.prompt import PromptError, encode_prompt, prompt_ids
from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.transformer import TransformerConfig
from mixmodal.objectives.diffusion import DiffusionConfig, patch_map
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

TRUNK = dict(resolution=16, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1, norm_groups=4)  # 8 x 8 grid
PROMPT = "two red circles above a blue square"


@pytest.fixture(scope="module")
def text_tokenizer():
    texts = (t for doc in ShapesSource(ShapesConfig(resolution=32), num=200) for t in doc.texts)
    return TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=300))


def _engine(mode: str, text_tokenizer, *, kind: str = "ddpm", grid: int = 4, max_length: int | None = None,
            seed: int = 0, rope_2d: bool = False, slot_embedding: bool = False) -> Engine:
    """A random model with logits far from uniform (init_std 0.5), so sampling is not a coin toss."""
    torch.manual_seed(seed)
    if mode == "tokens":
        image_tokenizer = VQTokenizer(VQConfig(**{**TRUNK, "resolution": 2 * grid}, latent_channels=8,
                                               codebook_size=32, codebook_dim=4))
        image = ImageConfig(mode="tokens", num_codes=32, grid_size=grid, slot_embedding=slot_embedding,
                            position_std=0.5 if slot_embedding else 0.0)
    else:
        image_tokenizer = VAETokenizer(VAEConfig(**TRUNK, latent_channels=4))
        image = ImageConfig(mode="latents", latent_channels=4, grid_size=8, patch_size=4, rope_2d=rope_2d)  # 4 patches
    config = ModelConfig(text_vocab_size=text_tokenizer.vocab_size, image=image,
                         transformer=TransformerConfig(dim=32, num_layers=2, num_heads=4, num_kv_heads=2, init_std=0.5))
    model = FusionModel(config)
    if mode == "latents":  # the output layer starts at zero (DiT); guidance needs predictions that differ
        torch.nn.init.normal_(model.patch_out.proj.weight, 0.0, 0.3)
    return Engine(model, text_tokenizer, image_tokenizer, diffusion=DiffusionConfig(kind=kind), max_length=max_length)


# --- cached decoding == the full forward ---------------------------------------------------------

class _Spy:
    """Records what row 0 was fed and what it got back at every engine step."""

    def __init__(self, engine: Engine) -> None:
        self.steps = []
        forward = engine._forward

        def spy(live, cache):
            block = live[0].blocks[0]
            out = forward(live, cache)
            self.steps.append((block, out[0][0].clone(), out[1].get(0)))
            return out

        engine._forward = spy


def _image_after(engine: Engine, n: int) -> None:
    """A random model rarely samples <boi>: after n text tokens of a text run, allow only <boi>
    (once per run), so the state machine goes text -> image -> text."""
    allowed = engine._allowed

    def only_boi(seq):
        mask = allowed(seq)
        run = seq.parts[-1].ids if seq.parts and isinstance(seq.parts[-1], IncrementalDetokenizer) else []
        if len(run) >= n and mask[engine.vocab.boi]:
            mask = torch.zeros_like(mask)
            mask[engine.vocab.boi] = True
        return mask

    engine._allowed = only_boi


def _full_forward(engine: Engine, ids: list[int], images: list[tuple[int, torch.Tensor, float]]):
    """The model without a cache over the whole sequence; images: (start, latents, time)."""
    model, per = engine.model, engine.per_image
    input_ids = torch.tensor([ids])
    kwargs = {}
    if images:
        image_ids = torch.full_like(input_ids, -1)
        for k, (start, _, _) in enumerate(images):
            image_ids[0, start:start + per] = k
        kwargs = dict(image_ids=image_ids, image_latents=torch.stack([x for _, x, _ in images]),
                      image_times=torch.tensor([t for _, _, t in images]),
                      image_index=torch.stack([s + torch.arange(per) for s, _, _ in images]))
    return model(input_ids, **kwargs)


@pytest.mark.parametrize("mode", ["tokens", "tokens-slots", "latents", "latents-rope-2d"])
def test_cached_decoding_equals_the_full_forward(text_tokenizer, mode):
    """tokens-slots: each code numbered by its place in the grid, one code a step, as the full forward numbers it."""
    engine = _engine(mode.split("-")[0], text_tokenizer, rope_2d=mode.endswith("rope-2d"),
                     slot_embedding=mode.endswith("slots"))
    mode = mode.split("-")[0]
    spy = _Spy(engine)
    _image_after(engine, 4)
    config = GenerationConfig(mode="interleaved", max_new_tokens=60 if mode == "latents" else 60 + 2 * 18, max_images=2, diffusion_steps=3,
                              text=SamplingParams(temperature=1.0), ignore_eos=True)
    result = engine.generate(PROMPT, config, seed=1)[0]
    assert len(result.images) >= 1, "the run should write an image to check image spans"
    committed: list[int] = []
    images: list[tuple[int, torch.Tensor, float]] = []
    checked = {"text": 0, "image": 0, "denoise": 0}
    for block, logits, prediction in spy.steps:
        start = len(committed)
        ids = committed + block.ids
        block_images = list(images)
        for offset, latents in block.prompt_images:
            block_images.append((start + offset, latents, engine.commit_time))
        if block.latent is not None:
            offset, latents, t = block.latent
            block_images.append((start + offset, latents, t))
        out = _full_forward(engine, ids, block_images)
        torch.testing.assert_close(logits, out.logits[0, -1], atol=2e-4, rtol=1e-4)
        if prediction is not None:
            torch.testing.assert_close(prediction, out.image_prediction[-1], atol=2e-4, rtol=1e-4)
            checked["denoise"] += 1
        last = block.ids[-1]
        in_image = block.latent is not None or engine.vocab.is_image_code(torch.tensor(last)) or last == engine.vocab.boi
        checked["image" if in_image else "text"] += 1
        committed += block.ids[:block.commit]
        if block.latent is not None and block.commit:  # the clean image written into the cache
            images.append((start + block.latent[0], block.latent[1], block.latent[2]))
        images += [(start + o, x, engine.commit_time) for o, x in block.prompt_images]
    assert checked["text"] > 3 and checked["image"] >= 1
    if mode == "latents":
        assert checked["denoise"] >= 3
    else:
        assert checked["image"] >= engine.per_image


# --- guidance ------------------------------------------------------------------------------------

def test_guidance_at_scale_one_is_the_conditional_distribution():
    torch.manual_seed(0)
    allowed = torch.rand(50) > 0.3
    cond, uncond, image = torch.randn(50), torch.randn(50), torch.randn(50)
    expected = masked_log_softmax(cond, allowed)
    torch.testing.assert_close(guided_scores([cond, uncond], allowed, 1.0, None), expected)
    torch.testing.assert_close(guided_scores([cond, image, uncond], allowed, 1.0, 1.0), expected)
    assert torch.isinf(guided_scores([cond, uncond], allowed, 3.0, None)[~allowed]).all()


def test_the_plausibility_constraint_keeps_guidance_to_what_the_prompt_allows():
    allowed = torch.tensor([True, True, True, False])
    cond = torch.tensor([2.0, 1.5, -1.0, 9.0]).log_softmax(0)  # id 2: 0.05 of the best; id 3 not allowed
    uncond = torch.tensor([2.0, 2.5, -6.0, 0.0]).log_softmax(0)  # id 2 far likelier with the prompt than without
    free = guided_scores([cond, uncond], allowed, 7.5, None)
    assert free.argmax() == 2  # guidance alone promotes an id the prompt all but rules out
    kept = guided_scores([cond, uncond], allowed, 7.5, None, plausibility=0.1)
    assert torch.isinf(kept[2]) and torch.isinf(kept[3]) and kept.argmax() == 0
    torch.testing.assert_close(kept[:2], free[:2])  # the plausible ids keep their guided scores
    ratio = (cond[1] - cond[0]).exp()  # id 1: ~0.61 of the best
    assert torch.isfinite(guided_scores([cond, uncond], allowed, 7.5, None, plausibility=float(ratio) - 1e-3)[1])
    assert torch.isinf(guided_scores([cond, uncond], allowed, 7.5, None, plausibility=float(ratio) + 1e-3)[1])
    torch.testing.assert_close(guided_scores([cond], allowed, 7.5, None, plausibility=0.5),
                               masked_log_softmax(cond, allowed))  # nothing to guide: the constraint is moot
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"guidance.plausibility must be in \[0, 1\)"):
            GuidanceConfig(plausibility=bad)


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_three_streams_at_scale_one_generate_what_one_stream_does(text_tokenizer, mode):
    engine = _engine(mode, text_tokenizer)
    plain = GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=4)
    guided = GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=4,
                              guidance=GuidanceConfig(scale=1.0, image_scale=1.0))
    assert guided.streams == 3
    a, b = engine.generate(PROMPT, plain, seed=3)[0], engine.generate(PROMPT, guided, seed=3)[0]
    assert a.ids == b.ids
    torch.testing.assert_close(a.images[0].float(), b.images[0].float(), atol=1e-4, rtol=1e-4)


def test_latent_guidance_moves_every_channel(text_tokenizer):
    engine = _engine("latents", text_tokenizer)
    base = engine.generate(PROMPT, GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=4), seed=5)[0]
    cfg = GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=4, guidance=GuidanceConfig(scale=4.0))
    guided = engine.generate(PROMPT, cfg, seed=5)[0]
    diff = (base.images[0] - guided.images[0]).abs().flatten(1).amax(1)  # per channel
    assert diff.shape == (4,) and (diff > 1e-3).all(), diff


def test_a_guidance_interval_guides_only_the_steps_inside_it(text_tokenizer):
    engine = _engine("latents", text_tokenizer, kind="flow")

    def image(guidance):
        config = GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=4, guidance=guidance)
        return engine.generate(PROMPT, config, seed=5)[0].images[0].float()

    plain, guided = image(GuidanceConfig()), image(GuidanceConfig(scale=4.0))
    # flow times 1, 0.75, 0.5, 0.25: an interval holding all of them guides every step
    torch.testing.assert_close(image(GuidanceConfig(scale=4.0, interval=[0.0, 1.0])), guided, atol=1e-5, rtol=0)
    # one holding none of them (t <= 0.2) takes the conditional prediction throughout
    torch.testing.assert_close(image(GuidanceConfig(scale=4.0, interval=[0.0, 0.2])), plain, atol=1e-4, rtol=1e-4)
    partly = image(GuidanceConfig(scale=4.0, interval=[0.6, 1.0]))  # the first two steps only
    assert (partly - plain).abs().max() > 1e-3 and (partly - guided).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"guidance.interval must be \[lo, hi\]"):
        GuidanceConfig(scale=4.0, interval=[0.8, 0.2])
    with pytest.raises(PromptError, match="guidance.interval applies to denoising times"):
        _engine("tokens", text_tokenizer).generate(PROMPT, GenerationConfig(
            mode="image", max_new_tokens=40, guidance=GuidanceConfig(scale=4.0, interval=[0.0, 1.0])))


def test_patch_groups_commit_the_patches_in_turns_and_keep_what_they_committed(text_tokenizer):
    """patch_groups=2 on 4 patches: two turns of the whole time grid; in the second the committed half is
    fed clean at t = 0 and never changes, and it is what the finished image holds."""
    engine = _engine("latents", text_tokenizer, kind="flow")
    spy = _Spy(engine)
    config = GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=3, patch_groups=2)
    image = engine.generate(PROMPT, config, seed=7)[0].images[0]
    fed = [b.latent for b, _, _ in spy.steps if b.latent is not None and b.denoise]
    assert len(fed) == 2 * 3  # a turn per group, each the whole grid
    first, second = [t for _, _, t in fed[:3]], [t for _, _, t in fed[3:]]
    assert all(isinstance(t, torch.Tensor) and t.shape == (4,) for t in first + second)
    assert all(torch.equal(t, torch.full((4,), t[0].item())) for t in first)  # no patch committed yet
    clean = second[0] == 0
    assert int(clean.sum()) == 2 and all(torch.equal(t == 0, clean) for t in second)
    assert torch.allclose(second[0][~clean], torch.ones(2))  # the rest starts again from pure noise
    pixels = patch_map(clean[None], 4)[0]  # [1, 8, 8]: each of the 4 patches is 4 x 4 latent pixels
    committed = fed[3][1]
    for _, x, _ in fed[3:]:
        assert torch.equal(torch.where(pixels, x, 0.0), torch.where(pixels, committed, 0.0))
    assert torch.equal(torch.where(pixels, image.float(), 0.0), torch.where(pixels, committed, 0.0))
    assert not torch.equal(torch.where(~pixels, image.float(), 0.0), torch.where(~pixels, committed, 0.0))
    # one group is the plain sampler, bitwise; the order is the seed's, so a seed repeats its image
    plain = GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=3)
    assert torch.equal(engine.generate(PROMPT, plain, seed=7)[0].images[0],
                       engine.generate(PROMPT, GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=3,
                                                                patch_groups=1), seed=7)[0].images[0])
    assert torch.equal(engine.generate(PROMPT, config, seed=7)[0].images[0], image)
    with pytest.raises(ValueError, match="patch_groups must be >= 1"):
        GenerationConfig(patch_groups=0)


def test_token_guidance_changes_the_codes_and_mask_uncond_differs_from_empty(text_tokenizer):
    engine = _engine("tokens", text_tokenizer)
    runs = {}
    for name, guidance in {"none": GuidanceConfig(), "empty": GuidanceConfig(scale=3.0),
                           "mask": GuidanceConfig(scale=3.0, uncond="mask")}.items():
        config = GenerationConfig(mode="image", max_new_tokens=40, guidance=guidance)
        runs[name] = engine.generate(PROMPT, config, seed=2)[0].ids
    assert runs["none"] != runs["empty"] and runs["empty"] != runs["mask"]


def test_contrastive_decoding_keeps_only_plausible_codes():
    expert = torch.tensor([4.0, 3.9, 1.0, -2.0, 0.5])
    amateur = torch.tensor([4.0, 0.0, 0.0, -5.0, 0.0])
    allowed = torch.ones(5, dtype=torch.bool)
    scores = contrastive_scores(expert, amateur, allowed, ContrastiveConfig(alpha=0.5, k=2))
    # plausible: p >= 0.5 * p(2nd largest) -> ids 0 and 1; id 1 wins (the amateur does not like it)
    assert torch.isfinite(scores).tolist() == [True, True, False, False, False]
    assert int(scores.argmax()) == 1


# --- masks and modes ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_modes_never_emit_forbidden_ids(text_tokenizer, mode):
    engine = _engine(mode, text_tokenizer, seed=1)
    v, per = engine.vocab, engine.per_image
    hot = SamplingParams(temperature=3.0)  # flat distributions: anything allowed will come up
    for out_mode in ["text", "image", "interleaved", "free"]:
        config = GenerationConfig(mode=out_mode, max_new_tokens=120, max_images=2, text=hot, image=hot, diffusion_steps=2)
        for r in engine.generate([PROMPT] * 4, config, seed=0):
            ids = r.ids
            assert v.pad not in [i for i in _outside_images(ids, v, per)] and v.bos not in ids
            assert ids.count(v.boi) == ids.count(v.eoi) == len(r.images) <= 2
            for start in [i for i, x in enumerate(ids) if x == v.boi]:
                content = ids[start + 1:start + 1 + per]
                assert ids[start + 1 + per] == v.eoi
                if mode == "tokens":
                    assert all(v.is_image_code(torch.tensor(content)))
            outside = _outside_images(ids, v, per)
            assert not any(v.is_image_code(torch.tensor(outside)).tolist())
            if out_mode != "free":
                assert not set(outside) & set(v.mask_ids) and v.end_of_span not in outside
            if out_mode == "text":
                assert not r.images
            if out_mode == "image":
                assert r.images and set(outside) <= {v.boi, v.eoi, v.eos}
            if out_mode == "interleaved" and r.finish_reason == "eos":
                assert r.images and any(i in v.text_ids for i in outside)
            assert len(ids) <= config.max_new_tokens + (1 if r.finish_reason == "eos" else 0)


def _outside_images(ids, v, per):
    out, i = [], 0
    while i < len(ids):
        if ids[i] == v.boi:
            out.append(ids[i])
            i += per + 1
            continue
        out.append(ids[i])
        i += 1
    return out


def test_sampling_controls():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([1.0, 3.0, 2.0, float("-inf")])
    assert sample(scores, SamplingParams(temperature=0), g) == 1
    assert {sample(scores, SamplingParams(top_k=1), g) for _ in range(20)} == {1}
    assert {sample(scores, SamplingParams(top_p=0.5), g) for _ in range(20)} == {1}
    assert {sample(scores, SamplingParams(temperature=5.0), g) for _ in range(200)} == {0, 1, 2}  # never id 3


# --- batches, streaming, stops -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_a_mixed_batch_equals_one_by_one(text_tokenizer, mode):
    engine = _engine(mode, text_tokenizer)
    _image_after(engine, 3)
    prompts = [PROMPT, "a green star", ""]
    configs = [GenerationConfig(mode="interleaved", max_new_tokens=50, diffusion_steps=3),
               GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=5, guidance=GuidanceConfig(scale=2.0)),
               GenerationConfig(mode="text", max_new_tokens=30, text=SamplingParams(top_p=0.9))]
    seeds = [11, 12, 13]
    batched = engine.generate(prompts, configs, seed=seeds)
    for prompt, config, s, together in zip(prompts, configs, seeds, batched):
        alone = engine.generate(prompt, config, seed=s)[0]
        assert alone.ids == together.ids and alone.finish_reason == together.finish_reason
        for a, b in zip(alone.images, together.images):
            torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_sequences_joining_and_leaving_a_running_batch_write_what_they_write_alone(text_tokenizer, mode):
    """Continuous batching: prompts join at different steps (their prefill beside the others'
    decoding), one is cancelled half-way; every finished one equals its run alone."""
    engine = _engine(mode, text_tokenizer, max_length=160)
    _image_after(engine, 3)
    jobs = [(PROMPT, GenerationConfig(mode="interleaved", max_new_tokens=50, diffusion_steps=3), 11),
            ("a green star", GenerationConfig(mode="image", max_new_tokens=40, diffusion_steps=5,
                                              guidance=GuidanceConfig(scale=2.0)), 12),
            ("", GenerationConfig(mode="text", max_new_tokens=30, text=SamplingParams(top_p=0.9)), 13),
            ("a blue square", GenerationConfig(mode="text", max_new_tokens=60, ignore_eos=True), 14)]
    joins = {0: [0, 3], 2: [1], 5: [2]}  # step -> jobs that join before it
    batch = RunningBatch(engine)
    index, results, step, rows_seen = {}, {}, 0, []
    while batch or step <= max(joins):
        for j in joins.get(step, []):
            index[batch.add(jobs[j][0], jobs[j][1], seed=jobs[j][2])] = j
        if step == 4:
            assert batch.cancel(next(i for i, j in index.items() if j == 3))
        rows_seen.append(batch.rows)
        for event in batch.step():
            if isinstance(event, End):
                results[index[event.index]] = event.result
        step += 1
    assert set(results) == {0, 1, 2} and batch.rows == 0 and not batch.cancel(0)
    assert max(rows_seen) >= 4  # guidance streams are rows: jobs ran side by side
    for j, together in results.items():
        alone = engine.generate(jobs[j][0], jobs[j][1], seed=jobs[j][2])[0]
        assert alone.ids == together.ids and alone.finish_reason == together.finish_reason
        for a, b in zip(alone.images, together.images):
            torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-4)


def test_a_running_batch_refuses_what_its_rows_cannot_hold(text_tokenizer):
    engine = _engine("tokens", text_tokenizer)
    with pytest.raises(ValueError, match="needs a capacity"):
        RunningBatch(engine)
    batch = RunningBatch(engine, capacity=40)
    with pytest.raises(PromptError, match="needs up to .* positions .* hold 40: lower max_new_tokens"):
        batch.add(PROMPT, GenerationConfig(mode="text", max_new_tokens=100))
    assert len(batch) == 0 and batch.rows == 0  # nothing joined


def test_stream_events_tell_the_whole_story(text_tokenizer):
    engine = _engine("latents", text_tokenizer)
    _image_after(engine, 3)
    config = GenerationConfig(mode="interleaved", max_new_tokens=60, max_images=2, diffusion_steps=4, preview_every=2)
    events = list(engine.stream([PROMPT, "a star"], config, seed=4))
    ends = {e.index: e.result for e in events if isinstance(e, End)}
    assert set(ends) == {0, 1} and isinstance(events[-1], End)
    for index, result in ends.items():
        mine = [e for e in events if getattr(e, "index", None) == index]
        text = "".join(e.text for e in mine if isinstance(e, TextDelta))
        assert text == "".join(p.text for p in result.document.parts if isinstance(p, Text))
        started = [e for e in mine if isinstance(e, ImageStarted)]
        done = [e for e in mine if isinstance(e, ImageDone)]
        assert len(started) == len(done) == len(result.images)
        assert all(e.pil.size == (16, 16) for e in done)
        assert len([e for e in mine if isinstance(e, ImagePreview)]) == len(done)  # step 2 of 4 (step 4 is the image)
        assert isinstance(mine[-1], End)


def test_stop_strings_and_length(text_tokenizer):
    engine = _engine("tokens", text_tokenizer)
    forwards = []
    hook = engine.model.register_forward_hook(lambda *args: forwards.append(1))
    free = engine.generate(PROMPT, GenerationConfig(mode="text", max_new_tokens=40, ignore_eos=True), seed=0)[0]
    hook.remove()
    assert free.finish_reason == "length" and len(free.ids) == 40
    assert len(forwards) == 40  # the prefill + 39 ids fed; the 40th id needs no forward
    text = free.document.parts[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = engine.generate(PROMPT, GenerationConfig(mode="text", max_new_tokens=40, ignore_eos=True, stop=[stop]),
                              seed=0)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.document.parts[0].text == text[:text.index(stop)]


def test_context_limit_and_bad_prompts(text_tokenizer, tmp_path):
    engine = _engine("tokens", text_tokenizer, max_length=16)
    with pytest.raises(PromptError, match="context is 16"):
        engine.generate(PROMPT * 5, GenerationConfig(mode="text"))
    with pytest.raises(PromptError, match="mode=image needs"):
        engine.generate("a", GenerationConfig(mode="image"))
    short = engine.generate("a", GenerationConfig(mode="text", ignore_eos=True), seed=0)[0]
    assert short.finish_reason == "length" and len(short.ids) + 2 == 16  # <bos> "a" + new ids fit the context
    with pytest.raises(ValueError, match="mode must be one of"):
        GenerationConfig(mode="video")
    with pytest.raises(PromptError, match="must be a str or a PIL image"):
        engine.generate([[PROMPT, 3]], GenerationConfig(mode="text"))


def test_prompt_images_are_laid_out_as_in_training(text_tokenizer):
    engine = _engine("latents", text_tokenizer)
    doc = next(iter(ShapesSource(ShapesConfig(resolution=32), num=1)))
    encoded = encode_prompt(doc, text_tokenizer, engine.image_tokenizer, engine.vocab, "latents")
    ids, images = prompt_ids(encoded.segments, engine.vocab, "latents", engine.per_image)
    v = engine.vocab
    assert ids[0] == v.bos and ids.count(v.boi) == len(images) == len(doc.images)
    for start, _ in images:
        assert ids[start - 1] == v.boi and ids[start + engine.per_image] == v.eoi
    result = engine.generate(doc, GenerationConfig(mode="text", max_new_tokens=8), seed=0)[0]  # runs, captioning-style
    assert not result.images


@pytest.mark.parametrize("sampler,kind", [("ddpm", "ddpm"), ("ddim", "ddpm"), ("flow", "flow"), ("ddim", "flow")])
def test_every_sampler_runs_and_a_wrong_one_is_refused(text_tokenizer, sampler, kind):
    engine = _engine("latents", text_tokenizer, kind=kind)
    r = engine.generate(PROMPT, GenerationConfig(mode="image", max_new_tokens=20, diffusion_steps=3, sampler=sampler))[0]
    assert r.images[0].shape == (4, 8, 8) and torch.isfinite(r.images[0]).all()
    wrong = "flow" if kind == "ddpm" else "ddpm"
    with pytest.raises(ValueError, match=f"sampler={wrong} needs"):
        engine.generate(PROMPT, GenerationConfig(mode="image", max_new_tokens=20, diffusion_steps=3, sampler=wrong))


def test_bf16_autocast_runs(text_tokenizer):
    engine = _engine("latents", text_tokenizer)
    engine.dtype = torch.bfloat16
    r = engine.generate(PROMPT, GenerationConfig(mode="interleaved", max_new_tokens=30, diffusion_steps=2))[0]
    assert r.finish_reason in ("eos", "length") and all(torch.isfinite(x).all() for x in r.images)


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_bf16_weights_cast_once_write_bitwise_what_autocast_over_fp32_weights_writes(text_tokenizer, mode):
    """The half copy (inference/precision.py) changes the cost, not a bit of the output; and it follows the
    model when its weights change in place."""
    engine = _engine(mode, text_tokenizer)
    engine = Engine(engine.model, text_tokenizer, engine.image_tokenizer, diffusion=DiffusionConfig(),
                    dtype=torch.bfloat16)
    config = GenerationConfig(mode="interleaved", max_new_tokens=50, diffusion_steps=3, text=SamplingParams(temperature=1.0),
                              guidance=GuidanceConfig(scale=3.0))
    _image_after(engine, 3)

    def run():
        return engine.generate([PROMPT, "a red"], config, seed=3)

    engine._half = HalfWeights(engine.model, torch.bfloat16, fuse=False)  # the cast alone; fusing: the test below
    once = run()
    copy = engine._half.model()
    assert copy.lm_head.weight.dtype == torch.bfloat16 and engine.model.lm_head.weight.dtype == torch.float32
    assert copy.embed_tokens.weight is engine.model.embed_tokens.weight  # shared, not copied
    half, engine._half = engine._half, None  # autocast over the fp32 weights, per step
    every_step = run()
    for a, b in zip(once, every_step):
        assert a.ids == b.ids and len(a.images) == len(b.images) >= 1
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    engine._half = half
    with torch.no_grad():
        engine.model.lm_head.weight.mul_(-1.0)
    assert engine._half.model() is not copy and torch.equal(engine._half.model().lm_head.weight,
                                                            engine.model.lm_head.weight.to(torch.bfloat16))


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_fused_projections_compute_the_same_products(text_tokenizer, mode):
    """fuse_projections (the engine's half copy): q/k/v and gate/up in one matmul each give the unfused
    outputs (fp32: to summation order; bf16: to its rounding), and the engine's bf16 copy is fused."""
    from mixmodal.model.transformer import fuse_projections

    engine = _engine(mode, text_tokenizer)
    model = engine.model.eval()
    fused = fuse_projections(copy.deepcopy(model))
    attn, mlp = fused.transformer.layers[0].self_attn, fused.transformer.layers[0].mlp
    assert attn.q_proj is None and attn.qkv_proj.out_features == model.transformer.layers[0].self_attn.q_proj.out_features \
        + 2 * model.transformer.layers[0].self_attn.k_proj.out_features and mlp.up_proj is None
    ids = torch.randint(0, model.vocab.size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(fused(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half, half_fused = cast_linears(model, torch.bfloat16), inference_copy(model, torch.bfloat16)
            a, b = half(ids).logits.float(), half_fused(ids).logits.float()
    assert (a - b).abs().max() <= 0.02 * a.abs().max()
    bf16 = Engine(model, text_tokenizer, engine.image_tokenizer, diffusion=DiffusionConfig(), dtype=torch.bfloat16)
    assert bf16._half.model().transformer.layers[0].self_attn.qkv_proj is not None
    r = bf16.generate(PROMPT, GenerationConfig(mode="interleaved", max_new_tokens=30, diffusion_steps=2), seed=0)[0]
    assert r.finish_reason in ("eos", "length") and all(torch.isfinite(x).all() for x in r.images)


def test_compiled_decoding_writes_what_eager_decoding_writes(text_tokenizer, monkeypatch):
    """Engine(compile=True): every block's fixed-shape parts through torch.compile (inference/compiled.py), on a
    copy (the user's model is untouched); in fp32 the same tokens as eager decoding, logits within 1e-4. Without
    a C++ compiler on a CPU it says so before any step."""
    import functools
    import shutil

    engine = _engine("tokens", text_tokenizer)
    model = engine.model.eval()
    config = GenerationConfig(mode="interleaved", max_new_tokens=24, text=SamplingParams(temperature=0.0),
                              guidance=GuidanceConfig(scale=3.0))
    eager = Engine(model, text_tokenizer, engine.image_tokenizer, diffusion=DiffusionConfig())
    compiled = Engine(model, text_tokenizer, engine.image_tokenizer, diffusion=DiffusionConfig(), compile=True)
    copy_ = compiled._half.model()
    assert isinstance(copy_.transformer.layers[0].before_attention, functools.partial)
    assert not isinstance(model.transformer.layers[0].before_attention, functools.partial)
    a = eager.generate([PROMPT, "a red"], config, seed=1)
    b = compiled.generate([PROMPT, "a red"], config, seed=1)
    for x, y in zip(a, b):
        assert x.ids == y.ids
    ids = torch.tensor([a[0].ids[:20]])
    with torch.no_grad():
        assert torch.allclose(copy_(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        Engine(model, text_tokenizer, engine.image_tokenizer, diffusion=DiffusionConfig(), compile=True)


def test_kv_cache_fast_paths_match_the_general_ones():
    """Rows of one length write by slice and a one-position step attends without a mask; both give what the
    scatter write and the dense mask give."""
    from mixmodal.inference.cache import KVCache

    outs = {}
    for general in (False, True):
        cache = KVCache(1, 2, 16, "cpu")
        ks = [torch.randn(2, 2, n, 4, generator=torch.Generator().manual_seed(n)) for n in (5, 1, 1)]
        for i, k in enumerate(ks):
            cache.begin_step(k.shape[2])
            if general:
                cache._start = None
            mask = cache.step_mask(torch.full((2,), k.shape[2]), torch.full((2, k.shape[2]), -1))
            kk, vv = cache.update(0, k, k * 2)
            q = torch.randn(2, 2, k.shape[2], 4, generator=torch.Generator().manual_seed(100 + i))
            outs.setdefault(general, []).append((mask.kind, mask.attend(q, kk, vv)))
            cache.commit(torch.full((2,), k.shape[2]))
    assert [kind for kind, _ in outs[False]] == ["dense", "full", "full"]
    assert [kind for kind, _ in outs[True]] == ["dense", "dense", "dense"]
    for (_, a), (_, b) in zip(outs[False], outs[True]):
        assert torch.allclose(a, b, atol=1e-6)


def test_documents_hold_the_output(text_tokenizer):
    engine = _engine("tokens", text_tokenizer)
    r = engine.generate(Document([Text(PROMPT)]), GenerationConfig(mode="image", max_new_tokens=20), seed=0)[0]
    assert [type(p).__name__ for p in r.document.parts] == ["Image"]
    assert r.document.parts[0].image.size == (8, 8)  # the VQ halves: 4 x 4 codes
    assert r.document.metadata["finish_reason"] == r.finish_reason == "eos"


def test_best_of_mixes_top_p_and_cd_k_and_sorts_by_the_scorer(text_tokenizer):
    from mixmodal.inference.rerank import best_of

    engine = _engine("tokens", text_tokenizer)

    def brightness(doc):
        return float(np.asarray(doc.parts[0].image, dtype=np.float32).mean())

    ranked = best_of(engine, PROMPT, GenerationConfig(mode="image", max_new_tokens=20), n=4, scorer=brightness, seed=7)
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    assert sorted(r.document.metadata["sampling"] for r in ranked) == ["cd-k", "cd-k", "top-p 0.9", "top-p 0.9"]
    assert all(r.score == brightness(r.document) for r in ranked)


def test_shapes_scorer_gives_a_rendered_caption_full_marks():
    from mixmodal.data.shapes import shapes_document
    from mixmodal.documents import Image
    from mixmodal.inference.rerank import shapes_scorer

    doc = shapes_document(ShapesConfig(resolution=64), "train", 0)
    caption = doc.texts[0]
    scorer = shapes_scorer(caption)
    assert scorer(Document([Image(doc.images[0])])) == 1.0
    assert scorer(Document([Text("no image")])) == 0.0
