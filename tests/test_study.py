"""The study's FLOP-ratio rule (Transfusion Table 3 form): interpolation, the edge cases, and
the direction of "better"."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("study_compute", Path(__file__).parents[1] / "benchmarks/study/compute.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def rows(points):
    return [{"flops": f, "m": v} for f, v in points]


def test_ratio_interpolates_log_linearly_between_budgets():
    reference = rows([(1e12, 0.2), (4e12, 0.5)])  # the reference's largest budget scores 0.5
    candidate = rows([(1e11, 0.3), (1e13, 0.7)])  # 0.5 is halfway: at 1e12 in log-FLOPs
    text, value = study.parity_ratio(reference, candidate, "m", higher=True)
    assert value == pytest.approx(1e12 / 4e12)
    assert text == "0.25"


def test_ratio_edges_and_lower_is_better():
    reference = rows([(1e12, 10.0)])
    assert study.parity_ratio(reference, rows([(1e11, 5.0), (1e12, 3.0)]), "m", higher=False)[0] == "<= 0.1"
    text, value = study.parity_ratio(reference, rows([(1e11, 50.0), (1e12, 20.0)]), "m", higher=False)
    assert value is None and text.startswith("> 1") and "not reached" in text
    assert study.parity_ratio(reference, rows([]), "m", higher=True) == ("n/a", None)


def test_a_reference_at_zero_gives_no_ratio():
    assert study.parity_ratio(rows([(1e12, 0.0)]), rows([(1e11, 0.0)]), "m", higher=True)[0].startswith("n/a")


def test_every_study_config_names_a_tokenizer_it_can_train():
    """Each arm at each resolution trains its image tokenizer from configs/tokenizers/ when absent,
    and the two arms at a resolution differ only in the image path."""
    from mixmodal.config import load_yaml

    root = Path(__file__).parents[1]
    for res in study.RESOLUTIONS:
        configs = {arm: load_yaml(root / cfg.format(res=res)) for arm, (cfg, _) in study.ARMS.items()}
        for arm, cfg in configs.items():
            name = Path(cfg["data"]["image_tokenizer"]).parent.name
            tok = load_yaml(root / "configs/tokenizers" / f"{name}.yaml")
            if tok.get("task") == "patch-tokenizer":  # computed (k-means, PCA): the resolution is in its section
                resolution = tok["tokenizer"][tok["tokenizer"]["kind"]]["resolution"]
            else:
                resolution = load_yaml(root / "configs/tokenizers" / tok["tokenizer"]["preset"])["resolution"]
            assert resolution == res, arm  # shapes render at the image tokenizer's resolution
            assert "resolution=" not in cfg["data"]["source"] or f"resolution={res}" in cfg["data"]["source"], arm
        tokens, latents = configs["tokens"], configs["latents"]
        assert tokens["model"]["transformer"] == latents["model"]["transformer"]
        assert tokens["trainer"] == latents["trainer"] and tokens["data"]["pipeline"] == latents["data"]["pipeline"]
        assert tokens["data"]["source"] == latents["data"]["source"]


def test_a_missing_tokenizer_without_a_config_is_a_clear_error(tmp_path, monkeypatch):
    config = tmp_path / "arm.yaml"
    config.write_text("data: {image_tokenizer: runs/no-such-tokenizer/tokenizer}\n")
    monkeypatch.setattr(study, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="data.image_tokenizer=runs/no-such-tokenizer/tokenizer is missing"):
        study.ensure_image_tokenizer("arm.yaml")


def test_the_attention_ablation_compares_equal_budgets_only():
    def row(steps, v):
        return {"steps": steps, "flops": steps * 1e10, **{k: v for k, *_ in study.METRICS}}

    lines = study.attention_ablation([row(300, 0.1), row(600, 0.2), row(1200, 0.9)], [row(300, 0.3), row(600, 0.4)])
    table = "\n".join(lines)
    assert "1200" not in table and "0.900" not in table  # the longer bidirectional run is not compared
    assert "| bidirectional, 300 steps | causal, 300 steps | bidirectional, 600 steps | causal, 600 steps |" in table
    assert "| 0.100 | 0.300 | 0.200 | 0.400 |" in table
    assert "No budget" in "\n".join(study.attention_ablation([row(300, 0.1)], [row(600, 0.2)]))


ablate_spec = importlib.util.spec_from_file_location("study_ablate", Path(__file__).parents[1] / "benchmarks/study/ablate.py")
ablate = importlib.util.module_from_spec(ablate_spec)
ablate_spec.loader.exec_module(ablate)


def test_ablation_arms_parse_and_bad_ones_are_refused():
    assert ablate.parse_arm("base") == ("base", [])
    assert ablate.parse_arm("lr: trainer.lr=3e-3 trainer.warmup_steps=50") == ("lr", ["trainer.lr=3e-3",
                                                                                       "trainer.warmup_steps=50"])
    with pytest.raises(SystemExit, match="key=value"):
        ablate.parse_arm("lr: trainer.lr")
    with pytest.raises(SystemExit, match="plain NAME"):
        ablate.parse_arm("../x: trainer.lr=1")


def test_ablation_table_reads_each_arms_last_eval_and_the_seed_spread(tmp_path):
    import json

    from mixmodal.train.metrics import MetricsLogger

    def fake_run(name, accuracies):
        log = MetricsLogger(tmp_path / name)
        for step, acc in accuracies:
            log.log(step, "eval", metrics={"geneval_heldout_overall": acc, "train_flops": 1e12 * step})
        (tmp_path / name / "ablate-time.json").write_text(json.dumps({"seconds": 60.0}))

    fake_run("base-s0", [(10, 0.1), (20, 0.30)])
    fake_run("base-s1", [(10, 0.1), (20, 0.40)])
    fake_run("lr-s0", [(20, 0.50)])
    fake_run("lr-s1", [(20, 0.70)])
    result = ablate.table(tmp_path, [("base", []), ("lr", ["trainer.lr=3e-3"])], seeds=2)
    assert [r["geneval_heldout_overall"] for r in result["rows"]] == [0.30, 0.40, 0.50, 0.70]
    text = ablate.write_report(tmp_path, "configs/recipes/tokens-64.yaml", 20, result, "cmd").read_text()
    assert "| base | `(base)` | 2 | 0.350 ± 0.050 | 2.00e+13 | 60 |" in text
    assert "| lr | `trainer.lr=3e-3` | 2 | 0.600 ± 0.100 | 2.00e+13 | 60 |" in text
    assert ablate.finished(tmp_path / "base-s0") is False  # no eval.json / model: it would be trained


def test_tokenizer_recon_scores_both_held_out_splits(tmp_path):
    import torch

    from mixmodal.tokenizers.image import save_image_tokenizer
    from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

    recon_spec = importlib.util.spec_from_file_location("study_recon", Path(__file__).parents[1] / "benchmarks/study/tokenizer_recon.py")
    recon = importlib.util.module_from_spec(recon_spec)
    recon_spec.loader.exec_module(recon)
    torch.manual_seed(0)
    trunk = dict(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2], num_res_blocks=1, norm_groups=4)
    save_image_tokenizer(VQTokenizer(VQConfig(**trunk, latent_channels=8, codebook_size=64, codebook_dim=4)), tmp_path / "vq")
    out = recon.tokenizer_recon(str(tmp_path / "vq"), num=4)
    assert set(out) == {"heldout", "heldout-combos"}
    for metrics in out.values():
        assert {"psnr", "oracle_overall", "oracle_shape", "oracle_colour"} <= set(metrics)
        assert metrics["oracle_overall"] == 0.0  # an untrained tokenizer writes no scene back
        assert 0.0 <= metrics["oracle_background"] <= 1.0


def test_overdraw_relation_verdicts_tell_right_from_reversed():
    """overdraw.py's position split: one of each named shape, the relation right, reversed or neither;
    None when a named shape is missing or repeated."""
    spec = importlib.util.spec_from_file_location("study_overdraw", Path(__file__).parents[1] / "benchmarks/study/overdraw.py")
    overdraw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overdraw)
    from mixmodal.data.shapes import Scene, ShapeObject, render
    from mixmodal.data.shapes.geneval import Prompt, Requirement, image_things

    prompt = Prompt("position", "a photo of a circle left of a square",
                    (Requirement("square"), Requirement("circle", relation="left of", target=0)))

    def verdict(*objects):
        return overdraw.relation_verdict(prompt, image_things(render(Scene(tuple(objects)), 48)))

    circle = lambda cell: ShapeObject("circle", "red", "large", cell)  # noqa: E731
    square = lambda cell: ShapeObject("square", "blue", "large", cell)  # noqa: E731
    assert verdict(circle("center left"), square("center right")) == "right"
    assert verdict(circle("center right"), square("center left")) == "reversed"
    assert verdict(circle("top center"), square("bottom center")) == "neither"  # above, not beside
    assert verdict(circle("center left"), circle("top left"), square("center right")) is None  # two circles
    assert verdict(square("center right")) is None


def test_reading_scores_the_row_and_the_column_of_the_object_apart(monkeypatch):
    """reading.py: a model that names the row right and mirrors the column scores row 1.0, and its column
    right only where mirroring changes nothing (the centre column)."""
    import dataclasses

    import numpy as np

    spec = importlib.util.spec_from_file_location("study_reading", Path(__file__).parents[1] / "benchmarks/study/reading.py")
    reading = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reading)
    from mixmodal.data.shapes import Scene, caption
    from mixmodal.data.shapes.scene import POSITIONS
    from mixmodal.eval.shapes_tasks import ShapesEvalConfig, documents

    docs = documents(ShapesEvalConfig(min_objects=1, max_objects=1), 48, "caption", "heldout", 24)

    def mirrored(doc):
        obj = Scene.from_dict(doc.metadata["scenes"][0]).objects[0]
        cell = 3 * obj.row + (2 - obj.column)
        return Scene((dataclasses.replace(obj, position=POSITIONS[cell]),))

    class Result:
        def __init__(self, text):
            self.document = type("D", (), {"texts": [text]})()

    def fake_generate(engine, prompts, gen, batch_size, seeds, progress, what):
        assert len(prompts) == len(docs)
        return [Result(caption(mirrored(d), np.random.default_rng(i))) for i, d in enumerate(docs)]

    monkeypatch.setattr(reading, "_generate", fake_generate)
    engine = type("E", (), {"image_tokenizer": type("T", (), {"config": type("C", (), {"resolution": 48})()})()})()
    row = reading.one_object_captions(engine, 24)
    centre = np.mean([Scene.from_dict(d.metadata["scenes"][0]).objects[0].column == 1 for d in docs])
    assert row["one_object_parsed"] == 24
    assert row["row"] == 1.0 and row["colour"] == 1.0 and row["shape"] == 1.0
    assert row["column"] == round(float(centre), 3) < 1.0
    assert all(k.split("->")[0] == str(2 - int(k.split("->")[1])) for k in row["columns_true_to_said"])


def test_reading_attention_shares_are_uniform_when_every_key_is_alike():
    """reading.py --attention: per layer, the caption tokens' share of attention on the object's patch lies
    between uniform and the best head's; with every key the same (k_proj zero) it is exactly uniform."""
    spec = importlib.util.spec_from_file_location("study_reading", Path(__file__).parents[1] / "benchmarks/study/reading.py")
    reading = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reading)
    import torch

    import mixmodal.model.transformer as transformer_module
    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.inference import Engine
    from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
    from mixmodal.model.transformer import TransformerConfig
    from mixmodal.objectives.diffusion import DiffusionConfig
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
    from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer

    text = TextTokenizer.train((t for d in ShapesSource(ShapesConfig(resolution=48), num=200) for t in d.texts),
                               TextTokenizerConfig(vocab_size=300))
    torch.manual_seed(0)
    vae = VAETokenizer(VAEConfig(resolution=48, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1,
                                 norm_groups=4, latent_channels=4))  # 24 x 24 latents, 8 x 8 patches: 3 x 3
    model = FusionModel(ModelConfig(text_vocab_size=text.vocab_size,
                                    image=ImageConfig(mode="latents", latent_channels=4, grid_size=24, patch_size=8),
                                    transformer=TransformerConfig(dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                                                  init_std=0.5)))
    engine = Engine(model, text, vae, diffusion=DiffusionConfig(kind="flow"))
    project = transformer_module.Attention.project
    layers = reading.attention_on_object(engine, 4)
    assert transformer_module.Attention.project is project  # the spy is removed
    assert [r["layer"] for r in layers] == [0, 1] and all(r["uniform"] == 0.111 for r in layers)
    assert all(0.0 <= r["object_share"] <= r["best_head_share"] <= 1.0 for r in layers)
    assert any(abs(r["object_share"] - 1 / 9) > 1e-3 for r in layers)  # random keys: not uniform
    with torch.no_grad():
        for layer in model.transformer.layers:
            layer.self_attn.k_proj.weight.zero_()
    for r in reading.attention_on_object(engine, 4):
        assert r["object_share"] == r["best_head_share"] == 0.111  # 1 / 9, as rounded


def test_reading_gap_moves_only_the_positions_after_the_picture_and_restores():
    """reading_gap.py: RoPE positions from `start` on move by the gap, the cache's slots do not, and the
    patch is undone afterwards (a later generation is the engine's own)."""
    import torch

    from mixmodal.inference.cache import KVCache

    spec = importlib.util.spec_from_file_location("study_gap", Path(__file__).parents[1] / "benchmarks/study/reading_gap.py")
    gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gap)
    restore = gap.with_gap(8, start=12)
    try:
        cache = KVCache(1, 2, 64, "cpu")
        assert cache.begin_step(14).tolist() == [list(range(12)) + [20, 21]] * 2
        assert cache._slots.tolist() == [list(range(14))] * 2  # the slots written are the engine's own
    finally:
        restore()
    assert KVCache(1, 1, 64, "cpu").begin_step(14).tolist() == [list(range(14))]


def test_question_order_asks_the_same_questions_in_three_layouts_and_scores_each():
    """question_order.py: the question before the picture, after it, or in a user turn; each layout's answers are
    scored by type against the reference (an engine that answers only chat prompts right scores 1 there, 0 else)."""
    from mixmodal.documents import Document, Image, Text
    from mixmodal.inference.events import GenerationResult

    spec = importlib.util.spec_from_file_location("study_order", Path(__file__).parents[1] / "benchmarks/study/question_order.py")
    order = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(order)
    docs = order.questions(24, 48)
    answers = {d.metadata["question"]: d.metadata["answer"] for d in docs}

    class AnswersInChat:
        def __init__(self):
            self.prompts = []

        def generate(self, prompts, config, seed):
            out = []
            for prompt in prompts:
                self.prompts.append(prompt)
                question = next(p.text for p in prompt.parts if isinstance(p, Text)).removeprefix("Question: ")
                reply = answers[question] if "turns" in prompt.metadata else "purple"
                out.append(GenerationResult(len(out), Document([Text(reply)]), []))
            return out

    engine = AnswersInChat()
    table = {form: order.accuracy(engine, docs, form, batch_size=10) for form in order.FORMS}
    assert table["chat"]["all"] == {"accuracy": 1.0, "n": 24}
    assert table["question-first"]["all"]["accuracy"] == table["image-first"]["all"]["accuracy"] == 0.0
    assert sum(m["n"] for k, m in table["chat"].items() if k != "all") == 24
    first, after, chat = engine.prompts[0], engine.prompts[24], engine.prompts[48]
    assert isinstance(first.parts[0], Text) and isinstance(first.parts[1], Image)
    assert isinstance(after.parts[0], Image) and after.parts[1].text.startswith("Question: ")
    assert isinstance(chat.parts[0], Image) and chat.metadata["turns"] == [["user", 2]]
