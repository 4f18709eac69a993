"""Deterministic anti-aliased rendering of scenes.

Each shape is an inside/outside test on normalised object coordinates (u, v) in
[-1, 1]^2 (v points down; the object's bounding box is centred on its cell). A pixel's
coverage is the fraction of its SUPERSAMPLE x SUPERSAMPLE sub-pixel samples inside the
shape, and its colour is the linear mix background * (1 - coverage) + colour * coverage.
Only the pixels of each object's bounding box are evaluated, so a 64 px scene costs well
under a millisecond. The oracle builds its shape templates with the same functions.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

from mixmodal.data.shapes.scene import BACKGROUNDS, COLOURS, RESOLUTIONS, SIZE_FRACTION, Scene

SUPERSAMPLE = 4
SQUARE_HALF_SIDE = 1.0  # fills its box like the circle does: a smaller one blurs into a circle at 32 px
CROSS_HALF_WIDTH = 0.36  # arm width as a fraction of the object's side
STAR_INNER_RATIO = 0.45  # inner / outer radius: fat enough to stay a star at 32 px
# A 5-point star spans [-1, cos 36deg] vertically around its centre; shift it so its box is centred.
_STAR_SHIFT = (1 - math.cos(math.radians(36))) / 2


def _star_inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    v = v - _STAR_SHIFT
    rho = np.hypot(u, v)
    theta = np.arctan2(u, -v)  # 0 = straight up, towards a tip
    sector = 2 * np.pi / 5
    phi = np.mod(theta, sector)
    phi = np.minimum(phi, sector - phi)  # angle from the nearest tip, in [0, 36deg]
    # The edge from the tip (1, 0) to the inner vertex r(cos 36, sin 36) is {p : n.p = n.tip}.
    half = sector / 2
    n_x = STAR_INNER_RATIO * math.sin(half)
    n_y = 1 - STAR_INNER_RATIO * math.cos(half)
    return rho * (n_x * np.cos(phi) + n_y * np.sin(phi)) <= n_x


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of the points (u, v) inside `shape` (same shape as u and v)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= SQUARE_HALF_SIDE
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "triangle":  # apex at the top, base along the bottom of the box
        return (v <= 1.0) & (au <= (v + 1.0) / 2)
    if shape == "cross":
        return ((au <= CROSS_HALF_WIDTH) & (av <= 1.0)) | ((av <= CROSS_HALF_WIDTH) & (au <= 1.0))
    if shape == "star":
        return _star_inside(u, v)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, center_x: float, center_y: float, half: float, height: int, width: int,
             supersample: int = SUPERSAMPLE) -> tuple[int, int, np.ndarray]:
    """Coverage of one object on a height x width canvas, in pixel units (pixel (i, j)
    spans [j, j+1) x [i, i+1)). Returns (top, left, window): window is the (h, w) float
    coverage of the pixels [top:top+h, left:left+w], the object's clipped bounding box."""
    top, left = max(0, math.floor(center_y - half)), max(0, math.floor(center_x - half))
    bottom, right = min(height, math.ceil(center_y + half)), min(width, math.ceil(center_x + half))
    offsets = (np.arange(supersample) + 0.5) / supersample
    ys = ((np.arange(top, bottom)[:, None] + offsets).ravel() - center_y) / half  # (h*s,)
    xs = ((np.arange(left, right)[:, None] + offsets).ravel() - center_x) / half  # (w*s,)
    hit = inside(shape, xs[None, :], ys[:, None])  # (h*s, w*s)
    h, w = bottom - top, right - left
    window = hit.reshape(h, supersample, w, supersample).mean(axis=(1, 3))  # (h, w)
    return top, left, window


def object_geometry(position_cell: int, size: str, resolution: int) -> tuple[float, float, float]:
    """(center_x, center_y, half_side) in pixels of an object in a cell (0..8, reading order)."""
    cell = resolution / 3
    row, column = divmod(position_cell, 3)
    return (column + 0.5) * cell, (row + 0.5) * cell, SIZE_FRACTION[size] * cell / 2


def render_array(scene: Scene, resolution: int = 64) -> np.ndarray:
    """The scene as a (resolution, resolution, 3) uint8 array."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}; got {resolution!r}")
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    canvas = np.empty((resolution, resolution, 3), dtype=np.float64)
    canvas[:] = background
    for obj in scene.objects:
        cx, cy, half = object_geometry(obj.cell, obj.size, resolution)
        top, left, cov = coverage(obj.shape, cx, cy, half, resolution, resolution)
        h, w = cov.shape
        region = canvas[top:top + h, left:left + w]  # (h, w, 3), a view
        colour = np.array(COLOURS[obj.colour], dtype=np.float64)
        region += cov[..., None] * (colour - region)  # objects never overlap: mixing with background
    return np.rint(canvas).astype(np.uint8)


def render(scene: Scene, resolution: int = 64) -> PIL.Image.Image:
    """The scene as an RGB PIL image of resolution x resolution pixels."""
    return PIL.Image.fromarray(render_array(scene, resolution))
