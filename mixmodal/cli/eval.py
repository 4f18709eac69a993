"""`mixmodal eval`: an evaluation suite on a trained model -> metrics.json + report (docs/eval.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixmodal.cli.common import read_yaml
from mixmodal.eval.report import headline


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("eval", help="evaluate a trained model: text->image oracle accuracy, FID, CLIP score, "
                         "captioning, VQA, perplexity, training FLOPs -> metrics.json + report",
                         description="Run an evaluation suite on a model folder (or its run directory) and write "
                         "OUT/metrics.json, OUT/report.md and OUT/report.html. key=value overrides set the suite's "
                         "fields (num_prompts=200 cfg=3.0 max_objects=2 splits=[heldout] ...; docs/eval.md).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run directory or its model/ folder")
    p.add_argument("--suite", default="shapes",
                   help="shapes (default): text-to-image, captions, VQA, FID; shapes-chat: instruction following in "
                   "conversation (edits, VQA, drawing, multi-turn consistency; docs/chat.md)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=None, help="a YAML file of suite fields (overrides still apply on top)")
    p.add_argument("--quick", action="store_true", help="32 prompts per task instead of 200, 8 x 2 images per GenEval "
                   "category (a smoke test; noisy numbers)")
    p.add_argument("--sweep", action="store_true", help="instead of the suite: GenEval-form accuracy on the validation "
                   "prompts for a grid of sampling settings (CFG scale, temperature / top-k, CD-K; denoising steps) "
                   "-> OUT/sweep.md; the defaults the suite uses were chosen this way (docs/eval.md)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth) for comparable FID; "
                   "without it FID uses mixmodal's shapes feature net (trained once, cached), labelled not comparable")
    p.add_argument("--feature-net", default=None, metavar="DIR", help="a feature net folder for FID (default: the cached one)")
    p.add_argument("--encoder", default=None, metavar="DIR", help="a dual encoder for the CLIP score (default: none)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.config import build_config
    from mixmodal.eval.shapes_suite import ShapesEvalConfig, evaluate

    if args.suite not in ("shapes", "shapes-chat"):
        raise ValueError(f"--suite {args.suite}: the suites are shapes (the built-in world: text-to-image, captions, "
                         "VQA) and shapes-chat (instruction following in conversation)")
    preset = read_yaml(args.config) if args.config else {}
    if args.suite == "shapes-chat":
        from mixmodal.eval.chat_suite import ChatEvalConfig, evaluate_chat

        metrics = evaluate_chat(args.checkpoint, args.out, build_config(ChatEvalConfig, preset, overrides),
                                device=args.device, progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps({k: metrics[k] for k in ("overall", "generate", "caption", "vqa", "edit", "multi_turn")},
                         indent=1))
        print(f"report: {Path(args.out) / 'report.md'}")
        return 0
    if args.quick:  # a smoke test's suite fields: package data (pyproject.toml), found wherever mixmodal is installed
        from importlib.resources import files

        preset = {**read_yaml(str(files("mixmodal.eval") / "quick.yaml")), **preset}
    if args.sweep:
        from mixmodal.eval.shapes_suite import SWEEP_PRESET, sweep

        config = build_config(ShapesEvalConfig, {**SWEEP_PRESET, **preset}, overrides)
        result = sweep(args.checkpoint, args.out, config, device=args.device,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps({"best": result["best"]}, indent=1))
        print(f"sweep: {Path(args.out) / 'sweep.md'}")
        return 0

    config = build_config(ShapesEvalConfig, preset, overrides)
    metrics = evaluate(args.checkpoint, args.out, config, inception=args.inception, feature_net=args.feature_net,
                       encoder=args.encoder, device=args.device,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(headline(metrics), indent=1))
    out = Path(args.out)
    print(f"metrics: {out / 'metrics.json'}\nreport:  {out / 'report.md'}\nhtml:    {out / 'report.html'}")
    return 0
