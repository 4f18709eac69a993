"""The built-in shapes world: config, splits, rendering, texts and documents."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from mixmodal.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    TASKS,
    CaptionParseError,
    Edit,
    Scene,
    ShapeObject,
    ShapesConfig,
    caption,
    has_heldout_pair,
    parse_caption,
    refer,
    render,
    render_array,
    sample_scene,
    scene_split,
    shapes_document,
)
from mixmodal.data.shapes.geneval import Prompt, judge, scene_things
from mixmodal.data.shapes.scene import GENEVAL_CATEGORIES
from mixmodal.data.shapes.splits import HELDOUT_BUCKETS, in_heldout_bucket, random_scene
from mixmodal.data.sources import open_source
from mixmodal.documents import Image, Text


def _scene(*objects: tuple[str, str, str, str], background: str = "black") -> Scene:
    return Scene(tuple(ShapeObject(*o) for o in objects), background)


def _layout(doc) -> str:
    return "".join("T" if isinstance(p, Text) else "I" for p in doc.parts)


# --- config --------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("resolution", 50, "resolution must be one of 32, 48, 64, 128"),
    ("min_objects", 0, "min_objects must be between 1 and 4"),
    ("max_objects", 5, "max_objects must be between"),
    ("background", "teal", "background must be one of black, white, gray or random"),
    ("tasks", ["captions"], "'captions' is not a task; allowed: caption, vqa, edit, story, chat, plan"),
    ("tasks", ["caption:x"], "weight of 'caption:x' is not a number"),
    ("tasks", ["caption", "caption:2"], "listed twice"),
    ("tasks", [], "tasks must be a non-empty list"),
    ("story_length", 1, "story_length must be between 2 and 8"),
    ("seed", -1, "seed must be a non-negative integer"),
    ("repeat_shapes", 1.5, "repeat_shapes must be a share in"),
    ("partial_categories", ["relations:2"], "'relations:2' is not a category; allowed: single_object"),
    ("partial_categories", ["position:-1"], "must be >= 0"),
    ("partial_categories", "position:3", "must be a list"),
])
def test_config_errors_name_the_field_and_the_allowed_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        ShapesConfig(**{field: value})
    config = ShapesConfig()
    setattr(config, field, value)  # changed after construction: documents re-check it
    with pytest.raises(ValueError, match=message):
        shapes_document(config, "train", 0)


def test_task_weights():
    assert ShapesConfig().task_weights() == {t: 1.0 for t in TASKS if t not in ("chat", "plan")}  # asked for by name
    assert ShapesConfig(tasks=["caption:3", "vqa"]).task_weights() == {"caption": 3.0, "vqa": 1.0}
    tasks = Counter(shapes_document(ShapesConfig(tasks=["caption:3", "vqa"]), "train", i).metadata["task"]
                    for i in range(400))
    assert set(tasks) == {"caption", "vqa"} and 2.2 < tasks["caption"] / tasks["vqa"] < 4.2


# --- scenes ---------------------------------------------------------------------------------

def test_scene_is_canonical_and_round_trips_through_json():
    a = _scene(("star", "red", "small", "center"), ("circle", "blue", "large", "top left"))
    b = _scene(("circle", "blue", "large", "top left"), ("star", "red", "small", "center"))
    assert a == b and a.canonical() == b.canonical() and a.stable_hash() == b.stable_hash()
    assert [o.position for o in a.objects] == ["top left", "center"]  # reading order
    assert Scene.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert a != _scene(("star", "red", "large", "center"), ("circle", "blue", "large", "top left"))
    assert _scene(("star", "red", "small", "center"), ("circle", "blue", "large", "center")).problems()
    with pytest.raises(ValueError, match="colour must be one of"):
        ShapeObject("star", "teal", "small", "center")
    with pytest.raises(ValueError, match="position must be one of"):
        Scene.from_dict({"objects": [{"shape": "star", "colour": "red", "size": "small", "position": "middle"}]})


def test_palette_edges_never_look_like_another_colour():
    """An anti-aliased edge is background + a * (colour - background); the segment of each
    colour must stay far from every other colour's segment, or edges would be misread."""
    for background in BACKGROUNDS.values():
        b = np.array(background) / 255
        for c1, c2 in itertools.permutations(COLOURS.values(), 2):
            e1, e2 = np.array(c1) / 255 - b, np.array(c2) / 255 - b
            a = np.clip(e1 @ e2 / (e2 @ e2), 0, 1)
            assert np.linalg.norm(e1 - a * e2) > 0.18, (background, c1, c2)
        assert min(np.linalg.norm(np.array(c) / 255 - b) for c in COLOURS.values()) > 0.4


# --- splits ---------------------------------------------------------------------------------

def test_heldout_pairs_leave_every_shape_and_colour_in_training():
    assert {s for s, _ in HELDOUT_PAIRS} == set(SHAPES)  # one held-out colour per shape
    assert len({c for _, c in HELDOUT_PAIRS}) == len(HELDOUT_PAIRS)  # no colour held out twice
    config = ShapesConfig(background="random")
    scenes = [sample_scene(config, "train", i) for i in range(1500)]
    seen = {(o.shape, o.colour) for s in scenes for o in s.objects}
    assert seen == set(itertools.product(SHAPES, COLOURS)) - HELDOUT_PAIRS
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert Counter(len(s.objects) for s in scenes).keys() == {1, 2, 3, 4}


def test_splits_are_disjoint_and_follow_their_rules():
    config = ShapesConfig(max_objects=2)  # few objects: many repeated scenes, so overlaps would show
    train = [sample_scene(config, "train", i) for i in range(3000)]
    heldout = [sample_scene(config, "heldout", i) for i in range(600)]
    combos = [sample_scene(config, "heldout-combos", i) for i in range(300)]
    assert not any(has_heldout_pair(s) or in_heldout_bucket(s) for s in train)
    assert all(in_heldout_bucket(s) and not has_heldout_pair(s) for s in heldout)
    assert all(has_heldout_pair(s) for s in combos)
    assert not {s.canonical() for s in train} & {s.canonical() for s in heldout}
    assert len({s.canonical() for s in train}) < len(train)  # the check above had repeats to find
    assert [scene_split(s) for s in heldout[:50]] == ["heldout"] * 50
    rng = np.random.default_rng(0)
    unsplit = [random_scene(rng, ShapesConfig()) for _ in range(4000)]
    share = sum(in_heldout_bucket(s) for s in unsplit) / len(unsplit)
    assert abs(share - 1 / HELDOUT_BUCKETS) < 0.015  # held-out scenes are a small, hash-chosen share


def test_partial_categories_weight_the_captions_forms_and_leave_the_default_stream_alone():
    """partial_categories draws the partial captions' GenEval-form category by weight (0 drops one, a form the
    scene does not allow passes to the next); [] is the uniform order of earlier versions (the same documents)."""
    def categories(config, n=600):
        docs = [shapes_document(config, "train", i) for i in range(n)]
        return Counter(d.metadata["prompt"]["category"] for d in docs if "prompt" in d.metadata), docs

    base = ShapesConfig(resolution=32, tasks=["caption"], partial_captions=1.0)
    plain, plain_docs = categories(base)
    same, same_docs = categories(ShapesConfig(**{**base.__dict__, "partial_categories": []}))
    assert same == plain and [d.texts for d in same_docs] == [d.texts for d in plain_docs]
    heavy, heavy_docs = categories(ShapesConfig(**{**base.__dict__, "partial_categories": ["position:4", "counting:0"]}))
    assert heavy["counting"] == 0 < plain["counting"]
    assert heavy["position"] > 2 * plain["position"]
    for d in heavy_docs:  # still true of the scene drawn
        if "prompt" in d.metadata:
            prompt = Prompt.from_dict(d.metadata["prompt"])
            assert judge(prompt, scene_things(Scene.from_dict(d.metadata["scenes"][0])))[0], prompt.text
    spec = open_source("shapes:split=train,num=10,tasks=caption,partial_captions=1,partial_categories=position:4+counting:0")
    assert spec.config.partial_categories == ["position:4", "counting:0"]
    with pytest.raises(ValueError, match="every weight is 0"):
        ShapesConfig(partial_categories=[f"{c}:0" for c in GENEVAL_CATEGORIES])


def test_vqa_after_image_puts_a_share_of_questions_after_the_picture_and_leaves_the_default_stream_alone():
    """vqa_after_image: that share of VQA documents is [image] "Question: Q" "Answer: A" (marked after_image), the
    same question and answer as the question-first layout; 0 draws nothing (the documents of earlier versions)."""
    from mixmodal.documents import Image, Text

    base = ShapesConfig(resolution=32, tasks=["vqa"])
    plain = [shapes_document(base, "train", i) for i in range(200)]
    same = [shapes_document(ShapesConfig(**{**base.__dict__, "vqa_after_image": 0.0}), "train", i) for i in range(200)]
    assert [d.texts for d in same] == [d.texts for d in plain]
    assert all(isinstance(d.parts[1], Image) and "after_image" not in d.metadata for d in plain)
    half = [shapes_document(ShapesConfig(**{**base.__dict__, "vqa_after_image": 0.5}), "train", i) for i in range(200)]
    after = [d for d in half if d.metadata.get("after_image")]
    assert 60 < len(after) < 140
    for d in after:
        assert isinstance(d.parts[0], Image) and [type(p) for p in d.parts[1:]] == [Text, Text]
        assert d.metadata["keep_order"]  # the pipeline's caption-first reordering leaves it as it is
        assert d.texts == [f"Question: {d.metadata['question']}", f"Answer: {d.metadata['answer']}"]
    assert all(isinstance(d.parts[1], Image) for d in half if not d.metadata.get("after_image"))
    assert open_source("shapes:split=train,num=4,tasks=vqa,vqa_after_image=1").config.vqa_after_image == 1.0
    with pytest.raises(ValueError, match="vqa_after_image must be a share"):
        ShapesConfig(vqa_after_image=1.5)


def test_repeat_shapes_draws_counts_of_three_and_four_and_keeps_the_rules():
    def most_of_one_shape(config, n=2000):
        return Counter(max(Counter(o.shape for o in sample_scene(config, "train", i).objects).values())
                       for i in range(n))

    plain, repeated = most_of_one_shape(ShapesConfig()), most_of_one_shape(ShapesConfig(repeat_shapes=0.3))
    assert plain[3] + plain[4] < 0.05 * 2000  # uniform scenes: 3+ of a shape is rare
    assert repeated[3] > 2 * plain[3] and repeated[4] > 0.05 * 2000  # ~0.3 x 1/3 of scenes hold four
    assert plain == most_of_one_shape(ShapesConfig(repeat_shapes=0.0))  # off: the draws are unchanged
    config = ShapesConfig(repeat_shapes=1.0, max_objects=3)
    for i in range(200):
        scene = sample_scene(config, "train", i)
        assert not scene.problems() and scene_split(scene) == "train"
        assert 2 <= max(Counter(o.shape for o in scene.objects).values()) <= 3
    with pytest.raises(ValueError, match="repeat_shapes needs max_objects >= 2"):
        ShapesConfig(repeat_shapes=0.5, max_objects=1)


def test_split_all_ignores_the_heldout_rules_for_image_tokenizers():
    config = ShapesConfig()
    splits = Counter(scene_split(sample_scene(config, "all", i)) for i in range(1000))
    assert set(splits) == {"train", "heldout", "heldout-combos"}  # every kind of scene, by its share
    assert 0.15 < splits["heldout-combos"] / 1000 < 0.45
    assert [sample_scene(config, "all", i) for i in range(5)] != [sample_scene(config, "train", i) for i in range(5)]
    assert sample_scene(ShapesConfig(seed=1), "all", 0) != sample_scene(config, "all", 0)  # seeded like train


def test_training_documents_never_show_a_heldout_scene():
    """Edits and stories add scenes after the first; in train every one of them is a train scene."""
    config = ShapesConfig(tasks=["edit", "story"], story_length=4)
    for i in range(300):
        for scene in shapes_document(config, "train", i).metadata["scenes"]:
            assert scene_split(Scene.from_dict(scene)) == "train"


def test_heldout_content_does_not_depend_on_the_seed():
    a, b = ShapesConfig(seed=0), ShapesConfig(seed=12345)
    for split in ("heldout", "heldout-combos"):
        for i in range(10):
            da, db = shapes_document(a, split, i), shapes_document(b, split, i)
            assert da.texts == db.texts and da.metadata == db.metadata
            assert all(np.array_equal(x, y) for x, y in zip(da.images, db.images))
    assert [sample_scene(a, "train", i) for i in range(10)] != [sample_scene(b, "train", i) for i in range(10)]


# --- documents ------------------------------------------------------------------------------

def test_documents_are_a_pure_function_of_config_split_index():
    config = ShapesConfig()
    later = shapes_document(config, "train", 7)  # built first, without building 0..6
    docs = [shapes_document(config, "train", i) for i in range(8)]
    again = docs[7]
    assert later.id == again.id == "shapes-train-000007"
    assert later.texts == again.texts and later.metadata == again.metadata
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(later.images, again.images))
    assert len({(tuple(d.texts), json.dumps(d.metadata["scenes"])) for d in docs}) == len(docs)
    assert shapes_document(config, "heldout-combos", 3).id == "shapes-heldout-combos-000003"
    with pytest.raises(ValueError, match="split must be one of train, heldout, heldout-combos"):
        shapes_document(config, "test", 0)
    with pytest.raises(ValueError, match="index must be a non-negative integer"):
        shapes_document(config, "train", -1)


@pytest.mark.parametrize("resolution", [32, 48, 64, 128])
def test_images_have_the_configured_resolution(resolution):
    doc = shapes_document(ShapesConfig(resolution=resolution, tasks=["edit"]), "train", 0)
    assert [im.size for im in doc.images] == [(resolution, resolution)] * 2
    assert all(im.mode == "RGB" for im in doc.images)


@pytest.mark.parametrize("task, layout", [("caption", "TI"), ("vqa", "TIT"), ("edit", "ITI"), ("story", "TITITITI")])
def test_each_task_has_its_layout_and_metadata(task, layout):
    config = ShapesConfig(tasks=[task], story_length=4, background="random")
    for i in range(25):
        doc = shapes_document(config, "heldout", i)
        meta = doc.metadata
        assert _layout(doc) == layout
        assert meta["task"] == task and meta["split"] == "heldout" and meta["index"] == i
        assert json.loads(json.dumps(meta)) == meta  # JSON-able: it goes into JSONL
        scenes = [Scene.from_dict(s) for s in meta["scenes"]]
        assert scenes[0] == sample_scene(config, "heldout", i)
        assert len(scenes) == doc.num_images
        for part, scene in zip((p for p in doc.parts if isinstance(p, Image)), scenes):
            assert np.array_equal(np.asarray(part.image), render_array(scene, config.resolution))
            assert part.origin.startswith(doc.id)
        if task == "caption":
            assert parse_caption(doc.texts[0]) == scenes[0] == parse_caption(meta["caption"])
        elif task == "vqa":
            assert doc.texts == [f"Question: {meta['question']}", f"Answer: {meta['answer']}"]
            assert [type(p).__name__ for p in doc.parts] == ["Text", "Image", "Text"]
            _check_answer(scenes[0], meta["question_type"], meta["answer"])
        elif task == "edit":
            assert Edit.from_dict(meta["edit"]).apply(scenes[0]) == scenes[1] != scenes[0]
            assert doc.texts[0] == meta["instruction"]
        else:
            assert parse_caption(doc.texts[0]) == scenes[0]
            assert doc.texts == meta["steps"] and len(meta["edits"]) == 3
            for before, edit, after in zip(scenes, meta["edits"], scenes[1:]):
                assert Edit.from_dict(edit).apply(before) == after
        for scene in scenes:
            assert not scene.problems()


def _check_answer(scene: Scene, kind: str, answer: str) -> None:
    if kind == "count":
        assert answer.isdigit() and int(answer) <= len(scene.objects)
    elif kind == "exist":
        assert answer in ("yes", "no")
    elif kind in ("colour", "shape", "size", "position"):
        assert answer in {getattr(o, kind) for o in scene.objects}
    else:
        raise AssertionError(f"unknown question type {kind}")


def test_vqa_answers_are_right():
    config = ShapesConfig(tasks=["vqa"])
    kinds = Counter()
    for i in range(300):
        meta = shapes_document(config, "train", i).metadata
        scene, q, a = Scene.from_dict(meta["scenes"][0]), meta["question"], meta["answer"]
        kinds[meta["question_type"]] += 1
        if q == "How many objects are there?":
            assert a == str(len(scene.objects))
        for colour in COLOURS:
            if q == f"How many {colour} objects are there?":
                assert a == str(sum(o.colour == colour for o in scene.objects))
        if q.startswith("Is there anything in the center?"):
            assert a == ("yes" if "center" in scene.cells else "no")
        if meta["question_type"] == "position":
            assert any(o.position == a and (o.shape in q or o.colour in q) for o in scene.objects)
    assert set(kinds) == {"count", "colour", "shape", "size", "position", "exist"}


def test_references_name_one_object():
    scene = _scene(("circle", "red", "small", "top left"), ("circle", "red", "small", "center"),
                   ("star", "blue", "large", "bottom right"))
    rng = np.random.default_rng(0)
    assert refer(scene.objects[0], scene, rng, avoid=("position",)) is None  # its twin shares every attribute
    names = {refer(scene.objects[2], scene, rng) for _ in range(100)}
    assert "the star" in names and "the blue object" in names and "the large blue star" in names
    assert all("red" not in n and "circle" not in n for n in names)
    twins = {refer(scene.objects[0], scene, rng) for _ in range(100)}
    assert all("left" in n and ("top" in n or "upper" in n) for n in twins)


# --- captions -------------------------------------------------------------------------------

def test_captions_determine_their_scene():
    rng = np.random.default_rng(0)
    configs = [ShapesConfig(background="random", seed=s) for s in range(2)]
    forms = Counter()
    for i in range(1000):
        scene = sample_scene(configs[i % 2], "train", i)
        text = caption(scene, rng)
        assert parse_caption(text) == scene, text
        forms["list" if ":" in text.split(" ")[0] else "relation" if " it" in text or "its " in text else "other"] += 1
    assert forms["list"] > 50 and forms["relation"] > 20  # every form is exercised


def test_captions_vary():
    scene = _scene(("circle", "red", "small", "top left"), ("circle", "red", "small", "center"),
                   ("square", "blue", "large", "bottom right"))
    rng = np.random.default_rng(1)
    texts = {caption(scene, rng) for _ in range(200)}
    assert len(texts) > 150
    assert any(t.lower().startswith("two ") or " two " in t for t in texts)  # identical objects grouped
    assert all(parse_caption(t) == scene for t in texts)


@pytest.mark.parametrize("text, message", [
    ("A beautiful sunset.", "no object"),
    ("Two small red circles in the top left.", "2 small red circle"),
    ("A small red circle in the top left and a big blue star in the top left.", "two objects in the top left"),
    ("A small red circle directly above it.", "must follow two single objects"),
    ("A small red circle at the top, a big blue star directly above it.", "outside the 3x3 grid"),
])
def test_parse_caption_rejects_captions_that_do_not_determine_a_scene(text, message):
    with pytest.raises(CaptionParseError, match=message):
        parse_caption(text)


def test_parse_caption_reads_hand_written_captions():
    assert parse_caption("Two small red circles, one in the top left and one at the bottom, "
                         "and a big violet plus sign in the center, on a grey background.") == _scene(
        ("circle", "red", "small", "top left"), ("circle", "red", "small", "bottom center"),
        ("cross", "purple", "large", "center"), background="gray")
    text = "In the middle, there is a tiny yellow star. A big green rhombus directly below it."
    assert parse_caption(text) == _scene(("star", "yellow", "small", "center"),
                                         ("diamond", "green", "large", "bottom center"))


# --- rendering ------------------------------------------------------------------------------

def test_render_is_deterministic_and_anti_aliased():
    scene = _scene(("circle", "red", "large", "center"), ("triangle", "cyan", "small", "top left"), background="white")
    pixels = render_array(scene, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, render_array(scene, 64))
    assert np.array_equal(np.asarray(render(scene, 64)), pixels)
    assert tuple(pixels[32, 32]) == COLOURS["red"]  # the centre of the centre cell
    assert tuple(pixels[0, 0]) == BACKGROUNDS["white"]
    colours = {tuple(p) for p in pixels.reshape(-1, 3)}
    assert len(colours) > 10  # edges are mixes, not a hard two-colour step
    with pytest.raises(ValueError, match="resolution must be one of"):
        render_array(scene, 50)


def test_shapes_differ_and_sizes_differ():
    masks = {}
    for shape in SHAPES:
        for size in ("small", "large"):
            pixels = render_array(_scene((shape, "red", size, "center")), 64)
            masks[shape, size] = pixels[..., 0].astype(float) / 230
    for a, b in itertools.combinations(masks, 2):
        assert np.abs(masks[a] - masks[b]).sum() > 8, (a, b)  # distinct shapes, at least 8 px apart
    for shape in SHAPES:
        assert masks[shape, "large"].sum() > 2.5 * masks[shape, "small"].sum()


def test_rendering_is_fast():
    import time

    scenes = [sample_scene(ShapesConfig(), "train", i) for i in range(300)]
    started = time.perf_counter()
    for scene in scenes:
        render_array(scene, 64)
    assert time.perf_counter() - started < 3.0  # ~0.2 ms each on a laptop core; generous for CI


def test_positions_follow_the_grid():
    for cell, position in enumerate(POSITIONS):
        pixels = render_array(_scene(("square", "green", "small", position)), 64)
        ys, xs = np.nonzero(pixels[..., 1] > 100)
        row, column = divmod(cell, 3)
        assert int(ys.mean() // (64 / 3)) == row and int(xs.mean() // (64 / 3)) == column


def test_plan_documents_hold_a_true_prompt_its_full_caption_and_the_image():
    config = ShapesConfig(resolution=32, tasks=["plan"])
    for i in range(40):
        doc = shapes_document(config, "train", i)
        assert _layout(doc) == "TTI" and doc.metadata["keep_order"]
        scene = Scene.from_dict(doc.metadata["scenes"][0])
        prompt_text, plan = doc.texts
        assert plan.startswith("Plan: ") and parse_caption(plan.removeprefix("Plan: ")) == scene
        if "prompt" in doc.metadata:
            prompt = Prompt.from_dict(doc.metadata["prompt"])
            assert prompt.text == prompt_text and judge(prompt, scene_things(scene))[0]
