"""`mixmodal chat CHECKPOINT`: a conversation in the terminal, text, /image attachments, drawn replies
(docs/chat.md). Its generation-config flags are GENERATION_FLAGS (mixmodal/flags.py), worded for replies."""

from __future__ import annotations

import argparse
import sys

from mixmodal.cli.common import add_engine_options
from mixmodal.flags import GENERATION_FLAGS, add_flags, given


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("chat", help="talk to a model in the terminal: text, /image attachments, drawn replies",
                         description="An interactive conversation with CHECKPOINT in its chat template (a model "
                         "fine-tuned on conversations; a base model reads the conversation plainly). Commands: "
                         "/image PATH, /reset, /save [FILE], /help, /quit. Generated images are saved under --out.",
                         epilog="Trailing key=value arguments override fields of the generation config, as for "
                         "`mixmodal generate`.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    add_flags(p, GENERATION_FLAGS, ["mode", "cfg", "image_cfg", "steps", "max_new_tokens", "temperature"], help={
        "mode": "what a reply may hold (default interleaved)",
        "cfg": "classifier-free guidance scale for drawn images",
        "image_cfg": "image-conditioning guidance scale (edits)",
        "steps": "denoising steps per image (latent mode)",
        "max_new_tokens": "positions a reply writes at most",
    })
    p.add_argument("--seed", type=int, default=0, help="reply k draws from seed + k")
    p.add_argument("--system", default="", help="a system message that opens the conversation")
    add_engine_options(p)
    p.add_argument("--out", default="chat_out", help="where drawn images and /save go (default chat_out)")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.inference.chat import ChatSession, run_repl
    from mixmodal.inference.checkpoint import load_checkpoint
    from mixmodal.inference.generate import DTYPES, generation_config
    from mixmodal.model.bundle import read_image_sampling

    # the model's stated image sampling first (generation.yaml; what the shapes-chat eval scores), flags over it
    config = generation_config(**given(args, GENERATION_FLAGS), overrides=overrides,
                               image_sampling=read_image_sampling(args.checkpoint))
    engine = load_checkpoint(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype],
                             require_image_tokenizer=config.mode != "text", compile=args.compile)
    if engine.chat_template is None:
        print(f"note: {args.checkpoint} was never tuned on conversations (no chat_template in its generation.yaml): "
              "it reads the conversation as plain text and images", file=sys.stderr)
    return run_repl(ChatSession(engine, config, seed=args.seed, out=args.out, system=args.system))
