"""`mixmodal eval --suite shapes-chat` (issue 20): a model that replies as the conversation does scores 1
everywhere, one that replies wrongly scores 0, and the edit verdicts separate target from the rest."""

from __future__ import annotations

import pytest

from mixmodal.data.shapes import Edit, Scene, ShapeObject, render
from mixmodal.data.shapes.edits import EDIT_OPS
from mixmodal.documents import Document, Image, Text
from mixmodal.eval.chat_suite import ChatEvalConfig, conversations, play, score_edit, summarise
from mixmodal.inference.events import GenerationResult


class Scripted:
    """An engine stand-in that replies with the conversation's own assistant turn (or a wrong one)."""

    mode, per_image = "latents", 36

    def __init__(self, docs, wrong: bool = False, wrong_kinds: tuple[str, ...] = ()) -> None:
        self.by_first = {id(d.parts[0]): d for d in docs}
        self.wrong = wrong
        self.wrong_kinds = wrong_kinds
        self.prompts = []

    def generate(self, prompts, config, seed):
        out = []
        for prompt in prompts:
            self.prompts.append(prompt)
            doc = self.by_first[id(prompt.parts[0])]
            turn = sum(role == "user" for role, _ in prompt.metadata["turns"]) - 1
            turns = doc.metadata["turns"]
            start = sum(n for _, n in turns[:2 * turn + 1])
            reply = doc.parts[start:start + turns[2 * turn + 1][1]]
            if self.wrong or doc.metadata["exchanges"][turn]["kind"] in self.wrong_kinds:
                reply = [Text("purple") if isinstance(p, Text) else Image(render(Scene(()), 48)) for p in reply]
            out.append(GenerationResult(len(out), Document(list(reply)), []))
        return out


@pytest.fixture(scope="module")
def docs():
    return conversations(ChatEvalConfig(num_conversations=60, chat_turns=3), 48)


def test_replies_like_the_conversation_score_one_and_wrong_ones_zero(docs):
    config = ChatEvalConfig(num_conversations=60, cfg=1.0, diffusion_steps=1, image_temperature=1.0)
    right = summarise(play(Scripted(docs), docs, config, lambda _: None))
    for kind in ("generate", "caption", "vqa", "edit"):
        assert right[kind]["n"] > 0 and right[kind]["accuracy"] == 1.0, (kind, right[kind])
    assert right["multi_turn"]["n"] > 0 and right["multi_turn"]["accuracy"] == 1.0
    wrong = summarise(play(Scripted(docs, wrong=True), docs, config, lambda _: None))
    assert all(wrong[k]["accuracy"] == 0.0 for k in ("generate", "caption", "vqa", "edit"))
    assert wrong["multi_turn"]["accuracy"] == 0.0
    # follow-ups about a picture the model drew wrongly are not counted (the reference no longer holds)
    assert wrong["multi_turn"]["n"] < right["multi_turn"]["n"]


def test_exchanges_after_a_wrong_drawing_are_summarised_apart(docs):
    """A model that draws requests wrongly but edits, captions and answers as the reference does: the plain
    accuracies count its edits and answers about its own wrong pictures against the reference; the
    context-right summaries keep only the exchanges whose earlier pictures it drew right."""
    config = ChatEvalConfig(num_conversations=60, cfg=1.0, diffusion_steps=1, image_temperature=1.0)
    rows = play(Scripted(docs, wrong_kinds=("generate",)), docs, config, lambda _: None)
    out = summarise(rows)
    assert out["generate"]["accuracy"] == 0.0
    for kind in ("caption", "vqa", "edit"):
        right = out[kind]["context_right"]
        assert 0 < right["n"] < out[kind]["n"] and right["accuracy"] == 1.0, (kind, out[kind])
    after_drawing = [r for r in rows if r["kind"] == "vqa" and not r["context_ok"]]
    assert after_drawing and all(r["correct"] == 1.0 for r in after_drawing)  # the scripted answer is the reference
    opening = [r for r in rows if r["kind"] == "edit" and r["turn"] == 0]
    assert out["edit"]["first_turn"] == {"accuracy": 1.0, "n": len(opening)} and opening


def test_follow_ups_of_a_partial_drawing_are_not_context_right(docs):
    """A GenEval-form request names part of the world's scene ("draw an orange circle"); a drawing that meets it
    but leaves out the rest is a right reply, yet the follow-ups ("how many objects?") were written about the whole
    scene: they are not context right (the reference does not hold for what the model drew)."""
    from mixmodal.data.shapes.geneval import Prompt, judge, scene_things

    partial: set[int] = set()

    class DrawsOnlyWhatIsAsked(Scripted):
        def generate(self, prompts, config, seed):
            out = super().generate(prompts, config, seed)
            for prompt, result in zip(prompts, out):
                doc = self.by_first[id(prompt.parts[0])]
                turn = sum(role == "user" for role, _ in prompt.metadata["turns"]) - 1
                exchange = doc.metadata["exchanges"][turn]
                if exchange["kind"] != "generate" or not exchange.get("prompt"):
                    continue
                scene = Scene.from_dict(doc.metadata["scenes"][exchange["image"]])
                for k in range(len(scene.objects)):  # leave out an object the request does not need
                    less = Scene(scene.objects[:k] + scene.objects[k + 1:], scene.background)
                    if less.objects and judge(Prompt.from_dict(exchange["prompt"]), scene_things(less))[0]:
                        partial.add(next(c for c, d in enumerate(docs) if d is doc))
                        result.document.parts[:] = [Image(render(less, 48))]
                        break
            return out

    config = ChatEvalConfig(num_conversations=60, cfg=1.0, diffusion_steps=1, image_temperature=1.0)
    rows = play(DrawsOnlyWhatIsAsked(docs), docs, config, lambda _: None)
    drawn = [r for r in rows if r["kind"] == "generate" and r["conversation"] in partial]
    assert drawn and all(r["correct"] == 1.0 and r["exact"] == 0.0 for r in drawn)
    after = [r for r in rows if r["conversation"] in partial and r["turn"] > 0]
    assert after and not any(r["context_ok"] for r in after)
    others = [r for r in rows if r["conversation"] not in partial and r["turn"] > 0]
    assert any(r["context_ok"] for r in others)


def test_breakdowns_group_the_context_right_misses(docs):
    """VQA by question type and object count, edits by operation: a model that answers only colour questions
    wrongly misses exactly the colour group (a question's type is from data/shapes/text.py), and every group's
    n sums to the context-right n."""
    config = ChatEvalConfig(num_conversations=60, cfg=1.0, diffusion_steps=1, image_temperature=1.0)
    wrong_types = {"colour"}
    rows = play(Scripted(docs), docs, config, lambda _: None)
    for r in rows:  # mark the colour answers wrong, as a model blind to colour would be
        if r["kind"] == "vqa" and r["question_type"] in wrong_types:
            r["correct"] = 0.0
    out = summarise(rows)
    by_type = out["vqa"]["by_question_type"]
    assert "colour" in by_type and by_type["colour"]["accuracy"] == 0.0, by_type
    assert all(m["accuracy"] == 1.0 for t, m in by_type.items() if t not in wrong_types)
    for kind, keys in (("vqa", ("question_type", "objects")), ("edit", ("op", "objects"))):
        for key in keys:
            groups = out[kind][f"by_{key}"]
            assert sum(m["n"] for m in groups.values()) == out[kind]["context_right"]["n"], (kind, key)
    assert out["edit"]["by_op"] and set(out["edit"]["by_op"]) <= set(EDIT_OPS)
    assert all(1 <= int(k) <= 4 for k in out["vqa"]["by_objects"])


def test_the_model_sees_its_own_earlier_replies(docs):
    engine = Scripted(docs, wrong=True)
    config = ChatEvalConfig(num_conversations=60, cfg=1.0, diffusion_steps=1, image_temperature=1.0)
    play(engine, docs, config, lambda _: None)
    later = [p for p in engine.prompts if len(p.metadata["turns"]) > 1]
    assert later and all(p.metadata["turns"][1][0] == "assistant" for p in later)
    assert any(isinstance(part, Text) and part.text == "purple" for p in later for part in p.parts)


def test_image_replies_use_the_models_stated_sampling(docs):
    """Like `mixmodal chat` and the shapes suite, the replies sample as the model's generation.yaml says
    (the token recipe's plausibility, the latent recipe's guidance interval); the config's fields win."""
    engine = Scripted(docs)
    engine.image_sampling = {"cfg": 3.0, "plausibility": 0.1, "guidance_interval": [0.0, 0.8]}
    configs = []
    engine.generate = (lambda generate: lambda prompts, config, seed: configs.append(config) or
                       generate(prompts, config, seed))(engine.generate)
    play(engine, docs[:20], ChatEvalConfig(num_conversations=20, diffusion_steps=1), lambda _: None)
    images = [c for c in configs if c.mode != "text"]
    assert images and all(c.guidance.scale == 3.0 and c.guidance.plausibility == 0.1 and
                          c.guidance.interval == [0.0, 0.8] for c in images)
    configs.clear()
    play(engine, docs[:20], ChatEvalConfig(num_conversations=20, cfg=1.5, diffusion_steps=1), lambda _: None)
    assert all(c.guidance.scale == 1.5 for c in configs if c.mode != "text")
    configs.clear()
    engine.image_sampling = None  # a model that states nothing: the mode's defaults, no plausibility
    play(engine, docs[:20], ChatEvalConfig(num_conversations=20, diffusion_steps=1), lambda _: None)
    assert all(c.guidance.plausibility == 0.0 and c.guidance.interval is None for c in configs if c.mode != "text")


def test_edit_verdicts_separate_the_target_from_the_rest():
    star = ShapeObject("star", "red", "small", "top left")
    circle = ShapeObject("circle", "blue", "large", "center")
    before = Scene((star, circle))
    edit = Edit("recolour", star, ShapeObject("star", "green", "small", "top left"))
    assert score_edit(edit.apply(before), before, edit) == {"exact": 1.0, "target": 1.0, "kept": 1.0}
    assert score_edit(before, before, edit) == {"exact": 0.0, "target": 0.0, "kept": 1.0}  # nothing changed
    lost = Scene((edit.after,))
    assert score_edit(lost, before, edit) == {"exact": 0.0, "target": 1.0, "kept": 0.0}  # the circle went too
    remove = Edit("remove", circle, None)
    assert score_edit(Scene((star,)), before, remove)["exact"] == 1.0
    assert score_edit(Scene(()), before, remove)["target"] == 0.0  # an empty picture removed nothing
    one = Scene((star,))
    assert score_edit(edit.apply(one), one, edit)["kept"] is None  # nothing else to keep


def test_the_suite_runs_from_the_command_line(tmp_path):
    import json

    import torch

    from mixmodal.cli import main
    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.inference.engine import Engine
    from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
    from mixmodal.model.transformer import TransformerConfig
    from mixmodal.objectives.diffusion import DiffusionConfig
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
    from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
    from tiny import save_engine_folder

    torch.manual_seed(0)
    world = ShapesConfig(resolution=32, tasks=["chat"])
    text = TextTokenizer.train((t for d in ShapesSource(world, num=100) for t in d.texts), TextTokenizerConfig(vocab_size=300))
    vae = VAETokenizer(VAEConfig(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2], num_res_blocks=1,
                                 norm_groups=4, latent_channels=4))
    model = FusionModel(ModelConfig(text_vocab_size=text.vocab_size, transformer=TransformerConfig(dim=32, num_layers=2, num_heads=4),
                                    image=ImageConfig(mode="latents", latent_channels=4, grid_size=8, patch_size=2)))
    save_engine_folder(Engine(model, text, vae, diffusion=DiffusionConfig()), tmp_path / "model", chat_template="mixmodal")
    out = tmp_path / "eval"
    assert main([*f"eval {tmp_path / 'model'} --suite shapes-chat --out {out}".split(), "num_conversations=4",
                 "diffusion_steps=2", "chat_turns=2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["suite"] == "shapes-chat" and metrics["chat_template"] == "mixmodal"
    assert {"generate", "caption", "vqa", "edit", "multi_turn", "overall"} <= set(metrics)
    assert (out / "report.md").read_text().startswith("# shapes-chat")
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert replies and all({"conversation", "turn", "kind", "correct", "reply", "objects"} <= set(r) for r in replies)
    assert sum(r["kind"] == "vqa" for r in replies) == metrics["vqa"]["n"]
    assert all((out / r["image"]).is_file() for r in replies if r["image"])
