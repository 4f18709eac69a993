"""Does the sampler draw more objects than the prompt asks for? For GenEval-form prompts of a few
categories, the number of objects of the named shapes the oracle finds minus the number the prompt
names (`extra`; `over` / `under`: the share of images with more / fewer; `extra_any`: all objects,
which the world's partial captions make legitimate), and the accuracy, under several sampling settings. For
position prompts it also splits the images that hold each named shape exactly once (`one_each`) into those
with the relation the right way round (`right`), reversed (`reversed`) or neither: a model that ignores the
relation puts as many reversed as right (key=value lists, the eval suite's fields plus
`guidance_interval=lo,hi`: guidance only for lo < t <= hi, latent mode).

    python benchmarks/study/overdraw.py runs/recipe-latents --num 24 \
        --setting "cfg=7.5" --setting "cfg=3.0" --setting "cfg=7.5 guidance_interval=0.0,0.7"
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mixmodal.data.shapes.geneval import image_things, prompt_set, relative_position, score_image
from mixmodal.eval.shapes_suite import SAMPLING_DEFAULTS, image_generation_config
from mixmodal.inference.engine import Engine


def parse_setting(text: str, mode: str) -> dict:
    settings = dict(SAMPLING_DEFAULTS[mode])
    for item in text.split():
        key, value = item.split("=", 1)
        if key == "guidance_interval":
            settings[key] = [float(v) for v in value.split(",")]
        elif key == "cdk":
            settings[key] = value.lower() in ("1", "true", "yes")
        else:
            settings[key] = type(settings[key])(value) if key in settings else float(value)
    return settings


REVERSED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def relation_verdict(prompt, things) -> str | None:
    """For a two-object relation prompt: 'right', 'reversed' or 'neither' when the image holds each named
    shape exactly once; None otherwise (or for other prompts)."""
    if len(prompt.include) != 2 or prompt.include[1].relation is None:
        return None
    target, obj = prompt.include
    a = [t for t in things if t.shape == obj.shape]
    b = [t for t in things if t.shape == target.shape]
    if len(a) != 1 or len(b) != 1:
        return None
    relations = relative_position(a[0], b[0])
    return "right" if obj.relation in relations else "reversed" if REVERSED[obj.relation] in relations else "neither"


def measure(engine, settings: dict, categories: list[str], num: int, prompt_source: str, batch: int = 32) -> dict:
    gen = image_generation_config(engine, settings)
    out = {}
    for category in categories:
        prompts = prompt_set(category, prompt_source, num)
        rows, verdicts = [], []
        for start in range(0, num, batch):
            chunk = prompts[start:start + batch]
            # the eval suite's seeds (its first image of prompt i: seed 1000 i), so verdicts match its own
            results = engine.generate([p.text for p in chunk], gen, seed=[1000 * i for i in range(start, start + len(chunk))])
            for p, r in zip(chunk, results):
                image = r.document.images[0] if r.document.images else None
                asked = sum(q.count for q in p.include)
                things = image_things(image) if image is not None else []
                named = {q.shape for q in p.include}
                found = sum(t.shape in named for t in things)  # objects of the shapes the prompt names
                rows.append((score_image(image, p)["correct"] if image is not None else 0.0, found - asked,
                             found > asked, found < asked, len(things) - asked))
                verdicts.append(relation_verdict(p, things))
        a = np.array(rows, dtype=float)
        out[category] = {"accuracy": a[:, 0].mean(), "extra_objects": a[:, 1].mean(), "over": a[:, 2].mean(),
                         "under": a[:, 3].mean(), "extra_any": a[:, 4].mean()}
        if category == "position":
            out[category].update({"one_each": float(np.mean([v is not None for v in verdicts]))},
                                 **{k: float(np.mean([v == k for v in verdicts])) for k in ("right", "reversed")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--num", type=int, default=24, help="prompts per category")
    ap.add_argument("--categories", default="single_object,two_object,counting,colors")
    ap.add_argument("--prompts", default="heldout", help="prompt set: heldout, heldout-combos or validation")
    ap.add_argument("--setting", action="append", default=[], help="key=value ... (repeatable)")
    ap.add_argument("--out")
    args = ap.parse_args()
    engine = Engine.from_pretrained(args.run)
    results = []
    for text in args.setting or [""]:
        settings = parse_setting(text, engine.mode)
        t0 = time.time()
        r = measure(engine, settings, args.categories.split(","), args.num, args.prompts)
        mean = {k: float(np.mean([c[k] for c in r.values()])) for k in ("accuracy", "extra_objects", "over", "under", "extra_any")}
        print(f"{text or 'defaults':45s} " + "  ".join(
            f"{c}: acc {v['accuracy']:.2f} extra {v['extra_objects']:+.2f} over {v['over']:.2f} under {v['under']:.2f}"
            + (f" one_each {v['one_each']:.2f} (right {v['right']:.2f} reversed {v['reversed']:.2f})" if "one_each" in v else "")
            for c, v in r.items())
              + f"  | mean acc {mean['accuracy']:.3f} extra {mean['extra_objects']:+.2f}  ({time.time() - t0:.0f} s)",
              flush=True)
        results.append({"setting": text, "sampling": settings, "categories": r, "mean": mean})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
