"""How exactly an image tokenizer round-trips the shapes world: the oracle on its reconstructions of
held-out scenes and of held-out shape-colour combinations (pairs no training image holds).

    python benchmarks/study/tokenizer_recon.py runs/vq-shapes-48-f8/tokenizer --num 256

A token model can only draw what its tokenizer can write back: a VQ whose codes never saw a red star
caps the held-out-combination accuracy of every model trained on it (docs/recipes.md).
"""

from __future__ import annotations

import argparse
import json

import torch

from mixmodal.tokenizers.image import load_image_tokenizer
from mixmodal.train.image_data import eval_images
from mixmodal.train.image_tokenizer import evaluate_reconstructions

SPLITS = ("heldout", "heldout-combos")


def tokenizer_recon(path: str, num: int = 256, splits: tuple[str, ...] = SPLITS) -> dict:
    """{split: {psnr, oracle_overall, oracle_<attribute>...}} for `num` scenes of each split."""
    tokenizer = load_image_tokenizer(path)
    resolution = tokenizer.config.resolution
    out = {}
    for split in splits:
        images, scenes = eval_images(f"shapes:split={split}", resolution, num)
        _, metrics = evaluate_reconstructions(tokenizer, images, scenes)
        out[split] = {k: round(float(v), 4) for k, v in metrics.items() if k == "psnr" or k.startswith("oracle_")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tokenizer", help="an image tokenizer folder (RUN/tokenizer)")
    parser.add_argument("--num", type=int, default=256, help="scenes per split")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps({"tokenizer": args.tokenizer, "num": args.num, **tokenizer_recon(args.tokenizer, args.num)}, indent=1))


if __name__ == "__main__":
    main()
