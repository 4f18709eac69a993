"""Does a model read a picture by where the text stands from it? Plain-format captions of held-out pictures
(the shapes suite's captioning: the picture, then greedy text), with the RoPE positions of everything after
the picture shifted by a gap of K positions that hold no tokens. A model that finds a cell's content by its
distance in the sequence (the caption right after the picture, as pretraining lays it out) loses the binding
of objects to cells as K grows; a model that finds it by the cell's own embedding does not. In a
conversation the user's instruction and the role tokens stand between the picture and the answer
(docs/instruct.md, nineteenth session).

    python benchmarks/study/reading_gap.py runs/recipe-latents --gaps 0 2 8 16 --num 100
    python benchmarks/study/reading_gap.py runs/sft-latents --gaps 0 8 --json gap.json
"""

from __future__ import annotations

import argparse
import json

import torch

from mixmodal.eval.shapes_tasks import ShapesEvalConfig, captioning
from mixmodal.inference.cache import KVCache
from mixmodal.inference.engine import Engine


def with_gap(gap: int, start: int):
    """Patch KVCache.begin_step so RoPE positions >= start move by `gap` (the cache slots stay as they are);
    returns a function that restores it."""
    original = KVCache.begin_step

    def begin_step(self, block: int) -> torch.Tensor:
        slots = original(self, block)
        return torch.where(slots >= start, slots + gap, slots)

    KVCache.begin_step = begin_step
    return lambda: setattr(KVCache, "begin_step", original)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run or model folder")
    parser.add_argument("--gaps", type=int, nargs="+", default=[0, 2, 8, 16])
    parser.add_argument("--num", type=int, default=100, help="held-out caption pictures (1-4 objects)")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args(argv)
    engine = Engine.from_pretrained(args.run)
    start = 1 + engine.per_image + 2  # <bos> <boi> picture <eoi>: the prompt is the picture alone
    config = ShapesEvalConfig(num_prompts=0, num_captions=args.num)
    rows = {}
    for gap in args.gaps:
        restore = with_gap(gap, start)
        try:
            metrics, _, _ = captioning(engine, config, engine.image_tokenizer.config.resolution, lambda _: None)
        finally:
            restore()
        rows[gap] = {"cider": metrics["cider"], **metrics["oracle"]}
    print(f"{args.run}: captions of {args.num} held-out pictures, RoPE positions after the picture shifted by K")
    print("| K | scene exact | count | colour | shape | position | CIDEr-D |\n|---|---|---|---|---|---|---|")
    for gap, r in rows.items():
        print(f"| {gap} | {r['overall']:.2f} | {r['count']:.2f} | {r['colour']:.2f} | {r['shape']:.2f} | "
              f"{r['position']:.2f} | {r['cider']:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"run": args.run, "num": args.num, "gaps": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
