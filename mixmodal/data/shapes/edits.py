"""Edits: one change to one object of a scene (add, remove, recolour, move, reshape, resize).

Edits are data; `mixmodal.data.shapes.text` words them as instructions or story steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mixmodal.data.shapes.scene import COLOURS_ORDER, POSITIONS, SHAPES, Scene, ShapeObject, ShapesConfig
from mixmodal.data.shapes.splits import random_object

EDIT_OPS = ("add", "remove", "recolour", "move", "reshape", "resize")


@dataclass(frozen=True)
class Edit:
    op: str
    before: ShapeObject | None  # None for add
    after: ShapeObject | None  # None for remove

    def apply(self, scene: Scene) -> Scene:
        if self.before is None:
            return Scene(scene.objects + (self.after,), scene.background)
        if self.before not in scene.objects:
            raise ValueError(f"cannot {self.op} the {self.before.describe()} in the {self.before.position}: "
                             "the scene has no such object")
        return scene.replace_object(self.before, self.after)

    def to_dict(self) -> dict:
        return {"op": self.op,
                "before": None if self.before is None else self.before.to_dict(),
                "after": None if self.after is None else self.after.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "Edit":
        def obj(d):
            return None if d is None else ShapeObject.from_dict(d)
        return cls(data["op"], obj(data.get("before")), obj(data.get("after")))


def _other(rng: np.random.Generator, values: tuple[str, ...], current: str) -> str:
    choices = [v for v in values if v != current]
    return choices[rng.integers(len(choices))]


def random_edit(rng: np.random.Generator, scene: Scene, config: ShapesConfig) -> Edit:
    """A uniformly chosen feasible edit; the scene keeps min_objects..max_objects objects."""
    empty = [p for p in POSITIONS if p not in scene.cells]
    ops = [op for op in EDIT_OPS if not (
        (op == "add" and len(scene.objects) >= config.max_objects)
        or (op == "remove" and len(scene.objects) <= config.min_objects)
        or (op == "move" and not empty)
    )]
    op = ops[rng.integers(len(ops))]
    if op == "add":
        return Edit(op, None, random_object(rng, empty[rng.integers(len(empty))]))
    target = scene.objects[rng.integers(len(scene.objects))]
    if op == "remove":
        return Edit(op, target, None)
    if op == "recolour":
        return Edit(op, target, replace(target, colour=_other(rng, COLOURS_ORDER, target.colour)))
    if op == "move":
        return Edit(op, target, replace(target, position=empty[rng.integers(len(empty))]))
    if op == "reshape":
        return Edit(op, target, replace(target, shape=_other(rng, SHAPES, target.shape)))
    return Edit(op, target, replace(target, size="large" if target.size == "small" else "small"))
