"""Multi-turn conversations about scenes: instruction data for supervised fine-tuning (issue 20).

A conversation is 1..`chat_turns` exchanges (a user turn, then the assistant's) about one
evolving scene, the "current image":

    generate   user "Draw two blue stars on the left."            assistant [image]
    caption    user [image] "Describe the image."                 assistant "A big blue star ..."
    vqa        user [image] "How many stars are there?"           assistant "2"
    edit       user [image] "Make the circle green."              assistant [edited image]
    story      user "Tell a short story in 3 pictures."           assistant "A ... [image] Then ... [image] ..."

A conversation opens with any exchange; later ones (caption, vqa, edit) are about the current
image. The user shows it only when the assistant has not drawn it yet in this conversation (later turns refer back to it: "how many stars are there?" about the picture
the assistant drew two turns earlier tests multi-turn consistency). A generation request is
a GenEval-form partial caption ("a photo of a red star left of a circle") or a full caption.
Every scene of a train conversation is a train scene (data/shapes/splits.py), as in edits
and stories. Metadata `exchanges` lists each exchange's kind and what the oracle needs
to score it (the scene the assistant's image must show, the answer, the GenEval prompt).
"""

from __future__ import annotations

import numpy as np

from mixmodal.data.shapes.captions import caption, pick
from mixmodal.data.shapes.edits import Edit
from mixmodal.data.shapes.geneval import partial_caption
from mixmodal.data.shapes.scene import CHAT_EXCHANGES, Scene, ShapesConfig
from mixmodal.data.shapes.text import instruction, story_step, vqa

EXCHANGES = CHAT_EXCHANGES
FOLLOW_UPS = ("caption", "vqa", "edit")  # later exchanges are about the current image; generate and story open
DESCRIBE = ("Describe the image.", "What is in this picture?", "Describe this picture in detail.",
            "Write a caption for this image.")
DRAW = ("Draw {}.", "Make a picture of {}.", "Generate an image of {}.", "Show me {}.")  # + a partial caption
DRAW_SCENE = ("Draw this scene: {}", "Make a picture of this: {}", "Generate an image. {}")  # + a full caption
STORY = ("Tell a short story in {} pictures.", "Show a sequence of {} images and say what happens.")


def _request(scene: Scene, rng: np.random.Generator, exact: bool = False,
             weights: dict[str, float] | None = None) -> tuple[str, dict | None]:
    """A request to draw `scene` (or a GenEval-form part of it): (text, GenEval prompt or None)."""
    prompt = partial_caption(scene, rng, exact=exact, weights=weights) if rng.random() < 0.5 else None
    if prompt is not None:
        return pick(rng, DRAW).format(prompt.text.removeprefix("a photo of ").removeprefix("an image of ")), \
            prompt.to_dict()
    return pick(rng, DRAW_SCENE).format(caption(scene, rng)), None


def conversation(scene: Scene, rng: np.random.Generator, config: ShapesConfig, next_edit) -> tuple[list, list, dict]:
    """(layout, turns, metadata) of one conversation starting from `scene`. layout: str (text)
    or int (an image: its number in the document, indexing metadata["scenes"]); turns:
    [[role, number of layout items]]; `next_edit(scene) -> Edit` draws an edit allowed in the
    document's split. Exchanges name images by number: "image" is the one the user showed or
    the assistant drew, "before" the image an edit starts from."""
    layout: list = []
    turns: list[list] = []
    images: list[Scene] = []  # the scene of each image, in document order
    exchanges: list[dict] = []
    current, shown = scene, None  # the current scene, and the number of its image once one is in the text

    def image(s: Scene) -> int:
        images.append(s)
        return len(images) - 1

    def turn(role: str, items: list) -> None:
        layout.extend(items)
        turns.append([role, len(items)])

    weights = config.exchange_weights()
    for k in range(int(rng.integers(1, config.chat_turns + 1))):
        options = EXCHANGES if k == 0 else FOLLOW_UPS
        if weights:  # chat_exchanges: drawn by weight (no weights: the uniform draw of earlier versions)
            w = np.array([weights[o] for o in options])
            if not w.sum() > 0:  # every follow-up dropped: the conversation is its opening exchange
                break
            kind = options[int(rng.choice(len(options), p=w / w.sum()))]
        else:
            kind = pick(rng, options)
        if kind == "generate":
            text, prompt = _request(current, rng, config.exact_counts, config.category_weights())
            turn("user", [text])
            shown = image(current)
            turn("assistant", [shown])
            exchanges.append({"kind": kind, "image": shown, "prompt": prompt})
            continue
        if kind == "story":
            steps = config.story_length
            first = image(current)
            items: list = [caption(current, rng), first]
            for j in range(1, steps):
                edit = next_edit(current)
                items.append(story_step(edit, current, rng, last=j == steps - 1))
                current = edit.apply(current)
                items.append(image(current))
            turn("user", [pick(rng, STORY).format(steps)])
            turn("assistant", items)
            shown = items[-1]
            exchanges.append({"kind": kind, "images": [i for i in items if isinstance(i, int)]})
            continue
        show = []
        if shown is None:
            shown = image(current)
            show = [shown]
        if kind == "caption":
            turn("user", show + [pick(rng, DESCRIBE)])
            turn("assistant", [caption(current, rng)])
            exchanges.append({"kind": kind, "image": shown})
        elif kind == "vqa":
            question, answer, qtype = vqa(current, rng)
            turn("user", show + [question])
            turn("assistant", [answer])
            exchanges.append({"kind": kind, "image": shown, "answer": answer, "question_type": qtype})
        else:
            edit: Edit = next_edit(current)
            turn("user", show + [instruction(edit, current, rng)])
            before, current = shown, edit.apply(current)
            shown = image(current)
            turn("assistant", [shown])
            exchanges.append({"kind": kind, "before": before, "image": shown, "edit": edit.to_dict()})
    return layout, turns, {"exchanges": exchanges, "scenes": images}


__all__ = ["DESCRIBE", "DRAW", "DRAW_SCENE", "EXCHANGES", "FOLLOW_UPS", "STORY", "conversation"]
