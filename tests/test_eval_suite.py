"""`mixmodal eval --suite shapes`: each task scores a perfect model perfectly and a broken one at
zero (fake engines), the whole suite runs end to end on a tiny checkpoint and writes its
metrics and report, and training compute comes from the model's own accounting."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from mixmodal.cli import main
from mixmodal.data.shapes import ShapesConfig, render
from mixmodal.data.sources import ShapesSource
from mixmodal.documents import Document, Image, Text
from mixmodal.eval.shapes_suite import (ShapesEvalConfig, captioning, documents, references, text_to_image,
                                        training_compute, vqa)
from mixmodal.inference.checkpoint import write_generation_settings
from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.io import save_model_dir
from mixmodal.model.transformer import TransformerConfig
from mixmodal.objectives.diffusion import DiffusionConfig
from mixmodal.tokenizers.image import save_image_tokenizer
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

RES = 32
SMALL = ShapesEvalConfig(num_prompts=6, num_captions=6, num_vqa=6, num_ppl=4, num_fid_real=8, batch_size=4)


class FakeEngine:
    """Answers every prompt with `answer(prompt_document) -> Document`."""

    def __init__(self, answer):
        self.answer = answer
        self.per_image = 64
        self.mode = "tokens"
        self.calls = 0

    def generate(self, prompts, config, seed=0):
        from mixmodal.inference.prompt import to_document

        self.calls += 1
        return [SimpleNamespace(document=self.answer(to_document(p), config)) for p in prompts]


def _scene_of_caption(text: str):
    from mixmodal.data.shapes import parse_caption

    return parse_caption(text)


def test_text_to_image_scores_a_perfect_model_1_and_a_blank_one_0():
    perfect = FakeEngine(lambda doc, cfg: Document([Image(render(_scene_of_caption(doc.texts[0]), RES))]))
    m, samples = text_to_image(perfect, SMALL, RES, "heldout", lambda *_: None)
    assert m["n"] == 6 and m["overall"] == 1.0 and m["count"] == 1.0 and m["without_image"] == 0
    assert set(m["by_objects"]) <= {"1", "2"} and all(s["objects"] <= 2 for s in samples)
    blank = FakeEngine(lambda doc, cfg: Document([Image(PILImage.new("RGB", (RES, RES)))]))
    m, _ = text_to_image(blank, SMALL, RES, "heldout-combos", lambda *_: None)
    assert m["overall"] == 0.0 and m["count"] == 0.0
    silent = FakeEngine(lambda doc, cfg: Document([Text("no image")]))
    m, _ = text_to_image(silent, SMALL, RES, "heldout", lambda *_: None)
    assert m["without_image"] == 6 and m["overall"] == 0.0


def test_prompt_sets_are_fixed_and_references_distinct():
    a = [d.metadata["caption"] for d in documents(SMALL, RES, "caption", "heldout", 5)]
    b = [d.metadata["caption"] for d in documents(SMALL, RES, "caption", "heldout", 5)]
    assert a == b
    doc = documents(SMALL, RES, "caption", "heldout", 1)[0]
    from mixmodal.data.shapes import Scene

    refs = references(Scene.from_dict(doc.metadata["scenes"][0]), 0, 5)
    assert len(refs) == len(set(refs)) >= 3
    assert all(_scene_of_caption(r) == Scene.from_dict(doc.metadata["scenes"][0]) for r in refs)


def test_captioning_rewards_true_captions_and_the_oracle_parses_them():
    from mixmodal.data.shapes import caption, parse_image

    def true_caption(doc, cfg):
        scene = parse_image(doc.images[0])
        return Document([Text(caption(scene, np.random.default_rng(99)))])

    good, examples, raw = captioning(FakeEngine(true_caption), SMALL, RES, lambda *_: None)
    bad, _, _ = captioning(FakeEngine(lambda doc, cfg: Document([Text("purple elephants dance")])), SMALL, RES,
                           lambda *_: None)
    assert good["oracle"]["overall"] == 1.0 and good["parsable"] == 1.0
    assert bad["oracle"]["overall"] == 0.0 and bad["parsable"] == 0.0
    assert good["cider"] > 1.0 > bad["cider"] and good["bleu4"] > bad["bleu4"]
    assert len(examples) == 6 and len(raw["references"][0]) == SMALL.num_references


def test_vqa_accuracy_counts_right_answers():
    from mixmodal.data.shapes import vqa as ask

    answers = {}
    for d in documents(SMALL, RES, "vqa", "heldout", 6):
        answers[d.metadata["question"]] = d.metadata["answer"]

    def oracle(doc, cfg):
        assert doc.texts[-1] == "Answer:"
        question = doc.texts[0].removeprefix("Question: ")
        return Document([Text(" " + answers[question])])

    m, examples = vqa(FakeEngine(oracle), SMALL, RES, lambda *_: None)
    assert m["accuracy"] == 1.0 and m["n"] == 6
    m, _ = vqa(FakeEngine(lambda doc, cfg: Document([Text(" banana")])), SMALL, RES, lambda *_: None)
    assert m["accuracy"] == 0.0


def test_training_compute_is_the_models_own_accounting(tmp_path):
    from mixmodal.train.fusion import FusionTrainConfig, training_compute as account

    config = FusionTrainConfig()
    config.trainer.steps, config.trainer.batch_size, config.trainer.grad_accumulation = 10, 4, 2
    config.data.pipeline.seq_len = 64
    model = FusionModel(ModelConfig(text_vocab_size=300, image=ImageConfig(mode="tokens", num_codes=32, grid_size=4),
                                    transformer=TransformerConfig(dim=32, num_layers=2, num_heads=4)))
    got = account(model, config, world_size=3)
    assert got["positions"] == 10 * 4 * 2 * 3 * 64
    assert got["flops"] == pytest.approx(got["positions"] * model.flops_per_token(64))
    assert got["flops_per_position"] > 6 * model.num_parameters(non_embedding=True)  # attention on top
    (tmp_path / "training.json").write_text(json.dumps(got))
    assert training_compute(tmp_path)["flops"] == got["flops"]
    assert training_compute(tmp_path / "nowhere")["flops"] is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny token-mode model folder at 32 px, as `mixmodal train` writes it (training.json included)."""
    out = tmp_path_factory.mktemp("eval-ckpt") / "model"
    torch.manual_seed(0)
    texts = (t for doc in ShapesSource(ShapesConfig(resolution=RES), num=100) for t in doc.texts)
    text = TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=300))
    trunk = dict(resolution=RES, base_channels=8, channel_multipliers=[1, 2, 2], num_res_blocks=1, norm_groups=4)
    image_tok = VQTokenizer(VQConfig(**trunk, latent_channels=8, codebook_size=32, codebook_dim=4))
    model = FusionModel(ModelConfig(text_vocab_size=text.vocab_size, image=ImageConfig(mode="tokens", num_codes=32, grid_size=8),
                                    transformer=TransformerConfig(dim=32, num_layers=2, num_heads=4)))
    save_model_dir(model, out)
    text.save(out / "text_tokenizer")
    save_image_tokenizer(image_tok, out / "image_tokenizer")
    write_generation_settings(out, max_length=160, diffusion=None)
    (out / "training.json").write_text(json.dumps({"steps": 7, "flops": 1.5e12, "positions": 1000}))
    return out


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    from mixmodal.eval.feature_net import train_feature_net

    out = tmp_path_factory.mktemp("features") / "net"
    train_feature_net(RES, steps=3, batch_size=8, out=out)
    return out


def test_eval_cli_writes_metrics_and_a_report(checkpoint, feature_net, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", str(checkpoint), "--suite", "shapes", "--out", str(out), "--feature-net", str(feature_net),
                 "num_prompts=3", "num_captions=3", "num_vqa=3", "num_ppl=3", "num_fid_real=6", "batch_size=3",
                 "samples=3", "geneval_prompts=2", "images_per_prompt=1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and "t2i_heldout_overall" in printed
    assert "geneval_heldout_overall" in printed and "geneval_heldout-combos_color_attr" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["geneval"]["heldout"]["categories"]) == {"single_object", "two_object", "counting", "colors",
                                                         "position", "color_attr"}
    assert set(m["geneval"]["heldout-combos"]["categories"]) == {"colors", "color_attr"}
    assert all(c["images"] == 2 for c in m["geneval"]["heldout"]["categories"].values())
    assert m["sampling"]["cfg"] == m["geneval"]["heldout"]["sampling"]["cfg"]
    assert set(m["text_to_image"]) == {"heldout", "heldout-combos"}
    for split in m["text_to_image"].values():
        assert split["n"] == 3 and 0.0 <= split["overall"] <= 1.0
        assert split["fid"]["comparable"] is False and "NOT comparable" in split["fid"]["features"]
    assert m["training"]["flops"] == 1.5e12 and m["image_mode"] == "tokens"
    assert m["captioning"]["n"] == 3 and m["vqa"]["n"] == 3 and m["text"]["tokens"] > 0
    assert m["cross_checks"]["captioning"]["cider_abs_diff"] < 1e-9
    assert m["cross_checks"]["fid"]["abs_diff"] < 1e-3 * max(1.0, m["cross_checks"]["fid"]["fid"])
    assert m["command"].startswith(f"mixmodal eval {checkpoint} --suite shapes --out {out} --feature-net {feature_net}")
    assert "num_prompts=3" in m["command"] and "cfg=" not in m["command"]  # only what differs from the defaults
    report = (out / "report.md").read_text()
    assert m["command"] in report
    assert "NO" in report and "1.5e+12" in report and "figures/attributes.png" in report
    assert "GenEval-form accuracy" in report and "figures/geneval-heldout.png" in report
    assert (out / "figures" / "geneval.png").is_file() and (out / "figures" / "geneval-heldout-combos.png").is_file()
    assert (out / "figures" / "samples-heldout.png").is_file() and (out / "report.html").is_file()
    assert len(list((out / "samples" / "heldout").glob("*.png"))) == 3


def test_eval_cli_errors_are_clear(checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--suite", "coco", "--out", str(tmp_path / "x")]) == 2
    assert "the suites are shapes" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--out", str(tmp_path / "x"), "splits=[nowhere]"]) == 2
    assert "unknown split" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--out", str(tmp_path / "x"), "--inception", str(tmp_path / "none.pth"),
                 "num_prompts=1", "num_captions=0", "num_vqa=0", "num_ppl=0"]) == 2
    assert "none.pth" in capsys.readouterr().err


def test_sweep_scores_every_setting_on_validation_prompts_and_names_the_best(checkpoint, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["eval", str(checkpoint), "--suite", "shapes", "--sweep", "--out", str(out), "geneval_prompts=1",
                 "images_per_prompt=1", "batch_size=8"]) == 0
    assert "sweep.md" in capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    from mixmodal.eval.shapes_suite import SWEEP_GRID

    assert len(result["rows"]) == len(SWEEP_GRID["tokens"]) and result["prompt_set"] == "validation"
    assert result["best"]["overall"] == max(r["overall"] for r in result["rows"])
    assert any(r["settings"]["cdk"] for r in result["rows"]) and "--sweep" in result["command"]
    assert "(best)" in (out / "sweep.md").read_text()


def test_caption_gain_reads_both_streams_of_the_same_documents(checkpoint):
    """benchmarks/study/guidance_gap.py's token mode: image CE with and without the caption."""
    import importlib.util
    from pathlib import Path

    from mixmodal.inference import Engine

    spec = importlib.util.spec_from_file_location("guidance_gap", Path(__file__).parents[1] / "benchmarks/study/guidance_gap.py")
    gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gap)
    engine = Engine.from_pretrained(checkpoint)
    empty = gap.caption_gain(engine, num=3, uncond="empty", max_objects=1)
    masked = gap.caption_gain(engine, num=3, uncond="mask", max_objects=1)
    assert empty["mode"] == "tokens" and empty["gain"] == pytest.approx(empty["ce_u"] - empty["ce_c"])
    assert 0 < empty["ce_c"] < 10 and 0 < empty["ce_u"] < 10  # nats per code of a 32-code random model: ~log 32
    assert masked["ce_c"] == pytest.approx(empty["ce_c"], abs=1e-6)  # the captioned stream is the same
    assert masked["ce_u"] != pytest.approx(empty["ce_u"], abs=1e-6)  # the unconditional one is not
    assert empty["ce_u"] != pytest.approx(empty["ce_c"], abs=1e-6)  # the caption is in the input


def test_the_guidance_interval_is_an_eval_setting_and_reported():
    from types import SimpleNamespace

    from mixmodal.eval.report import describe_sampling
    from mixmodal.eval.shapes_suite import ShapesEvalConfig, image_generation_config, sampling

    assert sampling(ShapesEvalConfig(), "latents")["guidance_interval"] is None  # the default: guide every step
    settings = sampling(ShapesEvalConfig(guidance_interval=[0.3, 1.0]), "latents")
    assert settings["guidance_interval"] == [0.3, 1.0]
    gen = image_generation_config(SimpleNamespace(mode="latents", per_image=36), settings)
    assert gen.guidance.interval == [0.3, 1.0] and gen.guidance.scale == 7.5
    assert describe_sampling(settings, "latents") == "cfg 7.5 for 0.3 < t <= 1.0, 25 denoising steps"
    assert describe_sampling(sampling(ShapesEvalConfig(), "latents"), "latents") == "cfg 7.5, 25 denoising steps"
    tokens = sampling(ShapesEvalConfig(plausibility=0.3), "tokens")
    assert image_generation_config(SimpleNamespace(mode="tokens", per_image=9), tokens).guidance.plausibility == 0.3
    assert describe_sampling(tokens, "tokens").startswith("cfg 7.5, plausibility 0.3, ")


def test_a_model_folder_states_its_own_image_sampling_and_an_eval_setting_overrides_it(checkpoint, tmp_path,
                                                                                      monkeypatch):
    import shutil

    from mixmodal.inference.generate import generate

    from mixmodal.eval.shapes_suite import EvalError, ShapesEvalConfig, sampling
    from mixmodal.inference.engine import Engine
    from mixmodal.model.bundle import BundleError

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    write_generation_settings(folder, max_length=160, diffusion=None, image_sampling={"cfg": 3.0, "plausibility": 0.5})
    engine = Engine.from_pretrained(folder)
    assert engine.image_sampling == {"cfg": 3.0, "plausibility": 0.5}
    settings = sampling(ShapesEvalConfig(), "tokens", engine.image_sampling)
    assert (settings["cfg"], settings["plausibility"], settings["image_temperature"]) == (3.0, 0.5, 0.7)
    assert sampling(ShapesEvalConfig(cfg=5.0), "tokens", engine.image_sampling)["cfg"] == 5.0  # the eval's own wins
    assert sampling(ShapesEvalConfig(), "tokens")["plausibility"] == 0.0  # a model that states none: the defaults
    with pytest.raises(EvalError, match=r"generation.yaml image_sampling: unknown sampling setting\(s\) \['guidance'\]"):
        sampling(ShapesEvalConfig(), "tokens", {"guidance": 3.0})
    seen = {}  # `mixmodal generate` starts from it too; its flags go on top
    stream = Engine.stream
    monkeypatch.setattr(Engine, "stream", lambda self, prompts, config, **kw: seen.setdefault("config", config)
                        and stream(self, prompts, config, **kw))
    generate(folder, "a red circle", mode="image", cfg=5.0)
    assert (seen["config"].guidance.scale, seen["config"].guidance.plausibility) == (5.0, 0.5)
    (folder / "generation.yaml").write_text("max_length: 160\nimage_sampling: 0.5\n")
    with pytest.raises(BundleError, match="image_sampling must be a mapping"):
        Engine.from_pretrained(folder)


def test_a_runs_eval_sampling_is_checked_when_the_run_starts():
    from mixmodal.eval.shapes_suite import EvalError
    from mixmodal.train.fusion import FusionTask
    from mixmodal.train.run import load_run_config

    config = load_run_config(Path(__file__).resolve().parents[1] / "configs/models/tiny-tokens.yaml",
                             ["eval.sampling.guidance=3"])
    with pytest.raises(EvalError, match=r"eval.sampling: unknown sampling setting\(s\) \['guidance'\]"):
        FusionTask(config)


def test_plan_sampling_writes_a_plan_then_draws_for_the_prompt_and_the_plan():
    """`plan`: each GenEval-form prompt first gets a text-mode reply to "<prompt> Plan:", then the image is drawn
    for [prompt, "Plan: <reply>"]; the rows keep the plan, and the report line says so."""
    from mixmodal.data.shapes import parse_caption
    from mixmodal.data.shapes.geneval import prompt_set, score_image
    from mixmodal.eval.report import describe_sampling
    from mixmodal.eval.shapes_tasks import geneval, sampling

    plan = "A picture of a large red circle in the top left corner, and a small blue square in the middle."
    seen = []

    def answer(doc, config):
        seen.append((config.mode, [p.text for p in doc.parts if isinstance(p, Text)]))
        if config.mode == "text":
            return Document([Text(" " + plan[:-1])])  # the stop string is not part of the reply
        drawn = doc.parts[-1].text.removeprefix("Plan: ")
        return Document([Image(render(parse_caption(drawn), RES))])

    engine = FakeEngine(answer)
    config = ShapesEvalConfig(geneval_prompts=3, images_per_prompt=1, plan=True, batch_size=8)
    settings = sampling(config, "tokens")
    assert settings["plan"] is True and describe_sampling(settings, "tokens").startswith("a written plan")
    metrics, samples = geneval(engine, config, "validation", lambda m: None, settings)
    texts = [t for mode, t in seen if mode == "text"]
    images = [t for mode, t in seen if mode == "image"]
    assert texts and all(t[-1] == "Plan:" for t in texts)
    assert images and all(t[-1] == "Plan: " + plan for t in images)
    image = render(parse_caption(plan), RES)
    for category, rows in samples.items():
        prompts = prompt_set(category, "validation", 3)
        assert [row["plan"] for row in rows] == [plan] * 3
        assert [row["correct"] for row in rows] == [score_image(image, p)["correct"] for p in prompts]
        assert [row["plan_correct"] for row in rows] == [row["correct"] for row in rows]  # drawn as planned
        assert metrics["categories"][category]["plan_accuracy"] == metrics["categories"][category]["accuracy"]
    assert metrics["plan_overall"] == metrics["overall"]
    assert sampling(ShapesEvalConfig(), "tokens")["plan"] is False
