"""The built-in `shapes` world: procedural scenes, their renders and texts, and an oracle.

    from mixmodal.data.shapes import ShapesConfig, shapes_document, score
    doc = shapes_document(ShapesConfig(resolution=64), "train", 42)   # a pure function of its arguments
    score(generated_image, Scene.from_dict(doc.metadata["scenes"][0]))  # {"count": 1.0, ..., "overall": 1.0}

Modules: scene (vocabulary, Scene, ShapesConfig), splits (held-out pairs and buckets,
sampling), render, captions (captions and parse_caption), text (VQA, edit instructions,
story steps), edits, tasks (shapes_document), oracle (parse_image, score, degrade),
measure (`python -m mixmodal.data.shapes.measure`: the oracle's accuracy). See docs/shapes.md.
"""

from mixmodal.data.shapes.captions import CaptionParseError, caption, parse_caption
from mixmodal.data.shapes.edits import EDIT_OPS, Edit, random_edit
from mixmodal.data.shapes.oracle import Detection, degrade, detect, parse_image, score, score_scenes
from mixmodal.data.shapes.render import render, render_array
from mixmodal.data.shapes.scene import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    RESOLUTIONS,
    SHAPES,
    SIZES,
    SPLITS,
    TASKS,
    Scene,
    ShapeObject,
    ShapesConfig,
)
from mixmodal.data.shapes.splits import (
    HELDOUT_PAIRS,
    has_heldout_pair,
    sample_scene,
    scene_split,
    split_rng,
)
from mixmodal.data.shapes.tasks import document_id, shapes_document
from mixmodal.data.shapes.text import QUESTION_TYPES, instruction, refer, story_step, vqa

__all__ = [
    "BACKGROUNDS", "COLOURS", "EDIT_OPS", "HELDOUT_PAIRS", "POSITIONS", "QUESTION_TYPES", "RESOLUTIONS",
    "SHAPES", "SIZES", "SPLITS", "TASKS",
    "CaptionParseError", "Detection", "Edit", "Scene", "ShapeObject", "ShapesConfig",
    "caption", "degrade", "detect", "document_id", "has_heldout_pair", "instruction",
    "parse_caption", "parse_image", "random_edit", "refer", "render", "render_array", "sample_scene",
    "scene_split", "score", "score_scenes", "shapes_document", "split_rng", "story_step", "vqa",
]
