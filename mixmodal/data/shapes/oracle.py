"""The oracle: parse any image back into a scene, and score an image against a prompt scene.

`parse_image(image)` works on rendered, reconstructed and generated images of any size:

1. Background: the palette background nearest to the median of the border pixels (or
   the one given). Pixels are then "unmixed": for each object colour c, a pixel p is
   read as background + alpha * (c - background); its colour is the c that explains it
   best and alpha is how much of it there is. An anti-aliased or blurred edge is exactly
   such a mix, so edges keep their object's colour instead of looking like a darker one.
2. Objects: connected foreground regions (alpha >= 0.5). A region's core is its more
   opaque half; inside it, every colour that owns a compact patch becomes an object (noise
   scatters single mis-coloured pixels; a second object is a blob), and the region's other
   pixels go to the nearest core. An object's colour is then the one that best explains
   the mean of its core. Background pixels within SUPPORT_MARGIN px count towards the
   nearest object (its blurred edge). A blob far heavier than any object that spreads over
   several cells (two same-colour objects touching) is cut along the grid; a detection
   fainter than any object that fits no shape (JPEG ringing, a stray blot) is dropped.
3. Shape and size: the object's alpha map, cropped around its centroid, is compared (L1)
   with the renderer's own coverage masks of every shape x size, drawn with their
   centroid at the same sub-pixel phase (no resampling, which would blur the data), at a
   few blur levels (one per image, the level that fits all its objects best) and at
   +-12% scale (a generated object is rarely exactly to scale; off-scale masks must fit
   clearly better to win).
4. Position: the cell holding the object's centre (the centroid minus the matched
   template's centroid offset, which matters for triangles and stars).

Two detections may share a cell: the parsed scene says what was seen, and then differs
from any valid scene.

`score(image, scene)` compares the parsed scene with the prompt scene, GenEval-style:

- count: 1.0 iff as many objects were detected as the prompt has.
- colour, shape, size, position: fraction of the prompt's objects whose matched detection
  has that attribute right. Detections are matched one-to-one to prompt objects so as
  to maximise the number of agreeing attributes (Hungarian algorithm; ties go to the
  detection in the prompt object's cell), so one misplaced object costs position only,
  not also its colour, shape and size. Unmatched prompt objects score 0; extra
  detections lower only `count` (and `overall`).
- background: 1.0 iff the detected background is the prompt's.
- overall: 1.0 iff the parsed scene equals the prompt scene exactly, else 0.0.

How well the oracle does on clean and degraded renders: mixmodal/data/shapes/measure.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import PIL.Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from mixmodal.data.shapes.render import coverage
from mixmodal.data.shapes.scene import (BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZE_FRACTION, SIZES,
                                        Scene, ShapeObject)

BLUR_LEVELS = (0.0, 0.6, 1.0, 1.5)  # template blurs (pixels), from crisp renders to blurry decodes
SCALES = (0.88, 1.0, 1.12)  # each size is also matched 12% smaller and larger
SCALE_PENALTY = 0.3  # off-scale distances count 30% more, so crisp renders keep their exact scale
PHASES = (0.0, 0.25, 0.5, 0.75)  # sub-pixel centroid positions the templates are drawn at
FOREGROUND_ALPHA = 0.5
CORE_ALPHA = 0.8  # the core is the more opaque half of a region, never stricter than this
SUPPORT_MARGIN = 3  # pixels around an object's region that still count towards its shape (blurred edges)
_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float64) / 255  # (K, 3)
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class _Bank:
    """Template masks at one resolution. Template t at phase (fy, fx) has its centroid at
    (side/2 + fy, side/2 + fx) of the patch, so a data patch cropped at integer pixels
    around a centroid is compared without resampling (which would blur it)."""

    side: int  # patch side P in pixels (even)
    labels: tuple[tuple[str, str], ...]  # (shape, size) of each template
    templates: np.ndarray  # (F, F, B, T, P*P) coverage per phase y, phase x, blur level, template
    offsets: np.ndarray  # (T, 2) centroid minus box centre (y, x), pixels
    penalty: np.ndarray  # (T,) distance factor: off-scale templates must fit clearly better
    min_mass: float  # mass (summed coverage) of the lightest object as rendered, a small star
    max_mass: float  # of the heaviest, a large square


@functools.lru_cache(maxsize=8)
def _bank(resolution: int) -> _Bank:
    cell = resolution / 3
    # The farthest point of an object from its centroid is 0.57 cell (a large triangle's base corners).
    side = 2 * math.ceil(0.6 * cell * max(SCALES) + 3 * BLUR_LEVELS[-1])
    centre = side / 2
    grid = np.arange(side) + 0.5  # pixel centres
    labels, offsets, penalty, masks, masses = [], [], [], [], []  # masks: (T, F, F, P, P)
    for shape in SHAPES:
        for size in SIZES:
            for scale in SCALES:
                half = SIZE_FRACTION[size] * cell / 2 * scale
                box = _canvas(shape, centre, centre, half, side)
                dy = (box.sum(1) @ grid) / box.sum() - centre
                dx = (box.sum(0) @ grid) / box.sum() - centre
                labels.append((shape, size))
                offsets.append((dy, dx))
                penalty.append(1.0 if scale == 1.0 else 1.0 + SCALE_PENALTY)
                masks.append([[_canvas(shape, centre + fx - dx, centre + fy - dy, half, side) for fx in PHASES]
                              for fy in PHASES])
                if scale == 1.0:
                    masses.append(box.sum())
    masks = np.array(masks, dtype=np.float32).transpose(1, 2, 0, 3, 4)  # (F, F, T, P, P)
    blurred = np.stack([masks if s == 0 else ndimage.gaussian_filter(masks, (0, 0, 0, s, s)) for s in BLUR_LEVELS],
                       axis=2)  # (F, F, B, T, P, P)
    return _Bank(side, tuple(labels), blurred.reshape(*blurred.shape[:4], -1),
                 np.array(offsets), np.array(penalty), float(min(masses)), float(max(masses)))


def _canvas(shape: str, cx: float, cy: float, half: float, side: int) -> np.ndarray:
    out = np.zeros((side, side))
    top, left, window = coverage(shape, cx, cy, half, side, side)
    out[top:top + window.shape[0], left:left + window.shape[1]] = window
    return out


def _as_float(image) -> np.ndarray:
    """PIL image or (H, W, 3) array (uint8, or float in [0, 1]) -> square (S, S, 3) float in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        hint = "; it looks channels-first: transpose it to (H, W, 3)" if array.ndim == 3 and array.shape[0] == 3 else ""
        raise ValueError(f"expected an RGB image of shape (H, W, 3); got an array of shape {array.shape}{hint}")
    if array.dtype != np.uint8 and array.size and float(array.max()) > 1.5:
        raise ValueError(f"a float image must hold values in [0, 1]; got values up to {float(array.max()):.1f} "
                         "(pass uint8, or divide by 255)")
    if array.shape[0] != array.shape[1]:  # the grid is defined on a square canvas
        side = max(array.shape[:2])
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)
        array = np.asarray(PIL.Image.fromarray(array).resize((side, side), PIL.Image.BILINEAR))
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def _background(pixels: np.ndarray, given: str | None) -> tuple[str, np.ndarray]:
    """(name, reference colour (3,)) of the background."""
    if given is not None:
        if given not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)} or None (detect); got {given!r}")
        return given, np.array(BACKGROUNDS[given], dtype=np.float64) / 255
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    measured = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    palette = np.array([BACKGROUNDS[n] for n in names], dtype=np.float64) / 255
    name = names[int(np.linalg.norm(palette - measured, axis=1).argmin())]
    return name, measured  # unmix against what is there: a decoder may shift the background a little


def _unmix(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel (..., 3): the best-explaining colour index (...), its alpha (...), and
    the alpha of every colour (..., K)."""
    d = pixels - background  # (..., 3)
    e = _COLOUR_RGB - background  # (K, 3)
    dot = d @ e.T  # (..., K)
    norm = (e * e).sum(1)  # (K,)
    alpha = np.clip(dot / norm, 0.0, 1.0)  # (..., K)
    residual = (d * d).sum(-1, keepdims=True) - 2 * alpha * dot + alpha * alpha * norm  # (..., K)
    best = residual.argmin(-1)
    return best, np.take_along_axis(alpha, best[..., None], -1)[..., 0], alpha


@dataclass(frozen=True)
class Detection:
    """One object found in an image, with the evidence for it."""

    object: ShapeObject
    centroid: tuple[float, float]  # (y, x) in pixels
    mass: float  # summed alpha
    distance: float  # L1 distance to the best template (lower = more certain)
    centre: tuple[float, float] = (0.0, 0.0)  # (y, x) of the matched shape's bounding-box centre, pixels
    extent: float = 0.0  # the matched size's bounding-box side, pixels


class _Candidate(NamedTuple):
    mass: float
    centroid: tuple[float, float]  # (y, x), pixels
    colour: int
    distances: np.ndarray  # (B, T) to every template at every blur level


def detect(image, background: str | None = None) -> tuple[str, list[Detection]]:
    """(background name, detections) of an image; see the module docstring."""
    pixels = _as_float(image)  # (S, S, 3)
    side = pixels.shape[0]
    bank = _bank(side)
    bg_name, bg = _background(pixels, background)
    best, alpha, colour_alpha = _unmix(pixels, bg)  # (S, S), (S, S), (S, S, K)
    regions, _ = ndimage.label(alpha >= FOREGROUND_ALPHA, structure=_EIGHT)
    owner = np.zeros((side, side), dtype=np.int64)  # object id per pixel, 0 = none
    cores: list[np.ndarray] = []  # per object, the (S, S) mask of its core pixels
    for r, box in enumerate(ndimage.find_objects(regions), start=1):
        inside = regions[box] == r
        # The core is the region's more opaque half (never stricter than CORE_ALPHA): blur
        # lowers a small object's peak alpha, and edges, where colours get confused, are left out.
        core = inside & (alpha[box] >= min(CORE_ALPHA, np.median(alpha[box][inside])))
        # One object per colour that owns a compact patch of the core; noise scatters single
        # mis-coloured pixels, a second object is a blob.
        blob = np.zeros(len(_COLOUR_NAMES), dtype=np.int64)
        for k in np.unique(best[box][core]):
            patches, _ = ndimage.label(core & (best[box] == k), structure=_EIGHT)
            blob[k] = np.bincount(patches.ravel())[1:].max()
        seeds = np.zeros(inside.shape, dtype=np.int64)
        for k in np.flatnonzero(blob):
            if blob[k] == blob.max() or blob[k] >= max(3, 0.3 * blob.max()):
                seeds[core & (best[box] == k)] = len(cores) + 1
                cores.append(np.zeros((side, side), dtype=bool))
                cores[-1][box] = seeds == len(cores)
        # Every pixel of the region goes to the object of its nearest core pixel.
        _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        owner[box][inside] = seeds[iy, ix][inside]
    # Background pixels near an object count towards it (its blurred edge), each to its
    # nearest object only, so a neighbour's edge never leaks into an object's shape.
    _, (iy, ix) = ndimage.distance_transform_edt(owner == 0, return_indices=True)
    nearest = owner[iy, ix]  # (S, S)
    candidates = []
    for obj_id, core in enumerate(cores, start=1):
        # The colour that best explains the core's mean: averaging many pixels beats noise.
        colour = int(_unmix(pixels[core].mean(0), bg)[0])
        region = owner == obj_id
        support = ndimage.binary_dilation(region, _EIGHT, iterations=SUPPORT_MARGIN) & (nearest == obj_id)
        a = np.where(support, colour_alpha[..., colour], 0.0)  # (S, S) this object's alpha
        for part in _split_by_cell(a, bank, side):
            candidate = _match(part, bank, colour, side)
            if candidate is not None:
                candidates.append(candidate)
    return bg_name, _choose_blur(candidates, side)


def _split_by_cell(a: np.ndarray, bank: _Bank, side: int) -> list[np.ndarray]:
    """One alpha map, or one per cell for a blob far heavier than any object that spreads
    over several cells (two same-colour objects that touch)."""
    if a.sum() <= 1.5 * bank.max_mass:
        return [a]
    cell = np.minimum((np.arange(side) * 3) // side, 2)
    cells = cell[:, None] * 3 + cell[None, :]  # (S, S) cell index of each pixel
    parts = [np.where(cells == c, a, 0.0) for c in range(9)]
    parts = [p for p in parts if p.sum() >= 0.5 * bank.min_mass]
    return parts if len(parts) > 1 else [a]


def _match(a: np.ndarray, bank: _Bank, colour: int, side: int) -> _Candidate | None:
    """One object's (S, S) alpha map compared with every template; None for a speck."""
    mass = a.sum()
    if mass < 0.35 * bank.min_mass:
        return None
    grid = np.arange(side) + 0.5
    cy, cx = (a.sum(1) @ grid) / mass, (a.sum(0) @ grid) / mass
    # Crop a patch whose centre is the centroid rounded to a phase: the centroid sits at
    # (P/2 + phase) in the patch, where the templates of that phase have theirs.
    steps = len(PHASES)
    qy, qx = round(cy * steps) / steps, round(cx * steps) / steps
    y0, x0 = math.floor(qy) - bank.side // 2, math.floor(qx) - bank.side // 2
    fy, fx = round((qy - math.floor(qy)) * steps), round((qx - math.floor(qx)) * steps)
    padded = np.pad(a, bank.side)  # (S + 2P, S + 2P): crops never leave the canvas
    patch = padded[y0 + bank.side:y0 + 2 * bank.side, x0 + bank.side:x0 + 2 * bank.side].ravel()  # (P*P,)
    distances = np.abs(bank.templates[fy, fx] - patch).sum(-1) * bank.penalty  # (B, T)
    return _Candidate(float(mass), (float(cy), float(cx)), colour, distances)


def _choose_blur(candidates: list[_Candidate], side: int) -> list[Detection]:
    """Pick the one blur level that fits all objects of the image best, then each one's template."""
    if not candidates:
        return []
    bank = _bank(side)
    level = int(np.argmin(sum(c.distances.min(1) for c in candidates)))
    cell = side / 3
    out = []
    for mass, (cy, cx), colour, distances in candidates:
        t = int(distances[level].argmin())
        if mass < bank.min_mass and distances[level, t] > mass:
            continue  # fainter than any object and like no shape: ringing or a stray blot
        shape, size = bank.labels[t]
        oy, ox = bank.offsets[t]
        row = min(2, max(0, int((cy - oy) // cell)))
        column = min(2, max(0, int((cx - ox) // cell)))
        obj = ShapeObject(shape, _COLOUR_NAMES[colour], size, POSITIONS[3 * row + column])
        out.append(Detection(obj, (cy, cx), mass, float(distances[level, t]), (cy - oy, cx - ox),
                             SIZE_FRACTION[size] * cell))
    return out


def parse_image(image, background: str | None = None) -> Scene:
    """The scene in an image (PIL or (H, W, 3) array); `background` None detects it.
    Two detected objects may share a cell: the result is what was seen, not a valid scene."""
    bg, detections = detect(image, background)
    return Scene(tuple(d.object for d in detections), bg)


ATTRIBUTES = ("colour", "shape", "size", "position")


def score_scenes(parsed: Scene, prompt: Scene) -> dict[str, float]:
    """GenEval-style scores of a parsed scene against the prompt scene (module docstring)."""
    out = {"count": float(len(parsed.objects) == len(prompt.objects))}
    matched = {a: 0 for a in ATTRIBUTES}
    if parsed.objects and prompt.objects:
        agree = np.array([[[getattr(p, a) == getattr(d, a) for a in ATTRIBUTES] for d in parsed.objects]
                          for p in prompt.objects], dtype=np.float64)  # (prompt, detected, attribute)
        gain = agree.sum(-1) + 1e-3 * agree[..., ATTRIBUTES.index("position")]  # ties: the same cell wins
        rows, cols = linear_sum_assignment(gain, maximize=True)
        for i, a in enumerate(ATTRIBUTES):
            matched[a] = int(agree[rows, cols, i].sum())
    for a in ATTRIBUTES:
        out[a] = matched[a] / len(prompt.objects) if prompt.objects else float(not parsed.objects)
    out["background"] = float(parsed.background == prompt.background)
    out["overall"] = float(parsed == prompt)
    return out


def score(image, scene: Scene, background: str | None = None) -> dict[str, float]:
    """Scores of an image against the scene its prompt describes: count, colour, shape,
    size, position, background, overall (all in [0, 1]; see the module docstring)."""
    return score_scenes(parse_image(image, background), scene)


def degrade(image, blur_sigma: float = 1.0, noise_std: float = 0.05, seed: int = 0) -> np.ndarray:
    """A mildly damaged copy: Gaussian blur (pixels) then Gaussian noise (on [0, 1] values),
    clipped; (H, W, 3) uint8. Seeded, so a test sees the same damage every run."""
    pixels = _as_float(image)
    blurred = ndimage.gaussian_filter(pixels, (blur_sigma, blur_sigma, 0)) if blur_sigma > 0 else pixels
    noisy = blurred + np.random.default_rng(seed).normal(0.0, noise_std, pixels.shape)
    return np.rint(np.clip(noisy, 0.0, 1.0) * 255).astype(np.uint8)
