"""Questions and answers, edit instructions and story steps about scenes (captions are in
captions.py). All seeded; every object is named so that it is unique in its scene.

    vqa      "Question: What colour is the star in the top left? Answer: red"
    edit     "Move the small red circle to the bottom right corner."
    story    "Then the blue square turns into a diamond."
"""

from __future__ import annotations

import numpy as np

from mixmodal.data.shapes.captions import SIZE_WORDS, destination, object_phrase, pick, where
from mixmodal.data.shapes.edits import Edit
from mixmodal.data.shapes.scene import COLOURS_ORDER, POSITIONS, SHAPES, SIZES, Scene, ShapeObject

QUESTION_TYPES = ("count", "colour", "shape", "size", "position", "exist")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "star": "stars", "cross": "crosses"}
# Attribute subsets that can name an object on their own, if no other object shares them.
_NAMINGS = (("shape",), ("colour",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))


def _noun(obj: ShapeObject, attributes: tuple[str, ...], rng: np.random.Generator) -> str:
    words = []
    if "size" in attributes:
        words.append(pick(rng, SIZE_WORDS[obj.size]))
    if "colour" in attributes:
        words.append(obj.colour)
    words.append(obj.shape if "shape" in attributes else "object")
    return "the " + " ".join(words)


def refer(obj: ShapeObject, scene: Scene, rng: np.random.Generator, avoid: tuple[str, ...] = ()) -> str | None:
    """A noun phrase naming `obj` uniquely in `scene` without the attributes in `avoid`
    ('the red circle', 'the object in the top left', ...); None when there is none."""
    options: list[tuple[tuple[str, ...], bool]] = []  # (attributes named, with the position)
    if "position" not in avoid:  # a cell holds one object, so naming it is always unique
        options += [(a, True) for a in ((), ("shape",), ("colour",), ("colour", "shape")) if not set(a) & set(avoid)]
    for attributes in _NAMINGS:
        same = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in attributes)]
        if not set(attributes) & set(avoid) and len(same) == 1:
            options.append((attributes, False))
    if not options:
        return None
    attributes, with_position = pick(rng, options)
    name = _noun(obj, attributes, rng)
    return f"{name} {where(obj.position, rng)}" if with_position else name


def _count_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    kind = pick(rng, ("all", "colour", "shape", "size"))
    if kind == "all":
        return pick(rng, ("How many objects are there?", "How many shapes are in the image?",
                          "How many objects can you see?")), str(len(scene.objects))
    present = rng.random() < 0.7  # mostly ask about something there; sometimes the answer is 0
    values = {"colour": COLOURS_ORDER, "shape": SHAPES, "size": SIZES}[kind]
    value = getattr(pick(rng, scene.objects), kind) if present else pick(rng, values)
    answer = str(sum(getattr(o, kind) == value for o in scene.objects))
    if kind == "shape":
        return pick(rng, (f"How many {PLURALS[value]} are there?", f"How many {PLURALS[value]} can you see?")), answer
    noun = pick(rng, ("objects", "shapes"))
    return pick(rng, (f"How many {value} {noun} are there?", f"How many {value} {noun} can you see?")), answer


def vqa(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, short answer, question type), the type drawn uniformly from QUESTION_TYPES."""
    kind = pick(rng, QUESTION_TYPES)
    obj = pick(rng, scene.objects)
    if kind == "count":
        return (*_count_question(scene, rng), kind)
    if kind == "exist":
        if rng.random() < 0.5:
            probe = pick(rng, POSITIONS)
            question = f"Is there anything {where(probe, rng)}?"
            return question, "yes" if probe in scene.cells else "no", kind
        shape, colour = (obj.shape, obj.colour) if rng.random() < 0.5 else (pick(rng, SHAPES), pick(rng, COLOURS_ORDER))
        present = any(o.shape == shape and o.colour == colour for o in scene.objects)
        question = pick(rng, (f"Is there a {colour} {shape}?", f"Is there a {colour} {shape} in the image?",
                              f"Can you see a {colour} {shape}?"))
        return question, "yes" if present else "no", kind
    name = refer(obj, scene, rng, avoid=(kind,))
    if name is None:  # only position questions can lack a name: identical objects elsewhere
        return (*_count_question(scene, rng), "count")
    if kind == "colour":
        question = pick(rng, (f"What colour is {name}?", f"What is the colour of {name}?", f"Which colour is {name}?"))
        return question, obj.colour, kind
    if kind == "shape":
        question = pick(rng, (f"What shape is {name}?", f"What is the shape of {name}?", f"Which shape is {name}?"))
        return question, obj.shape, kind
    if kind == "size":
        question = pick(rng, (f"Is {name} small or large?", f"What size is {name}?", f"Is {name} big or small?"))
        return question, obj.size, kind
    question = pick(rng, (f"Where is {name}?", f"Where is {name} located?", f"In which part of the image is {name}?"))
    return question, obj.position, kind


def instruction(edit: Edit, scene: Scene, rng: np.random.Generator) -> str:
    """An imperative instruction for `edit`, applied to `scene`."""
    if edit.op == "add":
        verb = pick(rng, ("Add", "Put", "Place", "Draw"))
        return f"{verb} {object_phrase(edit.after, 1, rng)} {where(edit.after.position, rng)}."
    name = refer(edit.before, scene, rng)
    after = edit.after
    if edit.op == "remove":
        return f"{pick(rng, ('Remove', 'Delete', 'Take away', 'Erase'))} {name}."
    if edit.op == "recolour":
        return pick(rng, (f"Make {name} {after.colour}.", f"Change the colour of {name} to {after.colour}.",
                          f"Paint {name} {after.colour}."))
    if edit.op == "move":
        return pick(rng, (f"Move {name} to {destination(after.position, rng)}.",
                          f"Shift {name} to {destination(after.position, rng)}.",
                          f"Put {name} {where(after.position, rng)} instead."))
    if edit.op == "reshape":
        return pick(rng, (f"Turn {name} into a {after.shape}.", f"Change {name} into a {after.shape}.",
                          f"Replace {name} with {object_phrase(after, 1, rng)}."))
    bigger = after.size == "large"
    return pick(rng, (f"Make {name} {'bigger' if bigger else 'smaller'}.",
                      f"{'Enlarge' if bigger else 'Shrink'} {name}.", f"Make {name} {after.size}."))


def story_step(edit: Edit, scene: Scene, rng: np.random.Generator, last: bool) -> str:
    """A narrative sentence for `edit` applied to `scene`, the current step of a story."""
    opener = "Finally," if last and rng.random() < 0.5 else pick(rng, ("Then", "Next,", "After that,", "Now"))
    after = edit.after
    if edit.op == "add":
        thing = object_phrase(after, 1, rng)
        clause = pick(rng, (f"{thing} appears {where(after.position, rng)}",
                            f"{thing} is added {where(after.position, rng)}"))
    else:
        name = refer(edit.before, scene, rng)
        clause = {
            "remove": lambda: pick(rng, (f"{name} disappears", f"{name} is removed", f"{name} vanishes")),
            "recolour": lambda: pick(rng, (f"{name} turns {after.colour}", f"{name} becomes {after.colour}")),
            "move": lambda: pick(rng, (f"{name} moves to {destination(after.position, rng)}",
                                       f"{name} slides to {destination(after.position, rng)}")),
            "reshape": lambda: pick(rng, (f"{name} turns into a {after.shape}", f"{name} becomes a {after.shape}")),
            "resize": lambda: pick(rng, (f"{name} {'grows' if after.size == 'large' else 'shrinks'}",
                                         f"{name} becomes {after.size}")),
        }[edit.op]()
    return f"{opener} {clause}."
