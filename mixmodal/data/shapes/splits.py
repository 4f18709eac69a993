"""Fixed splits and scene sampling.

Every scene belongs to exactly one split, decided by the scene alone (`scene_split`):

- `heldout-combos`: it holds at least one HELDOUT_PAIRS shape-colour pair. These pairs
  never occur in train, so this split measures compositional generalisation.
- `heldout`: no held-out pair, and its canonical hash falls in the held-out bucket (1 in
  HELDOUT_BUCKETS): unseen scenes made of seen parts.
- `train`: everything else.
- `all` (not a split of its own): any scene, ignoring the rules above; for image tokenizers
  only, which read no text (a VQ codebook cannot write a shape-colour pair it never saw).

A split is sampled by rejection from one random stream per document. The held-out splits
use a fixed stream seed (HELDOUT_SEED), so their content is the same whatever the config
seed; the train stream is seeded by `ShapesConfig.seed`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mixmodal.data.shapes.scene import (
    BACKGROUNDS,
    COLOURS_ORDER,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    ShapeObject,
    ShapesConfig,
)

# One colour held out per shape, each colour at most once, so every shape and every colour
# still appears in training (with the other shapes / colours).
HELDOUT_PAIRS = frozenset({
    ("circle", "green"),
    ("square", "pink"),
    ("triangle", "blue"),
    ("diamond", "yellow"),
    ("star", "red"),
    ("cross", "cyan"),
})
HELDOUT_BUCKETS = 20  # 1 in 20 scene hashes is held out (5% of the scene space)
HELDOUT_SEED = 0x5EED_4E1D  # fixed: held-out content must not move with the config seed
MAX_TRIES = 10_000  # rejection sampling; the rarest case (1 object, heldout) needs ~20 on average


def has_heldout_pair(scene: Scene) -> bool:
    return any((o.shape, o.colour) in HELDOUT_PAIRS for o in scene.objects)


def in_heldout_bucket(scene: Scene) -> bool:
    return scene.stable_hash() % HELDOUT_BUCKETS == 0


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to: train, heldout or heldout-combos."""
    if has_heldout_pair(scene):
        return "heldout-combos"
    return "heldout" if in_heldout_bucket(scene) else "train"


def allowed_later(scene: Scene, split: str) -> bool:
    """May `scene` follow the first scene of a `split` document (the after-image of an
    edit, a later story step)? In train every scene must be a train scene, so nothing
    held out ever leaks into training; held-out documents only keep their kind of pair."""
    if split == "all":
        return True
    if split == "train":
        return scene_split(scene) == "train"
    if split == "heldout":
        return not has_heldout_pair(scene)
    return True


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")


def split_rng(config: ShapesConfig, split: str, index: int) -> np.random.Generator:
    """The random stream of document `index` of `split`: a pure function of its arguments."""
    check_split(split)
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative integer; got {index!r}")
    base = config.seed if split in ("train", "all") else HELDOUT_SEED
    return np.random.default_rng(np.random.SeedSequence([base, SPLITS.index(split), int(index)]))


def random_object(rng: np.random.Generator, position: str) -> ShapeObject:
    return ShapeObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=COLOURS_ORDER[rng.integers(len(COLOURS_ORDER))],
        size=SIZES[rng.integers(len(SIZES))],
        position=position,
    )


def random_scene(rng: np.random.Generator, config: ShapesConfig) -> Scene:
    """Any scene the config allows, ignoring splits. With `repeat_shapes`, that share of scenes
    holds one shape 2-4 times (the count uniform over what max_objects allows); the draws of a
    config without it are unchanged."""
    repeat = config.repeat_shapes > 0 and rng.random() < config.repeat_shapes
    if repeat:
        count = int(rng.integers(2, config.max_objects + 1))
        num = int(rng.integers(max(count, config.min_objects), config.max_objects + 1))
    else:
        num = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=num, replace=False)
    background = config.background
    if background == "random":
        background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    objects = [random_object(rng, POSITIONS[c]) for c in cells]
    if repeat:
        shape = SHAPES[rng.integers(len(SHAPES))]
        objects = [replace(o, shape=shape) if k < count else o for k, o in enumerate(objects)]
    return Scene(tuple(objects), background)


def draw_scene(rng: np.random.Generator, config: ShapesConfig, split: str) -> Scene:
    """A scene of `split`, by rejection from `rng`."""
    check_split(split)
    for _ in range(MAX_TRIES):
        scene = random_scene(rng, config)
        if split == "all" or scene_split(scene) == split:
            return scene
    raise RuntimeError(f"no {split} scene in {MAX_TRIES} draws; this is a bug in the shapes world")


def sample_scene(config: ShapesConfig, split: str, index: int) -> Scene:
    """The first scene of document `index` of `split` (documents draw it first)."""
    return draw_scene(split_rng(config, split, index), config, split)
