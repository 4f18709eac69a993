"""What a latent model with a patch-code head (model.image.patch_codes) believes about a relation prompt before it
has drawn anything: the head's per-cell distribution over the clean-patch centroids at the first sampling step
(t = 1, pure noise, CFG 1), summed into the expected number of objects of each named shape per cell, and where the
mass of the relation's subject sits relative to its anchor.

For "a photo of a <subject> <relation> a <anchor>" the signed offset is the subject's expected column (row for
above/below) minus the anchor's, with the sign that makes the right direction positive: a model that has learned
the relation gives positive offsets (up to ~1 cell) for all four relations. Each prompt is also asked the other
way round ("a <anchor> <inverse relation> a <subject>", the same scene), and the offset of the first-named
object from the second-named is reported over both wordings: a model that places objects by the order a prompt
names them shows it there. Each centroid is labelled by the oracle on a canvas of that cell alone.

    python benchmarks/study/relations.py runs/lat-codes --num 64
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image as PILImage

from mixmodal.data.shapes.geneval import image_things, noun_phrase, prompt_set
from mixmodal.inference.config import GenerationConfig, GuidanceConfig
from mixmodal.inference.engine import Engine

RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def centroid_labels(engine: Engine) -> list[tuple[str, str] | None]:
    """(shape, colour) of each centroid of the model's patch codebook; None for an empty cell or an unclear one."""
    tok, labels = engine.image_tokenizer, []
    side = engine.model.config.image.grid_size
    with torch.no_grad():
        for c in engine.model.patch_codebook:
            latents = tok.unscale_latents(c.view(1, -1, 1, 1).repeat(1, 1, side, side))
            pixels = tok.decode(latents)[0].clamp(-1, 1)
            array = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            kinds = {(t.shape, t.colour) for t in image_things(PILImage.fromarray(array))}
            labels.append(next(iter(kinds)) if len(kinds) == 1 else None)
    return labels


def first_step_beliefs(engine: Engine, text: str) -> torch.Tensor:
    """[P, K]: the head's distribution per patch at the first sampling step of `text` (CFG 1, one step)."""
    model, captured = engine.model, []
    real = model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("image_times") is not None and out.image_code_logits is not None:
            captured.append(out.image_code_logits.detach().float().softmax(-1))
        return out

    model.forward = forward
    try:
        engine.generate(text, GenerationConfig(mode="image", diffusion_steps=1, guidance=GuidanceConfig(scale=1.0)),
                        seed=0)
    finally:
        del model.forward
    return captured[0][0]


def measure(engine: Engine, num: int, prompts: str = "validation") -> dict:
    if not engine.model.config.image.patch_codes:
        raise SystemExit("this model has no patch-code head (model.image.patch_codes=0): nothing to read")
    labels = centroid_labels(engine)
    side = engine.model.config.image.grid_size // engine.model.config.image.patch_size
    cols = torch.arange(side * side) % side
    rows = torch.arange(side * side) // side
    offsets: dict[str, list[float]] = {r: [] for r in RELATIONS}
    masses, first_named = [], []
    for prompt in prompt_set("position", prompts, num):
        anchor, subject = prompt.include
        swapped = f"a photo of {noun_phrase(anchor.shape)} {INVERSE[subject.relation]} {noun_phrase(subject.shape)}"
        for k, text in enumerate((prompt.text, swapped)):
            probs = first_step_beliefs(engine, text)

            def mass(req) -> torch.Tensor:  # [P]: expected objects of the requirement per patch
                idx = [i for i, lab in enumerate(labels) if lab is not None and lab[0] == req.shape
                       and (req.colour is None or lab[1] == req.colour)]
                return probs[:, idx].sum(1)

            def centre(m: torch.Tensor) -> tuple[float, float]:
                w = m / m.sum().clamp_min(1e-9)
                return float((w * cols).sum()), float((w * rows).sum())

            (ac, ar), (sc, sr) = centre(mass(anchor)), centre(mass(subject))
            if anchor.shape != subject.shape:  # (the same shape twice: no way to tell the two apart)
                first, second = ((sc, sr), (ac, ar)) if k == 0 else ((ac, ar), (sc, sr))
                first_named.append((first[0] - second[0], first[1] - second[1]))
            offsets[subject.relation].append({"left of": ac - sc, "right of": sc - ac, "above": ar - sr,
                                              "below": sr - ar}[subject.relation])
            masses.append((float(mass(anchor).sum()), float(mass(subject).sum())))
    out = {"labelled_centroids": sum(lab is not None for lab in labels), "centroids": len(labels), "relations": {}}
    for rel, values in offsets.items():
        v = np.array(values)
        out["relations"][rel] = {"n": len(v), "mean_offset": float(v.mean()) if len(v) else None,
                                 "right_way": float((v > 0).mean()) if len(v) else None}
    every = np.concatenate([np.array(v) for v in offsets.values()])
    out["all"] = {"n": len(every), "mean_offset": float(every.mean()), "right_way": float((every > 0).mean())}
    f = np.array(first_named)
    out["first_named_minus_second"] = {"n": len(f), "columns": float(f[:, 0].mean()), "rows": float(f[:, 1].mean())}
    out["expected_objects"] = {"anchor": float(np.mean([m[0] for m in masses])),
                               "subject": float(np.mean([m[1] for m in masses]))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a run or model folder of a latent model with image.patch_codes > 0")
    p.add_argument("--num", type=int, default=64, help="position prompts (each asked both ways round)")
    p.add_argument("--prompts", default="validation", choices=["validation", "heldout"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    engine = Engine.from_pretrained(args.model)
    r = measure(engine, args.num, args.prompts)
    print(f"{r['labelled_centroids']} of {r['centroids']} centroids hold one named object")
    for rel, v in r["relations"].items():
        print(f"{rel:9s} n={v['n']:3d}  mean signed offset {v['mean_offset']:+.3f}  right way {v['right_way']:.2f}")
    print(f"all       n={r['all']['n']:3d}  mean signed offset {r['all']['mean_offset']:+.3f}  right way "
          f"{r['all']['right_way']:.2f}; expected objects: anchor {r['expected_objects']['anchor']:.2f}, subject "
          f"{r['expected_objects']['subject']:.2f}")
    f = r["first_named_minus_second"]
    print(f"first-named minus second-named object (both wordings, n={f['n']}): {f['columns']:+.3f} columns, "
          f"{f['rows']:+.3f} rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, **r}, f, indent=1)


if __name__ == "__main__":
    main()
