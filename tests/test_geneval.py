"""GenEval-form prompts and scoring on `shapes` (data/shapes/geneval.py, eval/shapes_suite.geneval):
each category scores a model that draws what it names 1 and one that breaks its rule 0, relations
follow GenEval's centre rule, partial training captions are true of their scenes, and the prompt
sets are fixed and keep held-out pairs where they belong."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage

from mixmodal.data.shapes import POSITIONS, Scene, ShapeObject, ShapesConfig, render, sample_scene, shapes_document
from mixmodal.data.shapes.geneval import (CATEGORIES, COMBO_CATEGORIES, Prompt, Thing, eval_prompt, image_things,
                                          judge, partial_caption, prompt_set, relative_position, scene_things)
from mixmodal.data.shapes.splits import HELDOUT_PAIRS
from mixmodal.documents import Document, Image
from mixmodal.eval.shapes_suite import ShapesEvalConfig, geneval

RES = 64
CELLS = {"left of": ("center left", "center"), "right of": ("center right", "center"),
         "above": ("top center", "center"), "below": ("bottom center", "center")}


def drawing(prompt: Prompt, extra_of_counted: bool = False, swap: bool = False, recolour: bool = False) -> Scene:
    """A scene that meets the prompt (or breaks it in one named way)."""
    free = list(POSITIONS)
    objects = []
    for k, req in enumerate(prompt.include):
        colour = req.colour or "orange"
        if recolour and req.colour:
            colour = "red" if req.colour != "red" else "blue"
        for _ in range(req.count + (1 if extra_of_counted and k == 0 else 0)):
            if req.relation is not None:
                subject, target = CELLS[req.relation]
                if swap:
                    subject, target = target, subject
                objects = [ShapeObject(o.shape, o.colour, o.size, target) for o in objects]
                cell = subject
            else:
                cell = free.pop(0) if prompt.category != "position" else "center"
            objects.append(ShapeObject(req.shape, colour, "large", cell))
    return Scene(tuple(objects))


class Painter:
    """A fake engine that renders drawing(prompt) for every prompt."""

    def __init__(self, **broken):
        self.per_image, self.mode, self.broken = 64, "tokens", broken
        self.prompts = {}

    def generate(self, prompts, config, seed=0):
        return [SimpleNamespace(document=Document([Image(render(drawing(self.prompts[p], **self.broken), RES))]))
                for p in prompts]


def _painter(which: str, **broken) -> Painter:
    painter = Painter(**broken)
    for category in (COMBO_CATEGORIES if which == "heldout-combos" else CATEGORIES):
        painter.prompts.update({p.text: p for p in prompt_set(category, which, 5)})
    return painter


SMALL = ShapesEvalConfig(geneval_prompts=5, images_per_prompt=1, batch_size=8)


@pytest.mark.parametrize("which", ["heldout", "heldout-combos"])
def test_a_model_that_draws_what_is_named_scores_1(which):
    m, samples = geneval(_painter(which), SMALL, which, lambda *_: None)
    assert m["overall"] == 1.0, {c: v["accuracy"] for c, v in m["categories"].items()}
    assert set(m["categories"]) == set(COMBO_CATEGORIES if which == "heldout-combos" else CATEGORIES)
    assert all(r["correct"] == 1.0 and not r["reasons"] for rows in samples.values() for r in rows)


def test_each_rule_can_fail():
    blank = SimpleNamespace(per_image=64, mode="tokens", generate=lambda prompts, config, seed=0: [
        SimpleNamespace(document=Document([Image(PILImage.new("RGB", (RES, RES)))])) for _ in prompts])
    m, samples = geneval(blank, SMALL, "heldout", lambda *_: None)
    assert m["overall"] == 0.0 and "found 0" in samples["single_object"][0]["reasons"][0]
    m, samples = geneval(_painter("heldout", extra_of_counted=True), SMALL, "heldout", lambda *_: None)
    assert m["categories"]["counting"]["accuracy"] == 0.0  # one more than the number: GenEval's exclude rule
    assert m["categories"]["single_object"]["accuracy"] == 1.0  # at least one: a second star is fine
    assert "expected" in samples["counting"][0]["reasons"][0]
    m, _ = geneval(_painter("heldout", swap=True), SMALL, "heldout", lambda *_: None)
    assert m["categories"]["position"]["accuracy"] == 0.0 and m["categories"]["two_object"]["accuracy"] == 1.0
    m, _ = geneval(_painter("heldout", recolour=True), SMALL, "heldout", lambda *_: None)
    assert m["categories"]["colors"]["accuracy"] == 0.0 and m["categories"]["color_attr"]["accuracy"] == 0.0
    assert m["categories"]["counting"]["accuracy"] == 1.0


def test_relative_position_is_genevals_centre_rule():
    a = Thing("star", "red", (1.5, 0.5), 0.85)
    b = Thing("circle", "blue", (1.5, 1.5), 0.85)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    diagonal = Thing("star", "red", (0.5, 0.5), 0.85)
    assert relative_position(diagonal, b) == {"left of", "above"}
    assert relative_position(Thing("star", "red", (1.5, 1.45), 0.85), b) == set()  # within 0.1 x the extents


def test_partial_captions_are_true_of_their_scene_and_of_its_render():
    config = ShapesConfig(resolution=RES)
    seen = set()
    for i in range(120):
        scene = sample_scene(config, "train", i)
        prompt = partial_caption(scene, np.random.default_rng(i))
        seen.add(prompt.category)
        assert judge(prompt, scene_things(scene))[0], prompt
        assert judge(prompt, image_things(render(scene, RES)))[0], prompt
        assert Prompt.from_dict(prompt.to_dict()) == prompt
    assert seen == set(CATEGORIES)


def test_exact_counts_name_each_shape_as_often_as_the_scene_holds_it():
    from collections import Counter

    config = ShapesConfig(resolution=32, tasks=["caption"], partial_captions=1.0, exact_counts=True)
    loose = ShapesConfig(resolution=32, tasks=["caption"], partial_captions=1.0)
    inexact = {True: 0, False: 0}
    for exact, world in ((True, config), (False, loose)):
        for i in range(300):
            doc = shapes_document(world, "train", i)
            prompt, scene = Prompt.from_dict(doc.metadata["prompt"]), doc.metadata["scenes"][0]
            counts = Counter(o["shape"] for o in scene["objects"])
            inexact[exact] += any(counts[r.shape] != r.count for r in prompt.include)
    assert inexact[True] == 0 and inexact[False] > 20  # "a diamond" of three diamonds, without the knob
    for i in range(60):  # and every exact caption is still true of its scene
        doc = shapes_document(config, "train", i)
        assert judge(Prompt.from_dict(doc.metadata["prompt"]), scene_things(Scene.from_dict(doc.metadata["scenes"][0])))[0]


def test_the_world_mixes_partial_captions_at_the_ratio_and_keeps_their_order():
    config = ShapesConfig(resolution=32, tasks=["caption"], partial_captions=0.3)
    docs = [shapes_document(config, "train", i) for i in range(200)]
    partial = [d for d in docs if "prompt" in d.metadata]
    assert 0.2 < len(partial) / len(docs) < 0.4
    assert all(d.metadata["keep_order"] and d.metadata["caption"] == d.texts[0] for d in partial)
    full = ShapesConfig(resolution=32, tasks=["caption"])
    assert all("prompt" not in shapes_document(full, "train", i).metadata for i in range(50))


def test_prompt_sets_are_fixed_and_combos_name_held_out_pairs():
    for category in CATEGORIES:
        assert prompt_set(category, "heldout", 6) == prompt_set(category, "heldout", 6)
        assert all(not (p.pairs & HELDOUT_PAIRS) for p in prompt_set(category, "heldout", 40))
        assert prompt_set(category, "validation", 6) != prompt_set(category, "heldout", 6) or category == "single_object"
    for category in COMBO_CATEGORIES:
        assert all(p.pairs & HELDOUT_PAIRS for p in prompt_set(category, "heldout-combos", 40))
    with pytest.raises(ValueError, match="no held-out-combination"):
        eval_prompt("counting", "heldout-combos", 0)
    assert eval_prompt("counting", "heldout", 0).exclude  # "no more than n"
