"""`mixmodal serve CHECKPOINT`: an OpenAI-compatible HTTP server with continuous batching (docs/serve.md)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mixmodal.cli.common import add_engine_options


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (docs/serve.md)",
                         description="Serve CHECKPOINT over HTTP: POST /v1/chat/completions (interleaved text and "
                         "images, SSE streaming), POST /v1/images/generations, GET /v1/models, /health, /metrics.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (each guidance stream is a row)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting before requests get 429")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $MIXMODAL_API_KEY, else none)")
    p.add_argument("--max-tokens", type=int, default=1024, help="limit on a request's max_tokens")
    p.add_argument("--index", default=None, metavar="INDEX",
                   help="memory bank for requests with `retrieve: k` (default: the one the model was trained with, if any)")
    p.add_argument("--encoder", default=None, metavar="DIR", help="dual encoder for --index (default: the index's)")
    add_engine_options(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    import uvicorn

    from mixmodal.inference.checkpoint import load_checkpoint, read_retrieval_settings
    from mixmodal.inference.generate import DTYPES, open_retriever
    from mixmodal.serve import Limits, Scheduler, create_app

    if overrides:
        raise SystemExit(f"mixmodal serve takes no key=value overrides; got {' '.join(overrides)} (sampling options "
                         "are per request: docs/serve.md)")
    engine = load_checkpoint(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype], require_image_tokenizer=False,
                             compile=args.compile)
    scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=args.max_queue)
    name = Path(args.checkpoint).resolve().name
    if name == "model":
        name = Path(args.checkpoint).resolve().parent.name
    api_key = args.api_key or os.environ.get("MIXMODAL_API_KEY") or None
    retriever = None
    if args.index or (read_retrieval_settings(args.checkpoint) or {}).get("index"):
        from dataclasses import replace

        from mixmodal.retrieval.select import Retriever

        opened = open_retriever(args.checkpoint, args.index, args.encoder, 1, args.device)

        def retriever(prompt, k):
            return Retriever(opened.bank, opened.embedder, replace(opened.config, k=k)).retrieve_documents([prompt])[0]
    app = create_app(scheduler, model_name=name, api_key=api_key, limits=Limits(max_tokens=args.max_tokens),
                     retriever=retriever)
    print(f"mixmodal: serving {args.checkpoint} as {name!r} on http://{args.host}:{args.port} "
          f"({engine.mode} mode{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
