"""Captions that fully determine their scene, and `parse_caption`, their exact inverse.

Three forms, all seeded, with synonyms, optional articles and random object order:

    object first    "Two small red circles in the top left and at the bottom, and a big blue
                     square in the center with a tiny green star directly above it."
    position first  "In the top left, there is a small red circle. At the bottom: a big blue
                     star. The background is white."
    list            "Shapes: small red circle (top left); two big blue stars (top center,
                     bottom center)."

Every object's shape, colour, size and cell is stated, either absolutely or as "directly
above/below/to the left of/to the right of it" relative to the single object named just
before it. The background is named when it is not black (and sometimes when it is).
`parse_caption` reads any caption of these forms back into the scene.
"""

from __future__ import annotations

import re

import numpy as np

from mixmodal.data.shapes.scene import POSITIONS, Scene, ShapeObject

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOUR_WORDS = {"red": ("red",), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",),
                "cyan": ("cyan",), "blue": ("blue",), "purple": ("purple", "violet"), "pink": ("pink",)}
SHAPE_WORDS = {  # (singular, plural) synonyms
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
}
BACKGROUND_WORDS = {"black": ("black",), "white": ("white",), "gray": ("gray", "grey")}
# Noun phrases naming a cell; the canonical bare names (POSITIONS) are accepted too.
POSITION_PHRASES = {
    "top left": ("the top left", "the top left corner", "the upper left", "the top-left corner"),
    "top center": ("the top center", "the top middle", "the top", "the upper middle"),
    "top right": ("the top right", "the top right corner", "the upper right", "the top-right corner"),
    "center left": ("the center left", "the middle left", "the left", "the left side"),
    "center": ("the center", "the middle", "the centre"),
    "center right": ("the center right", "the middle right", "the right", "the right side"),
    "bottom left": ("the bottom left", "the bottom left corner", "the lower left", "the bottom-left corner"),
    "bottom center": ("the bottom center", "the bottom middle", "the bottom", "the lower middle"),
    "bottom right": ("the bottom right", "the bottom right corner", "the lower right", "the bottom-right corner"),
}
# Bare sides read as directions after "move ... to", so edits never use them as destinations.
SIDE_PHRASES = frozenset({"the left", "the right", "the top", "the bottom", "the left side", "the right side"})
RELATIONS = {  # phrase -> (row offset, column offset) of the new object from the previous one
    **{f"{adverb} {word} it": (-1, 0) for adverb in ("directly", "just") for word in ("above",)},
    **{f"{adverb} {word} it": (1, 0) for adverb in ("directly", "just") for word in ("below", "beneath")},
    **{f"{adverb} to its left": (0, -1) for adverb in ("directly", "just", "immediately")},
    **{f"{adverb} to its right": (0, 1) for adverb in ("directly", "just", "immediately")},
}


class CaptionParseError(ValueError):
    """A caption that does not determine a scene; the message says what is missing."""


def pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def preposition(phrase: str, rng: np.random.Generator) -> str:
    if phrase in ("the left", "the right", "the left side", "the right side"):
        return "on"
    if phrase in ("the top", "the bottom"):
        return "at"
    return "in" if "middle" in phrase or "cent" in phrase else pick(rng, ("in", "at"))


def where(position: str, rng: np.random.Generator) -> str:
    """'in the top left', 'on the right', 'at the bottom', ..."""
    phrase = pick(rng, POSITION_PHRASES[position])
    return f"{preposition(phrase, rng)} {phrase}"


def destination(position: str, rng: np.random.Generator) -> str:
    """A cell as the object of 'to' ('the top left corner'), never a bare side."""
    return pick(rng, [p for p in POSITION_PHRASES[position] if p not in SIDE_PHRASES])


def object_phrase(obj: ShapeObject, count: int, rng: np.random.Generator, article: bool = True) -> str:
    """'a small red circle', 'two big blue stars', optionally without the article."""
    singular, plural = pick(rng, SHAPE_WORDS[obj.shape])
    words = f"{pick(rng, SIZE_WORDS[obj.size])} {pick(rng, COLOUR_WORDS[obj.colour])} "
    if count > 1:
        return f"{COUNT_WORDS[count]} {words}{plural}"
    determiner = pick(rng, ("a ", "a ", "one ")) if article else ""
    return f"{determiner}{words}{singular}"


def _groups(scene: Scene, rng: np.random.Generator) -> list[tuple[ShapeObject, list[str]]]:
    """Objects as (example object, positions) groups: identical objects grouped (most of the
    time), in reading order or shuffled."""
    groups: dict[tuple, tuple[ShapeObject, list[str]]] = {}
    together = rng.random() < 0.7
    for i, obj in enumerate(scene.objects):
        key = (obj.shape, obj.colour, obj.size) if together else i
        groups.setdefault(key, (obj, []))[1].append(obj.position)
    out = list(groups.values())
    if rng.random() < 0.5:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def _where_many(positions: list[str], rng: np.random.Generator) -> str:
    parts = [where(p, rng) for p in positions]
    if len(parts) == 1:
        return parts[0]
    if rng.random() < 0.3:
        return ", " + " and ".join(f"one {p}" for p in parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(previous: str, position: str) -> list[str]:
    (r0, c0), (r1, c1) = divmod(POSITIONS.index(previous), 3), divmod(POSITIONS.index(position), 3)
    return [phrase for phrase, offset in RELATIONS.items() if offset == (r1 - r0, c1 - c0)]


def _background_words(scene: Scene, rng: np.random.Generator) -> str | None:
    if scene.background == "black" and rng.random() < 0.7:
        return None  # black is the default a reader assumes
    return pick(rng, BACKGROUND_WORDS[scene.background])


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _object_first(scene: Scene, rng: np.random.Generator) -> str:
    groups = _groups(scene, rng)
    pieces = []
    for i, (obj, positions) in enumerate(groups):
        phrase = object_phrase(obj, len(positions), rng)
        relations = []
        if i > 0 and len(positions) == 1 and len(groups[i - 1][1]) == 1:
            relations = _relation(groups[i - 1][1][0], positions[0])
        if relations and rng.random() < 0.6:
            pieces.append((pick(rng, (" with ", ", and ", ", ")), f"{phrase} {pick(rng, relations)}"))
        else:
            last = i == len(groups) - 1 and i > 0
            sep = pick(rng, (" and ", ", and ")) if last else pick(rng, (", ", ", ", "; "))
            pieces.append((sep, f"{phrase} {_where_many(positions, rng)}".replace(" , ", ", ")))
    body = pieces[0][1] + "".join(sep + text for sep, text in pieces[1:])
    count = len(groups[0][1])
    prefix = pick(rng, ("", "", "an image of ", "a picture of ", "a drawing of ", "a scene with ",
                        "there is " if count == 1 else "there are "))
    text = prefix + body
    bg = _background_words(scene, rng)
    if bg is not None:
        text += pick(rng, (f" on a {bg} background", f", against a {bg} backdrop", f". The background is {bg}"))
    return _capitalise(text) + "."


def _position_first(scene: Scene, rng: np.random.Generator) -> str:
    sentences = []
    for obj, positions in _groups(scene, rng):
        phrase = object_phrase(obj, len(positions), rng)
        place = ", ".join(where(p, rng) for p in positions[:-1])
        place = (place + " and " if place else "") + where(positions[-1], rng)
        verb = pick(rng, ("there is", "we see", "you can see", "") if len(positions) == 1
                    else ("there are", "we see", "you can see", ""))
        form = pick(rng, ("{place}, {verb} {phrase}", "{place}: {phrase}", "{place} {be} {phrase}"))
        sentence = form.format(place=place, verb=verb, phrase=phrase, be="is" if len(positions) == 1 else "are")
        sentences.append(_capitalise(sentence.replace("  ", " ")) + ".")
    bg = _background_words(scene, rng)
    if bg is not None:
        sentence = pick(rng, (f"The background is {bg}.", f"{_capitalise(bg)} background."))
        sentences.insert(0 if rng.random() < 0.5 else len(sentences), sentence)
    return " ".join(sentences)


def _list_form(scene: Scene, rng: np.random.Generator) -> str:
    article = rng.random() < 0.5
    items = [f"{object_phrase(obj, len(positions), rng, article)} ({', '.join(positions)})"
             for obj, positions in _groups(scene, rng)]
    bg = _background_words(scene, rng)
    if bg is not None:
        items.append(f"background: {bg}")
    head = pick(rng, ("Objects", "Shapes", "Scene", "Contents"))
    return f"{head}: {pick(rng, ('; ', ', ')).join(items)}."


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption from which `parse_caption` recovers exactly `scene`."""
    u = rng.random()
    if u < 0.55:
        return _object_first(scene, rng)
    if u < 0.8:
        return _position_first(scene, rng)
    return _list_form(scene, rng)


# --- parsing ------------------------------------------------------------------------------

def _alternation(phrases) -> str:
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


def _lookup(table: dict) -> dict[str, str]:
    return {word: name for name, words in table.items() for word in words}


_SIZES, _COLOURS, _BACKGROUNDS = _lookup(SIZE_WORDS), _lookup(COLOUR_WORDS), _lookup(BACKGROUND_WORDS)
_SHAPES = {w: (name, i == 1) for name, forms in SHAPE_WORDS.items() for f in forms for i, w in enumerate(f)}
_POSITIONS = {**_lookup(POSITION_PHRASES), **{p: p for p in POSITIONS}}
_COUNTS = {"a": 1, "an": 1, **{w: n for n, w in COUNT_WORDS.items()}}
_GROUP = re.compile(rf"(?:({_alternation(_COUNTS)})\s+)?({_alternation(_SIZES)})\s+"
                    rf"({_alternation(_COLOURS)})\s+({_alternation(_SHAPES)})")
_BG = _alternation(_BACKGROUNDS)
_TOKENS = re.compile("|".join([
    rf"(?P<bg>\b(?:(?:{_BG})\s+(?:background|backdrop)|(?:background|backdrop)(?:\s+is|:)\s+(?:{_BG}))\b)",
    rf"(?P<rel>\b(?:{_alternation(RELATIONS)})\b)",
    rf"(?P<group>\b{_GROUP.pattern}\b)",
    rf"(?P<pos>\b(?:{_alternation(_POSITIONS)})\b)",
    r"(?P<brk>[.;])",
]))


def parse_caption(text: str) -> Scene:
    """The scene a caption describes. Raises CaptionParseError when it does not determine one."""
    background = "black"
    groups: list[dict] = []  # {"shape", "colour", "size", "count", "positions"}
    pending: list[str] = []  # positions that open a clause, before its object ("In the top left, ...")
    clause_has_group = False
    for m in _TOKENS.finditer(text.lower()):
        kind, token = m.lastgroup, m.group()
        if kind == "brk":
            clause_has_group, pending = False, []
        elif kind == "bg":
            background = _BACKGROUNDS[re.search(_BG, token).group()]
        elif kind == "pos":
            (groups[-1]["positions"] if clause_has_group else pending).append(_POSITIONS[token])
        elif kind == "group":
            count, size, colour, shape = _GROUP.fullmatch(token).groups()
            name, plural = _SHAPES[shape]
            groups.append({"shape": name, "colour": _COLOURS[colour], "size": _SIZES[size],
                           "count": _COUNTS[count] if count else (None if plural else 1),
                           "positions": pending, "where": m.start()})
            pending, clause_has_group = [], True
        else:  # a relation: the latest object sits next to the one named before it
            if len(groups) < 2 or len(groups[-2]["positions"]) != 1:
                raise CaptionParseError(f"{token!r} must follow two single objects, the first with a position")
            row, col = divmod(POSITIONS.index(groups[-2]["positions"][0]), 3)
            d_row, d_col = RELATIONS[token]
            if not (0 <= row + d_row < 3 and 0 <= col + d_col < 3):
                raise CaptionParseError(f"{token!r} points outside the 3x3 grid")
            groups[-1]["positions"].append(POSITIONS[3 * (row + d_row) + col + d_col])
    if not groups:
        raise CaptionParseError(f"no object (size colour shape, e.g. 'small red circle') in {text!r}")
    objects = []
    for g in groups:
        count = g["count"] if g["count"] is not None else len(g["positions"])
        if len(g["positions"]) != count:
            raise CaptionParseError(f"{count} {g['size']} {g['colour']} {g['shape']}(s) at character {g['where']} "
                                    f"but {len(g['positions'])} position(s): {g['positions']}")
        objects += [ShapeObject(g["shape"], g["colour"], g["size"], p) for p in g["positions"]]
    scene = Scene(tuple(objects), background)
    if scene.problems():
        raise CaptionParseError(f"the caption describes an impossible scene: {'; '.join(scene.problems())}")
    return scene
