"""`mixmodal generate CHECKPOINT`: text and images from a trained model -> documents, PNGs, an HTML page
(docs/generation.md). The generation-config flags (--mode, --cfg, ...) are GENERATION_FLAGS
(mixmodal/flags.py), shared with `mixmodal chat` and `mixmodal.generate(...)`."""

from __future__ import annotations

import argparse

from mixmodal.cli.common import add_engine_options
from mixmodal.flags import GENERATION_FLAGS, add_flags, given


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("generate", help="write text and images from a trained model (documents, PNGs, an HTML page)",
                         description="Generate from CHECKPOINT (a run directory of `mixmodal train` or its model/ "
                         "folder): KV-cached decoding that switches between text and images, with guidance. Writes "
                         "OUT/documents.jsonl, OUT/images/*.png and a self-contained OUT/index.html.",
                         epilog="Trailing key=value arguments override fields of the generation config, e.g. "
                         "text.top_p=0.9 image.top_k=100 guidance.uncond=mask contrastive.alpha=0.1 sampler=ddpm "
                         "stop=[\".\"] (docs/generation.md).")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for a batch of prompts (default: an empty prompt)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="prompt image, placed before the text (repeatable)")
    add_flags(p, GENERATION_FLAGS, ["mode", "cfg", "image_cfg"])
    p.add_argument("--seed", type=int, default=0, help="document i of the output (prompts outer, samples inner) draws from seed + i")
    p.add_argument("--num", type=int, default=1, help="samples per prompt")
    add_flags(p, GENERATION_FLAGS, ["steps", "max_new_tokens", "max_images", "temperature"])
    add_engine_options(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="do not stream the text as it is written")
    p.add_argument("--retrieve", type=int, default=0, metavar="K",
                   help="prepend K documents retrieved for each prompt from a memory bank (CM3Leon)")
    p.add_argument("--index", default=None, metavar="INDEX",
                   help="the memory bank for --retrieve (`mixmodal index build`; default: the one the model was trained with)")
    p.add_argument("--encoder", default=None, metavar="DIR",
                   help="dual encoder for --retrieve / --rerank clip (default: the index's)")
    p.add_argument("--best-of", type=int, default=1, metavar="N",
                   help="sample N candidates per output document and keep the best (--rerank)")
    p.add_argument("--rerank", choices=["clip", "oracle"], default="clip",
                   help="how --best-of ranks images: the dual encoder's text-image similarity, or the shapes oracle")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.documents import Image
    from mixmodal.inference import End, ImageDone, ImageStarted, TextDelta, generate

    current = [None]
    live = len(args.prompt or [""]) * args.num == 1  # stream one sequence as it is written; a batch at the end

    def show(event) -> None:
        if args.quiet:
            return
        if isinstance(event, End) and not live:
            text = " ".join(f"<image {p.size[0]}x{p.size[1]}>" if isinstance(p, Image) else p.text.strip()
                            for p in event.result.document.parts)
            print(f"[{event.index}] {text}")
        if not live:
            return
        if isinstance(event, TextDelta):
            if current[0] != event.index:
                print(f"\n[{event.index}] ", end="")
                current[0] = event.index
            print(event.text, end="", flush=True)
        elif isinstance(event, ImageStarted):
            print(f"\n[{event.index}] <image {event.image} ...", end="", flush=True)
            current[0] = None
        elif isinstance(event, ImageDone):
            print(f"\n[{event.index}] ... image {event.image} done>", end="", flush=True)
            current[0] = None

    out = generate(args.checkpoint, args.prompt or [""], images=args.image, seed=args.seed, num=args.num,
                   overrides=overrides, out=args.out, device=args.device, dtype=args.dtype, compile=args.compile, on_event=show,
                   retrieve=args.retrieve, index=args.index, encoder=args.encoder, best_of=args.best_of,
                   rerank=args.rerank, **given(args, GENERATION_FLAGS))
    if live and not args.quiet:
        print()
    for r in out.results:
        print(f"[{r.index}] {r.finish_reason}: {len(r.ids)} positions, {len(r.images)} image(s)")
    files = out.files
    print(f"generated {len(out.results)} document(s) in {out.seconds:.1f}s\n"
          f"  documents: {files.jsonl}\n  images:    {files.out_dir / 'images'} ({len(files.images)} PNG)\n"
          f"  page:      {files.html}")
    return 0
