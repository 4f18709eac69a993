"""How well the oracle reads scenes back: clean renders, and renders mildly degraded.

    python -m mixmodal.data.shapes.measure --num 1000 --resolution 32 64 128 --split heldout heldout-combos

prints, per resolution and split, the exact-scene rate on clean renders and, after
`degrade` (Gaussian blur sigma 1 px, then Gaussian noise std 0.05 on [0, 1] values),
the exact-scene rate, the mean attribute accuracy and each attribute's accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from mixmodal.data.shapes.oracle import ATTRIBUTES, degrade, score
from mixmodal.data.shapes.render import render_array
from mixmodal.data.shapes.scene import ShapesConfig
from mixmodal.data.shapes.splits import sample_scene


def measure(num: int = 1000, resolution: int = 64, split: str = "heldout", blur_sigma: float = 1.0,
            noise_std: float = 0.05) -> dict[str, float]:
    """The oracle on `num` scenes of `split` (sample_scene index 0..num-1): the exact-scene
    rate on clean renders and on degraded ones, and mean attribute scores when degraded."""
    config = ShapesConfig(resolution=resolution)
    clean, damaged = [], []
    started = time.perf_counter()
    for i in range(num):
        scene = sample_scene(config, split, i)
        pixels = render_array(scene, resolution)
        clean.append(score(pixels, scene))
        damaged.append(score(degrade(pixels, blur_sigma, noise_std, seed=i), scene))
    seconds = time.perf_counter() - started
    mean = {k: float(np.mean([s[k] for s in damaged])) for k in damaged[0]}
    return {
        "exact_clean": float(np.mean([s["overall"] for s in clean])),
        "exact_degraded": mean["overall"],
        **{f"degraded_{k}": mean[k] for k in ("count", *ATTRIBUTES)},
        "degraded_attributes": float(np.mean([mean[a] for a in ATTRIBUTES])),
        "ms_per_image": 1000 * seconds / (2 * num),  # includes sampling and rendering
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixmodal.data.shapes.measure",
                                     description="Measure the shapes oracle on clean and degraded held-out renders.")
    parser.add_argument("--num", type=int, default=1000, help="scenes per (resolution, split)")
    parser.add_argument("--resolution", type=int, nargs="+", default=[32, 48, 64, 128])
    parser.add_argument("--split", nargs="+", default=["heldout", "heldout-combos"])
    parser.add_argument("--blur", type=float, default=1.0, help="Gaussian blur sigma in pixels")
    parser.add_argument("--noise", type=float, default=0.05, help="Gaussian noise std on [0, 1] pixel values")
    args = parser.parse_args(argv)
    print(f"{'res':>4} {'split':<15} {'exact':>7} | degraded: {'exact':>7} {'attrs':>7} "
          f"{'count':>7} {'colour':>7} {'shape':>7} {'size':>7} {'pos':>7} | ms/img")
    for resolution in args.resolution:
        for split in args.split:
            m = measure(args.num, resolution, split, args.blur, args.noise)
            cols = [m["exact_degraded"], m["degraded_attributes"], m["degraded_count"], m["degraded_colour"],
                    m["degraded_shape"], m["degraded_size"], m["degraded_position"]]
            print(f"{resolution:>4} {split:<15} {100 * m['exact_clean']:>6.1f}% | degraded: "
                  + " ".join(f"{100 * c:>6.1f}%" for c in cols) + f" | {m['ms_per_image']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
