"""How much does a model use its caption? Latent mode: the denoiser per noise level; token mode:
the image codes' cross-entropy with and without the caption (`caption_gain`).

For held-out caption -> image documents, at each time t the model predicts from
x_t = noise(x0, t) twice, laid out as generation's two guidance streams (data/layout.py):
conditional `<bos> caption <boi> x_t <eoi>` and unconditional `<bos> <boi> x_t <eoi>`
(`--uncond mask`: `<bos> <mask:0> <boi> ...`). Reported per t:

    gap      mean ||cond - uncond|| / ||cond||: what CFG has to extrapolate from
    err_c    mean squared error of the conditional prediction against the training target
    err_u    the same for the unconditional prediction

A model trained without conditioning dropout sees the unconditional layout only in
image-first documents, which noise limiting caps at t <= noise_limit, so err_u above that
may be untrained (on the 32 px study model at 250 steps it was within ~10% of err_c with and
without dropout, docs/generation.md); a small gap means the caption is barely used.

    python benchmarks/study/guidance_gap.py runs/t15-latents --num 64 --out runs/t15-latents/guidance_gap.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mixmodal.data.layout import drop_conditioning, encode_document, lay_out
from mixmodal.data.shapes import ShapesConfig, shapes_document
from mixmodal.inference.engine import Engine
from mixmodal.tokenizers.pixels import images_to_tensor

TIMES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def heldout_captions(resolution: int, num: int, max_objects: int) -> list:
    """The first `num` held-out caption -> image documents of the shapes world."""
    world = ShapesConfig(resolution=resolution, max_objects=max_objects, tasks=["caption"])
    return [shapes_document(world, "heldout", i) for i in range(num)]


@torch.no_grad()
def guidance_gap(run: str, num: int = 64, uncond: str = "empty", max_objects: int = 2, seed: int = 0) -> dict:
    engine = Engine.from_pretrained(run) if isinstance(run, (str, Path)) else run
    if engine.mode == "tokens":
        return caption_gain(engine, num, uncond, max_objects)
    model, vocab, schedule = engine.model, engine.vocab, engine.schedule
    resolution = engine.image_tokenizer.config.resolution
    docs = heldout_captions(resolution, num, max_objects)
    tok = engine.image_tokenizer
    x0 = tok.scale_latents(tok.encode(images_to_tensor([d.images[0] for d in docs], resolution))).float()
    # each document's two streams, laid out once: (ids, start of the image) per stream
    layouts = []
    for i, doc in enumerate(docs):
        segments = encode_document(doc, engine.text_tokenizer, [x0[i]], "latents").segments
        streams = []
        for stream in (segments, drop_conditioning(segments, uncond, vocab)):
            flat, _ = lay_out(stream, vocab, "latents", engine.per_image, eos=False)
            streams.append((torch.tensor([flat.ids]), flat.images[0][0]))
        layouts.append(streams)
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for t in TIMES:
        noise = torch.randn(x0.shape, generator=generator)
        times = torch.full((num,), t)
        x_t = schedule.add_noise(x0, noise, times)
        target = schedule.target(x0, noise, times)
        predictions = []
        for k in range(2):  # conditional, unconditional
            out = []
            for i, streams in enumerate(layouts):
                ids, start = streams[k]
                result = model(ids, positions=torch.arange(ids.shape[1])[None], image_latents=x_t[i:i + 1],
                               image_times=times[i:i + 1], image_index=(start + torch.arange(engine.per_image))[None])
                out.append(result.image_prediction[0].float())
            predictions.append(torch.stack(out))
        cond, unc = predictions
        gap = ((cond - unc).flatten(1).norm(dim=1) / cond.flatten(1).norm(dim=1).clamp(min=1e-8)).mean()
        rows[str(t)] = {"gap": float(gap), "err_c": float(((cond - target) ** 2).mean()),
                        "err_u": float(((unc - target) ** 2).mean())}
    return {"run": str(run), "num": num, "uncond": uncond, "max_objects": max_objects, "by_time": rows}


@torch.no_grad()
def caption_gain(engine, num: int = 64, uncond: str = "empty", max_objects: int = 2) -> dict:
    """Token mode: the image codes' cross-entropy (nats per code, teacher-forced) of held-out
    caption -> image documents with their caption (`ce_c`) and without it (`ce_u`, the guidance
    stream's prompt); `gain` = ce_u - ce_c is what the caption is worth to the model. Renders are
    deterministic given a full caption, so a model that used it fully would reach ce_c ~ 0."""
    model, vocab = engine.model, engine.vocab
    resolution = engine.image_tokenizer.config.resolution
    docs = heldout_captions(resolution, num, max_objects)
    pixels = images_to_tensor([d.images[0] for d in docs], resolution)
    codes = vocab.image_code_to_id(engine.image_tokenizer.encode(pixels).flatten(1))
    ce = [[], []]
    for i, doc in enumerate(docs):
        segments = encode_document(doc, engine.text_tokenizer, [codes[i]], "tokens").segments
        for k, stream in enumerate((segments, drop_conditioning(segments, uncond, vocab))):
            flat, _ = lay_out(stream, vocab, "tokens", engine.per_image, eos=False)
            ids = torch.tensor([flat.ids])
            start = flat.images[0][0]
            logits = model(ids, positions=torch.arange(ids.shape[1])[None]).logits[0].float()
            targets = ids[0, start:start + engine.per_image]
            ce[k].append(float(torch.nn.functional.cross_entropy(logits[start - 1:start - 1 + engine.per_image], targets)))
    ce_c, ce_u = (sum(v) / len(v) for v in ce)
    return {"run": str(getattr(engine, "checkpoint", "")), "num": num, "uncond": uncond, "max_objects": max_objects,
            "mode": "tokens", "ce_c": ce_c, "ce_u": ce_u, "gain": ce_u - ce_c}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--num", type=int, default=64, help="held-out caption documents")
    parser.add_argument("--uncond", default="empty", choices=("empty", "mask"))
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    result = guidance_gap(args.run, args.num, args.uncond, args.max_objects)
    if result.get("mode") == "tokens":
        print(f"image CE, nats/code: with the caption {result['ce_c']:.3f}, without {result['ce_u']:.3f}, "
              f"gain {result['gain']:.3f}")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return
    print(f"{'t':>5} {'gap':>7} {'err_c':>8} {'err_u':>8}")
    for t, r in result["by_time"].items():
        print(f"{t:>5} {r['gap']:7.3f} {r['err_c']:8.4f} {r['err_u']:8.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
