"""The vocabulary of the shapes world, its scene types and its config.

A scene is a background colour and 1-4 objects; each object has a shape, a colour, a
size and a cell of a 3x3 grid (at most one object per cell, so objects never overlap).
Scenes keep their objects in reading order (top left -> bottom right), so two scenes
with the same content compare equal and hash alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Object colours, 0-255 sRGB. Picked far apart and never collinear with a background
# (an anti-aliased edge is a mix of object and background colour, and must not look like
# another palette colour); checked in tests/test_shapes.py.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 30),
    "green": (30, 170, 60),
    "cyan": (0, 205, 225),
    "blue": (30, 70, 230),
    "purple": (140, 50, 200),
    "pink": (250, 135, 205),
}
COLOURS_ORDER = tuple(COLOURS)
# Backgrounds are never object colours, so an object can never vanish into its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
SIZES = ("small", "large")
# Bounding-box side of an object as a fraction of its grid cell. Large objects in adjacent
# cells keep a gap of 0.15 cell (3 px at 64 px), so a blur never bridges them.
SIZE_FRACTION = {"small": 0.5, "large": 0.85}
# Cell names in reading order; index = 3 * row + column.
POSITIONS = ("top left", "top center", "top right",
             "center left", "center", "center right",
             "bottom left", "bottom center", "bottom right")
CHAT_EXCHANGES = ("generate", "caption", "vqa", "edit", "story")  # what a chat task's exchange can be
TASKS = ("caption", "vqa", "edit", "story", "chat", "plan")  # chat: conversations (shapes/conversations.py)
PLAN_PREFIX = "Plan: "  # the plan task's second text: the full caption a GenEval-form prompt was drawn from
# GenEval's six prompt categories (shapes/geneval.py): the eval's, and the partial captions' forms
GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
DEFAULT_TASKS = ("caption", "vqa", "edit", "story")
# "all" ignores the held-out rules (every scene the config allows): for image tokenizers, which
# read no text, as real tokenizers are trained on broad image data. Never for a text+image model.
SPLITS = ("train", "heldout", "heldout-combos", "all")
RESOLUTIONS = (32, 48, 64, 128)
MAX_OBJECTS = 4


def _check(name: str, value: object, allowed: tuple | dict) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str  # a cell name from POSITIONS, e.g. "top left"

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, COLOURS)
        _check("size", self.size, SIZES)
        _check("position", self.position, POSITIONS)

    @property
    def cell(self) -> int:
        return POSITIONS.index(self.position)

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def column(self) -> int:
        return self.cell % 3

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.cell, SHAPES.index(self.shape), COLOURS_ORDER.index(self.colour), SIZES.index(self.size))

    def describe(self) -> str:
        """'small red circle' (no position)."""
        return f"{self.size} {self.colour} {self.shape}"

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}

    @classmethod
    def from_dict(cls, data: dict) -> "ShapeObject":
        missing = [k for k in ("shape", "colour", "size", "position") if k not in data]
        if missing:
            raise ValueError(f"object {data!r} lacks {', '.join(missing)}")
        return cls(data["shape"], data["colour"], data["size"], data["position"])


@dataclass(frozen=True)
class Scene:
    """Objects (kept in reading order) on a background.

    The constructor accepts any objects, including two in one cell: a parsed image may
    hold them. `problems()` lists what breaks the world's rules; sampled scenes have none.
    """

    objects: tuple[ShapeObject, ...]
    background: str = "black"

    def __post_init__(self) -> None:
        _check("background", self.background, BACKGROUNDS)
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.key)))

    def problems(self) -> list[str]:
        out = []
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            out.append(f"{len(self.objects)} objects; a scene holds 1 to {MAX_OBJECTS}")
        cells = [o.position for o in self.objects]
        out += [f"two objects in the {p} cell" for p in sorted(set(cells)) if cells.count(p) > 1]
        return out

    @property
    def cells(self) -> dict[str, ShapeObject]:
        return {o.position: o for o in self.objects}

    def replace_object(self, old: ShapeObject, new: ShapeObject | None) -> "Scene":
        """This scene with `old` swapped for `new` (or removed when `new` is None)."""
        objects = [o for o in self.objects if o != old] + ([new] if new is not None else [])
        return Scene(tuple(objects), self.background)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            raise ValueError(f'a scene dict needs "objects": a list of objects; got {data!r}')
        return cls(tuple(ShapeObject.from_dict(o) for o in data["objects"]), data.get("background", "black"))

    def canonical(self) -> str:
        """A canonical text form: equal scenes, equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def stable_hash(self) -> int:
        """A 64-bit hash of the canonical form that is the same in every process and version
        of Python (the builtin hash() of a str is salted per process)."""
        return int.from_bytes(hashlib.sha256(self.canonical().encode()).digest()[:8], "big")


def _default_tasks() -> list[str]:
    return list(DEFAULT_TASKS)


def _named_weights(key: str, entries: list, allowed: tuple[str, ...], noun: str, zero_ok: bool) -> dict[str, float]:
    """{'caption': 3.0, 'vqa': 1.0} from ["caption:3", "vqa"] (no weight: 1), in the order given; a ValueError
    naming `key` for an unknown name, a repeat, or a weight that is not a number, negative, or 0 (unless zero_ok)."""
    article = "an" if noun[0] in "aeiou" else "a"
    weights: dict[str, float] = {}
    for entry in entries:
        name, _, weight = str(entry).partition(":")
        name = name.strip()
        if name not in allowed:
            raise ValueError(f"{key}: {entry!r} is not {article} {noun}; allowed: {', '.join(allowed)} "
                             "(optionally 'name:weight')")
        if name in weights:
            raise ValueError(f"{key}: {name!r} is listed twice; give each {noun} once")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"{key}: weight of {entry!r} is not a number; write e.g. '{name}:2'") from None
        if zero_ok and not w >= 0:
            raise ValueError(f"{key}: weight of {entry!r} must be >= 0 (0 drops the {noun})")
        if not zero_ok and not w > 0:
            raise ValueError(f"{key}: weight of {entry!r} must be > 0; drop the {noun} to disable it")
        weights[name] = w
    return weights


def _optional_weights(key: str, entries: list, allowed: tuple[str, ...], noun: str) -> dict[str, float]:
    """Weights over every name in `allowed` from an optional 'name:weight' list (unlisted: 1; 0 drops one);
    {} for an empty list (the caller's uniform draw). A ValueError naming `key` for a string, a bad entry, or
    all weights 0."""
    if isinstance(entries, str):
        raise ValueError(f"{key} must be a list of 'name:weight'; got {entries!r}")
    if not entries:
        return {}
    weights = {**dict.fromkeys(allowed, 1.0), **_named_weights(key, entries, allowed, noun, zero_ok=True)}
    if not sum(weights.values()) > 0:
        raise ValueError(f"{key}: every weight is 0; keep at least one {noun}")
    return weights


@dataclass
class ShapesConfig:
    """Config of the shapes world. Splits and held-out pairs are fixed by the world, not here.

    `tasks` lists the document kinds to emit, each optionally weighted as "name:weight"
    (e.g. ["caption:3", "vqa"]; no weight means 1).
    """

    resolution: int = 64  # image side in pixels: 32, 48, 64 or 128 (48: 16 px cells, 2 x 2 f8 codes each)
    min_objects: int = 1
    max_objects: int = 4
    background: str = "black"  # black, white, gray, or "random" (uniform over those)
    tasks: list[str] = field(default_factory=_default_tasks)
    story_length: int = 3  # images per story document
    chat_turns: int = 3  # most user/assistant exchanges per conversation (the chat task)
    # Weights of the chat task's exchanges, "name:weight" over generate, caption, vqa, edit, story (unlisted: 1;
    # 0 drops one); [] draws them uniformly (the stream of earlier versions). Openings draw from all five,
    # follow-ups from caption, vqa and edit. E.g. ["edit:3", "vqa:2"] for an edit- and VQA-heavy SFT mix.
    chat_exchanges: list[str] = field(default_factory=list)
    # Share of caption documents whose text is a GenEval-form partial caption ("a photo of a red
    # star", data/shapes/geneval.py) instead of a full one; such documents keep caption-first order.
    partial_captions: float = 0.0
    # Share of VQA documents laid out picture first ([image] "Question: ..." "Answer: ..."), as a conversation asks:
    # the question then has to find its answer in a picture already read (docs/instruct.md, twentieth session:
    # question-first training leaves "where" questions after the picture at 0.6-0.8). 0 keeps every question first.
    vqa_after_image: float = 0.0
    # Share of scenes drawn with one shape repeated 2-4 times (colours and sizes still random), so
    # "three stars" is seen: uniform scenes hold 3+ of a shape in only ~3% of draws.
    repeat_shapes: float = 0.0
    # Partial captions name each of their shapes exactly as often as the scene holds it: "a star"
    # only of a scene with one star, "a star and a circle" of one star and one circle (English's
    # reading, and GenEval's for counting). Without it "a diamond" also captions a scene of three
    # diamonds, so p(caption | image) grows with every extra diamond and guidance draws more.
    exact_counts: bool = False
    # Weights of the GenEval-form categories a partial caption is drawn from, "name:weight" (unlisted: 1;
    # 0 drops one), e.g. ["position:3", "counting:3"] for a mix that leans on relations and counts (each
    # ~1/6 of partial captions by default). The weight orders the categories a caption tries; one the
    # scene does not allow (a relation in a one-object scene) passes to the next. [] keeps the uniform
    # order (the stream of earlier versions).
    partial_categories: list[str] = field(default_factory=list)
    seed: int = 0  # seeds the train stream; the held-out splits never depend on it

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}; got {self.resolution!r}")
        if not 1 <= self.min_objects <= MAX_OBJECTS:
            raise ValueError(f"min_objects must be between 1 and {MAX_OBJECTS}; got {self.min_objects!r}")
        if not self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"max_objects must be between min_objects ({self.min_objects}) and {MAX_OBJECTS} "
                f"(a scene holds at most 4 objects); got {self.max_objects!r}"
            )
        if self.background != "random" and self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)} or random; got {self.background!r}")
        if not 2 <= self.story_length <= 8:
            raise ValueError(f"story_length must be between 2 and 8 images; got {self.story_length!r}")
        if not 1 <= self.chat_turns <= 8:
            raise ValueError(f"chat_turns must be between 1 and 8 exchanges; got {self.chat_turns!r}")
        if not 0.0 <= self.partial_captions <= 1.0:
            raise ValueError(f"partial_captions must be a share in [0, 1]; got {self.partial_captions!r}")
        if not 0.0 <= self.vqa_after_image <= 1.0:
            raise ValueError(f"vqa_after_image must be a share in [0, 1]; got {self.vqa_after_image!r}")
        if not 0.0 <= self.repeat_shapes <= 1.0:
            raise ValueError(f"repeat_shapes must be a share in [0, 1]; got {self.repeat_shapes!r}")
        if self.repeat_shapes > 0 and self.max_objects < 2:
            raise ValueError(f"repeat_shapes needs max_objects >= 2 (a repeated shape is 2+ objects); "
                             f"got max_objects={self.max_objects}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {self.seed!r}")
        self.task_weights()  # raises on a bad entry
        self.exchange_weights()
        self.category_weights()

    def category_weights(self) -> dict[str, float]:
        """{'single_object': 1.0, ..., 'position': 3.0}: the partial captions' category weights from
        `partial_categories`; {} when none are given (a uniform order, as before the option existed)."""
        return _optional_weights("partial_categories", self.partial_categories, GENEVAL_CATEGORIES, "category")

    def exchange_weights(self) -> dict[str, float]:
        """{'generate': 1.0, ..., 'edit': 3.0}: the chat exchanges' weights from `chat_exchanges`; {} when none
        are given (uniform draws, as before the option existed)."""
        return _optional_weights("chat_exchanges", self.chat_exchanges, CHAT_EXCHANGES, "exchange")

    def task_weights(self) -> dict[str, float]:
        """{'caption': 3.0, 'vqa': 1.0}: parsed from `tasks`, in the order given."""
        if isinstance(self.tasks, str) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of {', '.join(TASKS)} (optionally 'name:weight'); "
                             f"got {self.tasks!r}")
        return _named_weights("tasks", self.tasks, TASKS, "task", zero_ok=False)
