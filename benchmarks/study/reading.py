"""Where does a model's reading of a picture fail? Captions of held-out one-object pictures, split into the
object's row and column (right / wrong), with the confusion of columns; for a latent model also at several
read times t: the picture fed noised at t, as training feeds the pictures a caption reads, instead of
clean. A model that reads where things are gets both axes; a model that places objects by their coarse
distance in the sequence (a row is 3 positions, a column 1) gets rows and misses columns.

    python benchmarks/study/reading.py runs/recipe-latents --num 200
    python benchmarks/study/reading.py runs/recipe-latents --times 0 0.2 0.4 0.6 --json reading.json
    python benchmarks/study/reading.py runs/recipe-latents --attention   # + where caption tokens look
`--attention` also lays each picture out with one of its reference captions after it (the prompt layout,
which is the training layout), runs one teacher-forced forward, and reports per layer how the attention
the caption's tokens pay to the picture's positions is spread: the mean share on the object's own
position(s) (uniform: 1 / positions), and the largest such share of any head.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json

import torch

import mixmodal.inference.engine as engine_module
import mixmodal.model.transformer as transformer_module
from mixmodal.data.shapes import CaptionParseError, Scene, parse_caption
from mixmodal.documents import Document, Image, Text
from mixmodal.eval.shapes_tasks import ShapesEvalConfig, _generate, _seeds, documents
from mixmodal.inference.config import GenerationConfig, SamplingParams
from mixmodal.inference.prompt import encode_prompt, prompt_ids
from mixmodal.model.masks import attention_weights, dense_mask

ONE_OBJECT = ShapesEvalConfig(min_objects=1, max_objects=1, num_prompts=0)


def one_object_documents(engine, num: int) -> list:
    """The first `num` held-out one-object caption documents, at the model's image resolution."""
    return documents(ONE_OBJECT, engine.image_tokenizer.config.resolution, "caption", "heldout", num)


def read_times(engine, t: float, clean: tuple, seed: int = 0) -> None:
    """Feed prompt pictures noised at flow time t (x_t = (1 - t) x0 + t noise) and tell the model t;
    t = 0 restores `clean`, the engine's own (encode_prompt, commit_time)."""
    encode, commit_time = clean
    if t <= 0:
        engine_module.encode_prompt, engine.commit_time = encode, commit_time
        return
    if engine.schedule.config.kind != "flow":
        raise SystemExit("--times needs a flow-trained latent model (diffusion.kind: flow)")
    generator = torch.Generator().manual_seed(seed)

    def noised(*args, **kwargs):
        encoded = encode(*args, **kwargs)
        latents = [(1 - t) * x + t * torch.randn(x.shape, generator=generator).to(x) for x in encoded.latents]
        return dataclasses.replace(encoded, latents=latents)

    engine_module.encode_prompt, engine.commit_time = noised, t


def one_object_captions(engine, num: int) -> dict:
    docs = one_object_documents(engine, num)
    gen = GenerationConfig(mode="text", max_images=0, max_new_tokens=64, text=SamplingParams(temperature=0.0))
    results = _generate(engine, [[d.images[0]] for d in docs], gen, 32, _seeds(ONE_OBJECT, num), lambda s: None, "captions")
    counts = collections.Counter()
    columns = collections.Counter()
    for result, doc in zip(results, docs):
        truth = Scene.from_dict(doc.metadata["scenes"][0]).objects[0]
        try:
            said = parse_caption(" ".join(result.document.texts).strip()).objects
        except (CaptionParseError, ValueError):
            said = []
        if len(said) != 1:
            counts["unparsed_or_not_one"] += 1
            continue
        got = said[0]
        counts["n"] += 1
        counts["row"] += got.row == truth.row
        counts["column"] += got.column == truth.column
        counts["cell"] += got.cell == truth.cell
        counts["colour"] += got.colour == truth.colour
        counts["shape"] += got.shape == truth.shape
        columns[f"{truth.column}->{got.column}"] += 1
    n = max(counts["n"], 1)
    return {"captions": num, "one_object_parsed": counts["n"],
            **{k: round(counts[k] / n, 3) for k in ("row", "column", "cell", "colour", "shape")},
            "columns_true_to_said": dict(sorted(columns.items()))}


def attention_on_object(engine, num: int) -> list[dict]:
    """Per layer: the share of the caption tokens' attention to the picture that falls on the object's
    positions (mean over heads and tokens; and the best head's), teacher-forced on held-out one-object
    pictures, each followed by one of its reference captions."""
    docs = one_object_documents(engine, num)
    model, per = engine.model, engine.per_image
    captured: list = []
    project = transformer_module.Attention.project

    def spy(self, x, rope):
        q, k, v = project(self, x, rope)
        captured.append((q, k))
        return q, k, v

    grid = int(per ** 0.5)
    sums: dict[int, list[float]] = {}
    transformer_module.Attention.project = spy
    try:
        for doc in docs:
            truth = Scene.from_dict(doc.metadata["scenes"][0]).objects[0]
            text = " ".join(doc.texts).strip()
            encoded = encode_prompt(Document([Image(doc.images[0]), Text(text)]), engine.text_tokenizer,
                                    engine.image_tokenizer, engine.vocab, engine.mode)
            ids, images = prompt_ids(encoded.segments, engine.vocab, engine.mode, per)
            start = images[0][0]
            span = start + torch.arange(per)
            image_ids = torch.full((1, len(ids)), -1)
            if model.config.image.is_bidirectional:
                image_ids[0, span] = 0
            kwargs = dict(image_ids=image_ids)
            if engine.mode == "latents":
                kwargs.update(image_latents=encoded.latents[0][None].float(),
                              image_times=torch.tensor([engine.commit_time]), image_index=span[None])
            mask = dense_mask(torch.zeros(1, len(ids), dtype=torch.long), image_ids)  # the forward's own rule
            # the object's positions: its cell's share of the grid (one position per cell when grid == 3)
            rows = range(truth.row * grid // 3, (truth.row + 1) * grid // 3)
            cols = range(truth.column * grid // 3, (truth.column + 1) * grid // 3)
            mine = torch.tensor([r * grid + c for r in rows for c in cols])
            captured.clear()
            with torch.no_grad():
                model(torch.tensor([ids]), **kwargs)
            first_text = start + per + 1  # after <eoi>
            for layer, (q, k) in enumerate(captured):
                att = attention_weights(q, k, mask)[0][:, first_text:, span]  # [H, Tq, P]
                att = att / att.sum(-1, keepdim=True)
                share = att[..., mine].sum(-1).mean(1)  # [H]
                total = sums.setdefault(layer, [0.0, 0.0])
                total[0] += float(share.mean())
                total[1] += float(share.max())
    finally:
        transformer_module.Attention.project = project
    return [{"layer": layer, "object_share": round(a / len(docs), 3), "best_head_share": round(b / len(docs), 3),
             "uniform": round(max(grid // 3, 1) ** 2 / per, 3)}
            for layer, (a, b) in sorted(sums.items())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder or run directory")
    p.add_argument("--num", type=int, default=200, help="held-out one-object pictures to caption")
    p.add_argument("--times", type=float, nargs="+", default=[0.0],
                   help="latent models: read the pictures noised at these flow times (0 = clean, the engine's feed)")
    p.add_argument("--attention", action="store_true",
                   help="also: how the caption tokens' attention to the picture falls on the object, per layer")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    engine = engine_module.Engine.from_pretrained(args.model)
    if engine.mode != "latents" and args.times != [0.0]:
        raise SystemExit("--times is for latent-mode models; a token model reads codes")
    clean = (engine_module.encode_prompt, engine.commit_time)
    rows = []
    for t in args.times:
        if engine.mode == "latents":
            read_times(engine, t, clean)
        row = {"read_time": t, **one_object_captions(engine, args.num)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    layers = []
    if args.attention:
        if engine.mode == "latents":
            read_times(engine, 0.0, clean)
        layers = attention_on_object(engine, args.num)
        for row in layers:
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "rows": rows, "attention": layers}, f, indent=1)


if __name__ == "__main__":
    main()
