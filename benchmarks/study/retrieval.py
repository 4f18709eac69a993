"""Retrieval augmentation on `shapes` (CM3Leon Table 1, in miniature): recall of the dual
encoder, and text-to-image oracle accuracy of one model size trained with 0, 1 and 2
retrieved documents for the same number of steps.

    python benchmarks/study/retrieval.py --out runs/study-retrieval          # everything (CPU: ~40 min)
    python benchmarks/study/retrieval.py --out runs/study-retrieval --ks 0 2 --steps 600 --prompts 50
    python benchmarks/study/retrieval.py --res 48 --out runs/study-retrieval-48   # at the recipes' level

--res picks the level: 32 (the demo's: a 32 px VQ, a 4-layer model, 1-2 objects, 1,500 steps, CFG 3)
or 48 (the token recipe's: factored k-means codes computed in ~10 s, its 6-layer model and sampling
(CFG 7.5, temperature 0.7, plausibility 0.1), 1-4 objects, 1,200 steps).

What it does, each step skipped when its output already exists (so a second call only
re-evaluates, and a model whose training stopped part-way resumes from its last checkpoint):
  1. image tokenizer: the level's (configs/tokenizers/vq-demo-32.yaml or kmeans-shapes-48-f16.yaml), unless --vq DIR;
  2. dual encoder: configs/retrieval/dual-encoder-shapes-{32,48}.yaml, unless --encoder DIR;
  3. recall@1/@5/@10, text -> image and image -> text, over --recall-pairs held-out caption
     pairs (and over held-out attribute combinations);
  4. the memory bank: --bank training caption documents, `mixmodal index build`;
  5. one fusion model per k in --ks (configs/retrieval/ra-tokens-{32,48}.yaml; k = 0 trains
     without retrieval), all with the same steps, batch and sequence length;
  6. for each model, --prompts held-out captions and --prompts held-out-combination
     captions -> one image each (retrieving k documents for the caption, CFG --cfg), scored
     by the oracle against the caption's scene; also the oracle's score of the top retrieved
     image itself (what copying it would give).
Writes OUT/results.json, OUT/results.md and OUT/results.png (OUT/results-maxsimX.* with
--max-similarity X: the selection's near-copy threshold at generation time).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# each level: its world, tokenizer, dual encoder, fusion config, steps and sampling
LEVELS = {
    32: {"shapes": "shapes:tasks=caption,max_objects=2,resolution=32", "tokenizer": "configs/tokenizers/vq-demo-32.yaml",
         "encoder": "configs/retrieval/dual-encoder-shapes-32.yaml", "fusion": "configs/retrieval/ra-tokens-32.yaml",
         "steps": 1500, "cfg": 3.0, "temperature": 1.0, "plausibility": 0.0},
    48: {"shapes": "shapes:tasks=caption,max_objects=4,resolution=48",
         "tokenizer": "configs/tokenizers/kmeans-shapes-48-f16.yaml",
         "encoder": "configs/retrieval/dual-encoder-shapes-48.yaml", "fusion": "configs/retrieval/ra-tokens-48.yaml",
         "steps": 1200, "cfg": 7.5, "temperature": 0.7, "plausibility": 0.1},
}
SHAPES = LEVELS[32]["shapes"]
KEYS = ("count", "colour", "shape", "size", "position", "overall")


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def mixmodal(*args: str) -> None:
    run([sys.executable, "-m", "mixmodal", *args])


def prompts(split: str, n: int, shapes: str = SHAPES):
    """(caption, scene, document) of the first n caption documents of a split."""
    from mixmodal.data.shapes import Scene
    from mixmodal.data.sources import open_source

    out = []
    for doc in open_source(f"{shapes},split={split},num={n}"):
        out.append((" ".join(doc.texts), Scene.from_dict(doc.metadata["scenes"][0]), doc))
    return out


def recall(embedder, split: str, n: int, shapes: str = SHAPES) -> dict[str, float]:
    docs = [d for _, _, d in prompts(split, n, shapes)]
    texts = embedder.embed_texts([" ".join(d.texts) for d in docs])
    images = embedder.embed_images([d.images[0] for d in docs])
    sim = texts @ images.T
    out = {}
    for name, s in (("t2i", sim), ("i2t", sim.T)):
        rank = (s > s[np.arange(len(s)), np.arange(len(s))][:, None]).sum(1)  # how many score above the pair
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = float((rank < k).mean())
    return out


def evaluate(model_dir: Path, k: int, bank: Path, cases, cfg: float, seed: int, batch: int = 16,
             max_similarity: float = 0.9, temperature: float = 1.0, plausibility: float = 0.0) -> dict:
    from mixmodal.data.shapes import score
    from mixmodal.inference import GenerationConfig
    from mixmodal.inference.config import GuidanceConfig, SamplingParams
    from mixmodal.inference.checkpoint import load_checkpoint
    from mixmodal.retrieval.select import Retriever, SelectionConfig

    engine = load_checkpoint(model_dir)
    config = GenerationConfig(mode="image", max_new_tokens=engine.per_image + 2,
                              guidance=GuidanceConfig(scale=cfg, plausibility=plausibility),
                              image=SamplingParams(temperature=temperature))
    retriever = Retriever.open(bank, SelectionConfig(k=max(k, 1), query_dropout=0.0, max_similarity=max_similarity))
    from mixmodal.documents import Document, Text

    queries = [Document([Text(c)]) for c, _, _ in cases]
    retrieved = retriever.retrieve_documents(queries)
    sums = {key: 0.0 for key in KEYS}
    copied = {key: 0.0 for key in KEYS}
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        context = [r[:k] for r in retrieved[start:start + batch]]
        results = engine.generate([c for c, _, _ in chunk], config, seed=seed + start, context=context)
        for (caption, scene, _), result, ctx in zip(chunk, results, retrieved[start:start + batch]):
            pixels = result.document.images
            s = score(pixels[0], scene) if pixels else {key: 0.0 for key in KEYS}
            for key in KEYS:
                sums[key] += s[key]
            top = [d for d in ctx if d.images]
            c = score(top[0].images[0], scene) if top else {key: 0.0 for key in KEYS}
            for key in KEYS:
                copied[key] += c[key]
    n = len(cases)
    return {"generated": {key: v / n for key, v in sums.items()}, "top_retrieved": {key: v / n for key, v in copied.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study-retrieval")
    p.add_argument("--res", type=int, choices=sorted(LEVELS), default=32,
                   help="the level: 32 (the demo's) or 48 (the token recipe's); see above")
    p.add_argument("--vq", default=None, help="an image tokenizer directory at --res (default: make the level's)")
    p.add_argument("--encoder", default=None, help="a dual encoder directory (default: train one)")
    p.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the level's)")
    p.add_argument("--bank", type=int, default=10000, help="training caption documents in the memory bank")
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts per split")
    p.add_argument("--recall-pairs", type=int, default=1000)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the level's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-similarity", type=float, default=0.9,
                   help="selection's near-copy / diversity threshold at generation (training always uses the config's)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every fusion run")
    args = p.parse_args()
    level = LEVELS[args.res]
    shapes = level["shapes"]
    args.steps = args.steps or level["steps"]
    args.cfg = args.cfg if args.cfg is not None else level["cfg"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)

    vq = Path(args.vq) if args.vq else out / "vq" / "tokenizer"
    if not (vq / "model.safetensors").is_file():
        timed("vq", lambda: mixmodal("train", level["tokenizer"], "--out", str(out / "vq")))
    encoder = Path(args.encoder) if args.encoder else out / "dual-encoder" / "encoder"
    if not (encoder / "model.safetensors").is_file():
        timed("dual_encoder", lambda: mixmodal("train", level["encoder"], "--out", str(out / "dual-encoder")))
    bank = out / "bank"
    if not (bank / "bank.json").is_file():
        timed("bank", lambda: mixmodal("index", "build", f"{shapes},split=train,num={args.bank}",
                                       "--encoder", str(encoder), "--out", str(bank)))

    from mixmodal.retrieval.document_embedder import DocumentEmbedder

    embedder = DocumentEmbedder.from_pretrained(encoder)
    results: dict = {"recall": {split: recall(embedder, split, args.recall_pairs, shapes)
                                for split in ("heldout", "heldout-combos")}}
    cases = {split: prompts(split, args.prompts, shapes) for split in ("heldout", "heldout-combos")}
    results["models"] = {}
    for k in args.ks:
        run_dir = out / f"k{k}"
        if not (run_dir / "model" / "model.safetensors").is_file():
            retrieval = [f"data.retrieval.index={bank}", f"data.retrieval.k={k}"] if k else []
            # a run stopped part-way (a session's end) continues from its last checkpoint
            resume = ["--resume"] if any((run_dir / "checkpoints").glob("step_*")) else []
            timed(f"train_k{k}", lambda: mixmodal("train", level["fusion"], "--out", str(run_dir),
                                                  f"data.image_tokenizer={vq}", f"trainer.steps={args.steps}",
                                                  *retrieval, *args.overrides, *resume))
        eval_json = json.loads((run_dir / "eval.json").read_text())
        scores = {split: evaluate(run_dir / "model", k, bank, c, args.cfg, args.seed, max_similarity=args.max_similarity,
                                  temperature=level["temperature"], plausibility=level["plausibility"])
                  for split, c in cases.items()}
        results["models"][k] = {"eval": {key: v for key, v in eval_json.items() if key.startswith("eval_")},
                                "data": eval_json.get("data"), **scores}
        print(f"k={k}: " + ", ".join(f"{split} overall {scores[split]['generated']['overall']:.3f}" for split in cases),
              flush=True)
    results["settings"] = {**vars(args), "machine": platform.processor() or platform.machine(),
                           "date": time.strftime("%Y-%m-%d"), "timings_s": timings}
    name = "results" if args.max_similarity == 0.9 else f"results-maxsim{args.max_similarity:g}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    write_report(results, out, name)
    print(f"wrote {out / (name + '.md')} and {out / (name + '.png')}")


def write_report(results: dict, out: Path, name: str = "results") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| split | " + " | ".join(f"t2i R@{k}" for k in (1, 5, 10)) + " | " + " | ".join(f"i2t R@{k}" for k in (1, 5, 10)) + " |",
             "|---|" + "---|" * 6]
    for split, r in results["recall"].items():
        lines.append(f"| {split} | " + " | ".join(f"{r[f't2i_r{k}']:.3f}" for k in (1, 5, 10)) + " | "
                     + " | ".join(f"{r[f'i2t_r{k}']:.3f}" for k in (1, 5, 10)) + " |")
    lines += ["", "| k | split | " + " | ".join(KEYS) + " | top retrieved image, overall | eval text CE | eval image CE |",
              "|---|---|" + "---|" * (len(KEYS) + 3)]
    for k, m in results["models"].items():
        for split in ("heldout", "heldout-combos"):
            g = m[split]["generated"]
            lines.append(f"| {k} | {split} | " + " | ".join(f"{g[key]:.3f}" for key in KEYS)
                         + f" | {m[split]['top_retrieved']['overall']:.3f} | {m['eval'].get('eval_text_ce', 0):.3f}"
                         + f" | {m['eval'].get('eval_image_ce', 0):.3f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ks = list(results["models"])
    for i, split in enumerate(("heldout", "heldout-combos")):
        ax.bar(np.arange(len(ks)) + 0.38 * i, [results["models"][k][split]["generated"]["overall"] for k in ks], 0.38,
               label=split)
    ax.set_xticks(np.arange(len(ks)) + 0.19, [f"k={k}" for k in ks])
    ax.set_ylabel("oracle overall accuracy")
    ax.set_title("text-to-image on shapes, by retrieved documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
