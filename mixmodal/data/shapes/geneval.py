"""GenEval-form prompts on the shapes world, and their scoring (Ghosh et al. 2023, djghosh13/geneval).

GenEval scores a text-to-image model on short prompts that name only a few things, in six
categories; a prompt's image is right when an object detector finds what the prompt names:

    single_object  "a photo of a star"                    >= 1 star
    two_object     "a photo of a star and a circle"       >= 1 star and >= 1 circle
    counting       "a photo of three stars"               >= 3 stars and < 4 (exactly that many)
    colors         "a photo of a red star"                >= 1 star, and it is red
    position       "a photo of a star left of a circle"   a circle, and a star left of it
    color_attr     "a photo of a red star and a blue circle"

A prompt is a list of requirements (GenEval's `include`: shape, count, optional colour,
optional relation to an earlier requirement's objects) and exclusions (`exclude`: fewer
than n of a shape). Nothing the prompt does not name is checked: extra objects of other
shapes, sizes, cells and the background are free. Relations are judged on object centres
exactly as GenEval's `relative_position` does: the centre offset, shrunk on each axis by
0.1 x the two objects' summed extents, must point mostly (> 0.5 of the unit offset) in the
named direction; diagonal neighbours are both "left of" and "above".

One difference, because the oracle is not a detector: GenEval checks colour and position
on the detector's most confident `count` objects of a class; the oracle has no confidence
ranking, so a requirement is met when any `count` detected objects of the shape meet it.
The per-category accuracy is the mean over images; overall is the unweighted mean of the
categories (GenEval's definition).

The same prompt forms serve as training text (`partial_caption`): a prompt of a category
that is true of a scene, so "real captions under-specify" is part of the world.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixmodal.data.shapes.oracle import detect
from mixmodal.data.shapes.scene import COLOURS_ORDER, GENEVAL_CATEGORIES, SHAPES, SIZE_FRACTION, Scene
from mixmodal.data.shapes.splits import HELDOUT_PAIRS

CATEGORIES = GENEVAL_CATEGORIES
# GenEval's prompt counts per category (553 in all) and images per prompt.
GENEVAL_PROMPTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                   "color_attr": 100}
IMAGES_PER_PROMPT = 4
# Only the categories that name a colour can name a held-out shape-colour pair.
COMBO_CATEGORIES = ("colors", "color_attr")
PROMPT_SETS = ("heldout", "heldout-combos", "validation")
RELATIONS = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval's
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "star": "stars", "cross": "crosses"}
PREFIXES = ("a photo of ", "a photo of ", "an image of ", "a picture of ", "")  # training variety
_SEED = 0x6E4E_5A1  # the eval prompt sets' fixed stream


@dataclass(frozen=True)
class Requirement:
    """GenEval's `include` entry: at least `count` objects of `shape` (of `colour`, if named),
    each `relation` ("left of", ...) every object matched by requirement `target`."""

    shape: str
    count: int = 1
    colour: str | None = None
    relation: str | None = None
    target: int = 0

    def to_dict(self) -> dict:
        out: dict = {"shape": self.shape, "count": self.count}
        if self.colour is not None:
            out["colour"] = self.colour
        if self.relation is not None:
            out.update(relation=self.relation, target=self.target)
        return out


@dataclass(frozen=True)
class Prompt:
    category: str
    text: str
    include: tuple[Requirement, ...]
    exclude: tuple[tuple[str, int], ...] = ()  # (shape, n): fewer than n objects of that shape

    def to_dict(self) -> dict:
        return {"category": self.category, "text": self.text, "include": [r.to_dict() for r in self.include],
                "exclude": [list(e) for e in self.exclude]}

    @classmethod
    def from_dict(cls, data: dict) -> "Prompt":
        return cls(data["category"], data["text"], tuple(Requirement(**r) for r in data["include"]),
                   tuple((s, int(n)) for s, n in data.get("exclude", [])))

    @property
    def pairs(self) -> set[tuple[str, str]]:
        """The (shape, colour) pairs the prompt names."""
        return {(r.shape, r.colour) for r in self.include if r.colour is not None}


@dataclass(frozen=True)
class Thing:
    """An object as the judge sees it: shape, colour, centre (y, x) and extent, in any one unit."""

    shape: str
    colour: str
    centre: tuple[float, float]
    extent: float


# --- text ---------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(shape: str, count: int = 1, colour: str | None = None) -> str:
    """'a star', 'an orange star', 'three stars', 'two red stars'."""
    words = (f"{colour} " if colour else "") + (PLURALS[shape] if count > 1 else shape)
    return f"{COUNT_WORDS[count]} {words}" if count > 1 else f"{_article(words)} {words}"


def build(category: str, include: list[Requirement], prefix: str = "a photo of ") -> Prompt:
    """The prompt of a category from its requirements, in GenEval's wording."""
    if category == "position":
        target, subject = include
        body = f"{noun_phrase(subject.shape)} {subject.relation} {noun_phrase(target.shape)}"
    else:
        body = " and ".join(noun_phrase(r.shape, r.count, r.colour) for r in include)
    exclude = ((include[0].shape, include[0].count + 1),) if category == "counting" else ()
    return Prompt(category, prefix + body, tuple(include), exclude)


# --- judging ------------------------------------------------------------------------------------

def relative_position(a: Thing, b: Thing) -> set[str]:
    """GenEval's relations of A to B (object centres, shrunk by 0.1 x the summed extents)."""
    offset = np.array([a.centre[1] - b.centre[1], a.centre[0] - b.centre[0]])  # (dx, dy); y points down
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (a.extent + b.extent), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def judge(prompt: Prompt, things: list[Thing]) -> tuple[bool, list[str]]:
    """(correct, reasons) of the objects seen in an image against a prompt: GenEval's `evaluate`."""
    reasons: list[str] = []
    groups: list[list[Thing] | None] = []
    for req in prompt.include:
        of_shape = [t for t in things if t.shape == req.shape]
        found = [t for t in of_shape if req.colour is None or t.colour == req.colour]
        if len(of_shape) < req.count:
            reasons.append(f"expected {req.shape}>={req.count}, found {len(of_shape)}")
            groups.append(None)
            continue
        if len(found) < req.count:
            seen = ", ".join(sorted(t.colour for t in of_shape))
            reasons.append(f"expected {req.colour} {req.shape}>={req.count}, found {seen}")
            groups.append(None)
            continue
        if req.relation is not None:
            targets = groups[req.target]
            if targets is None:
                reasons.append(f"no target for {req.shape} to be {req.relation}")
                groups.append(None)
                continue
            found = [t for t in found if all(req.relation in relative_position(t, g) for g in targets)]
            if len(found) < req.count:
                reasons.append(f"expected {req.shape} {req.relation} {prompt.include[req.target].shape}, not so")
                groups.append(None)
                continue
        groups.append(found[:req.count])
    for shape, n in prompt.exclude:
        have = sum(t.shape == shape for t in things)
        if have >= n:
            reasons.append(f"expected {shape}<{n}, found {have}")
    return not reasons, reasons


def scene_things(scene: Scene) -> list[Thing]:
    """A scene's objects as the judge sees them (unit: one grid cell)."""
    return [Thing(o.shape, o.colour, (o.row + 0.5, o.column + 0.5), SIZE_FRACTION[o.size]) for o in scene.objects]


def image_things(image) -> list[Thing]:
    """What the oracle sees in an image (unit: pixels)."""
    _, detections = detect(image)
    return [Thing(d.object.shape, d.object.colour, d.centre, d.extent) for d in detections]


def score_image(image, prompt: Prompt) -> dict:
    """{'correct': 0.0 | 1.0, 'reasons': [...]} of one generated image."""
    ok, reasons = judge(prompt, image_things(image))
    return {"correct": float(ok), "reasons": reasons}


# --- prompts true of a scene: training text ------------------------------------------------------

def partial_caption(scene: Scene, rng: np.random.Generator, category: str | None = None,
                    exact: bool = False, weights: dict[str, float] | None = None) -> Prompt | None:
    """A GenEval-form prompt that is true of `scene` (judge(prompt, scene_things(scene)) holds), of
    `category` or of a random one the scene allows; None when the scene allows none of them.
    exact: the prompt names each of its shapes as many times as the scene holds it ("a star": one
    star; counting prompts always do). weights: {category: weight} (ShapesConfig.category_weights):
    the categories are tried in an order drawn by weight, those of weight 0 never; None or {}: uniform."""
    if category:
        categories = [category]
    elif weights:
        live = [c for c in CATEGORIES if weights.get(c, 1.0) > 0]
        w = np.array([weights.get(c, 1.0) for c in live])
        categories = [live[i] for i in rng.choice(len(live), size=len(live), replace=False, p=w / w.sum())]
    else:
        categories = [CATEGORIES[i] for i in rng.permutation(len(CATEGORIES))]
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    for cat in categories:
        include = _describe(scene, cat, rng, exact)
        if include is not None:
            return build(cat, include, prefix)
    return None


def _describe(scene: Scene, category: str, rng: np.random.Generator,
              exact: bool = False) -> list[Requirement] | None:
    objects = list(scene.objects)
    order = [objects[i] for i in rng.permutation(len(objects))]
    counts = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    if exact and category != "counting":  # only shapes the scene holds once may be named as "a <shape>"
        order = [o for o in order if counts[o.shape] == 1]
    if category in ("single_object", "colors"):
        if not order:
            return None
        o = order[0]
        return [Requirement(o.shape, colour=o.colour if category == "colors" else None)]
    if category == "counting":
        many = [s for s in SHAPES if counts[s] >= 2]
        if not many:
            return None
        shape = many[rng.integers(len(many))]
        return [Requirement(shape, counts[shape])]
    distinct = [(a, b) for a in order for b in order if a.shape != b.shape]
    if not distinct:
        return None
    if category in ("two_object", "color_attr"):
        a, b = distinct[0]
        colour = category == "color_attr"
        return [Requirement(a.shape, colour=a.colour if colour else None),
                Requirement(b.shape, colour=b.colour if colour else None)]
    things = scene_things(scene)
    for a, b in distinct:  # "a {a} {rel} a {b}": true for every b of its shape? judge() decides
        relations = sorted(relative_position(things[objects.index(a)], things[objects.index(b)]))
        for rel in [relations[i] for i in rng.permutation(len(relations))]:
            include = [Requirement(b.shape), Requirement(a.shape, relation=rel, target=0)]
            if judge(build("position", include), things)[0]:
                return include
    return None


# --- the fixed eval prompt sets -----------------------------------------------------------------

@dataclass
class _Draw:
    rng: np.random.Generator
    combos: bool

    def shapes(self, k: int) -> list[str]:
        return [SHAPES[i] for i in self.rng.choice(len(SHAPES), size=k, replace=False)]

    def colour(self, shape: str, heldout: bool) -> str:
        options = [c for c in COLOURS_ORDER if ((shape, c) in HELDOUT_PAIRS) == heldout]
        return options[self.rng.integers(len(options))]


def eval_prompt(category: str, prompt_set: str, index: int) -> Prompt:
    """Prompt `index` of a category's fixed set: a pure function of its arguments.

    heldout / validation: only shape-colour pairs seen in training (two disjoint random
    streams; a validation prompt may share its text with a test prompt where the category
    has few distinct prompts, e.g. 6 single objects). heldout-combos (colors, color_attr):
    every prompt names a held-out pair (color_attr: its first object)."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {', '.join(CATEGORIES)}; got {category!r}")
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"prompt set must be one of {', '.join(PROMPT_SETS)}; got {prompt_set!r}")
    if prompt_set == "heldout-combos" and category not in COMBO_CATEGORIES:
        raise ValueError(f"{category} names no colour, so it has no held-out-combination prompts "
                         f"(only {', '.join(COMBO_CATEGORIES)} do)")
    rng = np.random.default_rng([_SEED, CATEGORIES.index(category), PROMPT_SETS.index(prompt_set), int(index)])
    draw = _Draw(rng, prompt_set == "heldout-combos")
    if category == "single_object":
        return build(category, [Requirement(draw.shapes(1)[0])])
    if category == "two_object":
        a, b = draw.shapes(2)
        return build(category, [Requirement(a), Requirement(b)])
    if category == "counting":
        return build(category, [Requirement(draw.shapes(1)[0], int(rng.integers(2, 5)))])
    if category == "colors":
        shape = draw.shapes(1)[0] if not draw.combos else sorted(HELDOUT_PAIRS)[rng.integers(len(HELDOUT_PAIRS))][0]
        return build(category, [Requirement(shape, colour=draw.colour(shape, draw.combos))])
    if category == "position":
        a, b = draw.shapes(2)
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        return build(category, [Requirement(b), Requirement(a, relation=rel, target=0)])
    if draw.combos:  # color_attr with a held-out pair first
        first = sorted(HELDOUT_PAIRS)[rng.integers(len(HELDOUT_PAIRS))][0]
        second = [s for s in SHAPES if s != first][rng.integers(len(SHAPES) - 1)]
        a, b = first, second
        return build(category, [Requirement(a, colour=draw.colour(a, True)), Requirement(b, colour=draw.colour(b, False))])
    a, b = draw.shapes(2)
    return build(category, [Requirement(a, colour=draw.colour(a, False)), Requirement(b, colour=draw.colour(b, False))])


def prompt_set(category: str, which: str, n: int) -> list[Prompt]:
    return [eval_prompt(category, which, i) for i in range(n)]


def categories_of(which: str) -> tuple[str, ...]:
    return COMBO_CATEGORIES if which == "heldout-combos" else CATEGORIES


__all__ = ["CATEGORIES", "COMBO_CATEGORIES", "GENEVAL_PROMPTS", "IMAGES_PER_PROMPT", "PROMPT_SETS", "Prompt",
           "RELATIONS", "Requirement", "Thing", "build", "categories_of", "eval_prompt", "image_things", "judge",
           "noun_phrase", "partial_caption", "prompt_set", "relative_position", "scene_things", "score_image"]
