"""`mixmodal image encode | decode | eval`: images to codes / latents with an image tokenizer, and back."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mixmodal.cli.common import no_overrides
from mixmodal.data.bad_input import BadInputLog


def register(verbs: argparse._SubParsersAction) -> None:
    image = verbs.add_parser("image", help="encode images to codes / latents with an image tokenizer, and back",
                             description="Encode images with a VQ or VAE image tokenizer directory, and decode back to PNGs.")
    image_verbs = image.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)
    p = image_verbs.add_parser("encode", help="images -> codes (VQ) or latents (VAE) in a .npy file",
                               description="Encode IMAGE files: a VQ tokenizer writes int32 codes [N, h, w], a VAE "
                               "tokenizer float32 latents [N, C, h, w] (the posterior mean, unscaled).")
    p.add_argument("tokenizer", metavar="TOKENIZER_DIR", help="folder with config.yaml and model.safetensors")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (any format Pillow reads; converted to RGB)")
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--resize", action="store_true",
                   help="centre-crop and resize (bicubic) images that are not at the trained resolution, instead of failing")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-pixels", type=int, default=None, help="images with more pixels are refused (decompression-bomb guard)")
    p.set_defaults(func=cmd_image_encode)

    p = image_verbs.add_parser("decode", help="codes / latents in a .npy file -> PNGs",
                               description="Decode a .npy of int codes [N, h, w] (VQ) or float latents [N, C, h, w] "
                               "(VAE, unscaled) into OUT/00000.png, 00001.png, ...")
    p.add_argument("tokenizer", metavar="TOKENIZER_DIR", help="folder with config.yaml and model.safetensors")
    p.add_argument("array", metavar="FILE.npy", help="what `mixmodal image encode` wrote")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_image_decode)

    p = image_verbs.add_parser("eval", help="measure reconstructions: PSNR, SSIM, codebook usage / KL, the shapes oracle",
                               description="Reconstruct the first --num images of SOURCE with the tokenizer and report "
                               "PSNR, SSIM, codebook usage and perplexity (VQ) or mean KL (VAE), and, on shapes "
                               "sources, the oracle's scene recovery on the reconstructions.")
    p.add_argument("tokenizer", metavar="TOKENIZER_DIR")
    p.add_argument("--source", default="shapes:split=heldout", help="images to reconstruct (default: held-out shapes)")
    p.add_argument("--num", type=int, default=1000, help="number of images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_image_eval)


def cmd_image_encode(args: argparse.Namespace, overrides: list[str]) -> int:
    import numpy as np
    import torch

    from mixmodal.data.images import DEFAULT_MAX_PIXELS, decode_image
    from mixmodal.tokenizers.image import load_image_tokenizer
    from mixmodal.tokenizers.pixels import images_to_tensor

    no_overrides("image encode", overrides)
    tokenizer = load_image_tokenizer(args.tokenizer)
    log = BadInputLog(strict=True)  # one bad file fails the command, naming the file and why
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    pil_images = [decode_image(None, path, log=log, max_pixels=max_pixels) for path in args.images]
    resolution = tokenizer.config.resolution
    if not args.resize:
        for path, image in zip(args.images, pil_images):
            if image.size != (resolution, resolution):
                raise ValueError(f"{path}: image is {image.width}x{image.height} but the tokenizer was trained at "
                                 f"{resolution}x{resolution}; pass --resize to centre-crop and resize it (bicubic)")
    pixels = images_to_tensor(pil_images, resolution)  # (N, 3, R, R) in [-1, 1]
    with torch.no_grad():
        out = torch.cat([tokenizer.encode(batch) for batch in pixels.split(args.batch_size)])
    array = out.numpy().astype(np.int32 if tokenizer.discrete else np.float32)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    what = "codes" if tokenizer.discrete else "latents (unscaled)"
    print(f"encoded {len(pil_images)} image(s) -> {what} {list(array.shape)} {array.dtype} -> {path}")
    return 0


def cmd_image_decode(args: argparse.Namespace, overrides: list[str]) -> int:
    import numpy as np
    import torch

    from mixmodal.tokenizers.image import load_image_tokenizer
    from mixmodal.tokenizers.pixels import tensor_to_images

    no_overrides("image decode", overrides)
    tokenizer = load_image_tokenizer(args.tokenizer)
    array = np.load(args.array, allow_pickle=False)  # never unpickle a user file
    if tokenizer.discrete and (array.ndim != 3 or array.dtype.kind not in "iu"):
        raise ValueError(f"{args.array}: a {tokenizer.kind} tokenizer decodes integer codes [N, h, w]; got {array.dtype} {list(array.shape)}")
    if not tokenizer.discrete and (array.ndim != 4 or array.dtype.kind != "f"):
        raise ValueError(f"{args.array}: a {tokenizer.kind} tokenizer decodes float latents [N, C, h, w] (unscaled); "
                         f"got {array.dtype} {list(array.shape)}")
    values = torch.from_numpy(array.astype(np.int64 if tokenizer.discrete else np.float32))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = 0
    with torch.no_grad():
        for batch in values.split(args.batch_size):
            for image in tensor_to_images(tokenizer.decode(batch)):
                image.save(out / f"{index:05d}.png")
                index += 1
    print(f"decoded {index} image(s) -> {out}/00000.png ...")
    return 0


def cmd_image_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.tokenizers.image import load_image_tokenizer
    from mixmodal.train.image_data import eval_images
    from mixmodal.train.image_tokenizer import evaluate_reconstructions

    no_overrides("image eval", overrides)
    tokenizer = load_image_tokenizer(args.tokenizer)
    started = time.perf_counter()
    images, scenes = eval_images(args.source, tokenizer.config.resolution, args.num)
    _, metrics = evaluate_reconstructions(tokenizer, images, scenes, batch_size=args.batch_size)
    metrics = {"tokenizer": str(args.tokenizer), "source": args.source, "images": len(images), **metrics}
    print(json.dumps(metrics, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    print(f"({time.perf_counter() - started:.1f}s)", file=sys.stderr)
    return 0
