"""`shapes_document(config, split, index)`: document `index` of a split, as a pure function.

Any consumer can build document `index` without building the others (the data loader
shards by index). Each document draws, from its own stream (`splits.split_rng`), first its
scene (so its first scene is `sample_scene(config, split, index)`), then its task from
`config.tasks`, then its text and any later scenes. Layouts (T = text, I = image):

    caption  T I          the caption, then the image it describes; a share
                          `partial_captions` of them say only part of it, in GenEval's
                          forms ("a photo of a red star"; geneval.py), and are marked
                          `keep_order` (a prompt, never a caption to write)
    vqa      T I T        "Question: ...", the image, "Answer: ..." (the question first: after a bare
                          image the world only ever continues with a caption, so an image alone
                          prompts a caption, and the question says what to look for); a share
                          `vqa_after_image` of them I T T, the question after the picture, as
                          a conversation asks it (marked `after_image`)
    plan     T T I        a GenEval-form partial caption, "Plan: " + a full caption of the scene, the
                          image: a prompt, the scene the model means to draw for it, and the drawing
                          (the eval's `plan` sampling writes the plan, then draws; eval/shapes_tasks.py)
    edit     I T I        before, instruction, after
    story    T I (T I)*   caption of the first scene, then one change per later image
    chat     a conversation of 1..chat_turns exchanges (conversations.py), with `turns`

`metadata`: source, task, split, index, resolution, and `scenes` (one scene dict per
image, in image order), plus per task: caption; question, answer, question_type;
instruction, edit; steps, edits; turns, exchanges. A partial caption adds `prompt` (its GenEval
requirements).
"""

from __future__ import annotations

import numpy as np

from mixmodal.data.shapes.captions import caption
from mixmodal.data.shapes.edits import Edit, random_edit
from mixmodal.data.shapes.geneval import partial_caption
from mixmodal.data.shapes.conversations import conversation
from mixmodal.data.shapes.render import render
from mixmodal.data.shapes.scene import PLAN_PREFIX, Scene, ShapesConfig
from mixmodal.data.shapes.splits import MAX_TRIES, allowed_later, draw_scene, split_rng
from mixmodal.data.shapes.text import instruction, story_step, vqa
from mixmodal.documents import Document, Image, Text


def document_id(split: str, index: int) -> str:
    return f"shapes-{split}-{index:06d}"


def _next_edit(rng: np.random.Generator, scene: Scene, config: ShapesConfig, split: str) -> Edit:
    for _ in range(MAX_TRIES):
        edit = random_edit(rng, scene, config)
        if allowed_later(edit.apply(scene), split):
            return edit
    raise RuntimeError(f"no {split} edit of {scene.canonical()} in {MAX_TRIES} draws; this is a bug")


def shapes_document(config: ShapesConfig, split: str, index: int) -> Document:
    """Document `index` of `split` ("train", "heldout" or "heldout-combos")."""
    config.validate()  # the config may have been changed field by field since it was built
    rng = split_rng(config, split, index)
    scene = draw_scene(rng, config, split)
    weights = config.task_weights()
    names = list(weights)
    p = np.array([weights[n] for n in names]) / sum(weights.values())
    task = names[int(rng.choice(len(names), p=p))]
    doc_id = document_id(split, int(index))
    scenes = [scene]
    meta: dict = {}
    if task == "caption":
        prompt = None
        if config.partial_captions > 0 and rng.random() < config.partial_captions:
            prompt = partial_caption(scene, rng, exact=config.exact_counts, weights=config.category_weights())
        text = prompt.text if prompt is not None else caption(scene, rng)
        layout: list = [text, 0]
        meta["caption"] = text
        if prompt is not None:
            meta.update(prompt=prompt.to_dict(), keep_order=True)
    elif task == "plan":
        prompt = partial_caption(scene, rng, exact=config.exact_counts, weights=config.category_weights())
        text = caption(scene, rng)
        layout = [prompt.text if prompt is not None else text, PLAN_PREFIX + text, 0]
        meta.update(caption=text, keep_order=True)
        if prompt is not None:
            meta["prompt"] = prompt.to_dict()
    elif task == "vqa":
        question, answer, kind = vqa(scene, rng)
        layout = [f"Question: {question}", 0, f"Answer: {answer}"]
        if config.vqa_after_image > 0 and rng.random() < config.vqa_after_image:  # (no draw at 0: the old stream)
            layout = [0, f"Question: {question}", f"Answer: {answer}"]
            meta.update(after_image=True, keep_order=True)
        meta.update(question=question, answer=answer, question_type=kind)
    elif task == "edit":
        edit = _next_edit(rng, scene, config, split)
        text = instruction(edit, scene, rng)
        scenes.append(edit.apply(scene))
        layout = [0, text, 1]
        meta.update(instruction=text, edit=edit.to_dict())
    elif task == "chat":
        layout, turns, chat = conversation(scene, rng, config, lambda s: _next_edit(rng, s, config, split))
        scenes = chat.pop("scenes")
        meta.update(turns=turns, **chat)
    else:
        steps, edits = [caption(scene, rng)], []
        for k in range(1, config.story_length):
            edit = _next_edit(rng, scenes[-1], config, split)
            steps.append(story_step(edit, scenes[-1], rng, last=k == config.story_length - 1))
            scenes.append(edit.apply(scenes[-1]))
            edits.append(edit.to_dict())
        layout = [part for k, step in enumerate(steps) for part in (step, k)]
        meta.update(steps=steps, edits=edits)
    parts = [Text(item) if isinstance(item, str)
             else Image(render(scenes[item], config.resolution), origin=f"{doc_id}#image{item}")
             for item in layout]
    metadata = {"source": "shapes", "task": task, "split": split, "index": int(index),
                "resolution": config.resolution, "scenes": [s.to_dict() for s in scenes], **meta}
    return Document(parts, metadata, doc_id)
