"""`mixmodal eval RUN --suite shapes-chat`: how well a model follows instructions in conversation (issue 20).

The prompts are held-out conversations of the shapes world (data/shapes/conversations.py,
split heldout: unseen scenes of seen parts). Each is played turn by turn as a user would:
the user's turns come from the conversation, the assistant's are the model's own replies,
fed back as context (so a later question is about the picture the model drew). Every reply
is scored by the oracle against what the conversation asked for:

    generate   GenEval-form request: judged as GenEval judges (geneval.judge); full caption:
               the drawn scene exact
    caption    the caption parses back (parse_caption) to the image's scene exactly
    vqa        the answer, normalised as VQA does, equals the reference answer
    edit       exact: the drawn scene is the edited scene; target: the edited object is as
               asked (recoloured, moved, ... or gone) in the drawing; kept: every object the edit
               does not touch is still there, unchanged

A reply's modality is the one its exchange asks for (an image for generate and edit, text for
caption and vqa). Stories are played as context but not scored (the model writes its own plot).
"Multi-turn consistency" is the accuracy of follow-up exchanges (turn 2 and later) whose earlier
images the model drew exactly right, so the reference answer holds for what it drew. Each kind is also
summarised on its exchanges whose context is right (`context_right`: every earlier drawing is the scene
the conversation goes on about, no story before it): an edit of a picture the model drew wrongly starts
from a scene the reference edit does not describe, so the plain accuracy mixes editing with the earlier
drawing. A GenEval-form request ("draw an orange circle") is judged right when the drawing satisfies it,
but the follow-ups ("how many objects?") were written about the world's whole scene, of which the request
named a part: they count as context right only when the drawing is that scene exactly. Edits are
also run with 3-stream instruct guidance (`edit_image_cfg`, InstructPix2Pix / Meta's Chameleon)
beside 2-stream guidance, as `edit_3stream`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixmodal.data.shapes import Edit, Scene, ShapesConfig, parse_caption, parse_image, shapes_document
from mixmodal.data.shapes.captions import CaptionParseError
from mixmodal.data.shapes.geneval import Prompt, judge, scene_things
from mixmodal.documents import Document, Text
from mixmodal.eval.shapes_tasks import sampling
from mixmodal.eval.text_metrics import normalize_answer
from mixmodal.inference.config import GenerationConfig, GuidanceConfig, SamplingParams
from mixmodal.inference.engine import Engine
from mixmodal.inference.prompt import PromptError
from mixmodal.model.bundle import model_folder

SCORED = ("generate", "caption", "vqa", "edit")


@dataclass
class ChatEvalConfig:
    num_conversations: int = 100  # held-out conversations
    chat_turns: int = 3  # most exchanges per conversation
    max_objects: int = 4
    story_length: int = 2
    cfg: float | None = None  # image guidance scale; None: the image mode's GenEval-form default (eval/shapes_suite.py)
    diffusion_steps: int | None = None
    image_temperature: float | None = None
    edit_image_cfg: float = 1.5  # the image scale of the 3-stream edit run; 0: no 3-stream run
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_conversations < 1 or self.batch_size < 1:
            raise ValueError("eval.num_conversations and eval.batch_size must be >= 1")
        if not 1 <= self.chat_turns <= 8:
            raise ValueError(f"eval.chat_turns must be between 1 and 8; got {self.chat_turns}")
        if self.edit_image_cfg < 0:
            raise ValueError(f"eval.edit_image_cfg must be >= 0 (0: no 3-stream run); got {self.edit_image_cfg}")


def conversations(config: ChatEvalConfig, resolution: int) -> list[Document]:
    world = ShapesConfig(resolution=resolution, max_objects=config.max_objects, tasks=["chat"],
                         chat_turns=config.chat_turns, story_length=config.story_length)
    return [shapes_document(world, "heldout", i) for i in range(config.num_conversations)]


def _exchanges(doc: Document) -> list[tuple[list, list, dict]]:
    """(user parts, reference assistant parts, exchange metadata) per exchange, in order."""
    out, k = [], 0
    turns = doc.metadata["turns"]
    for (_, n_user), (_, n_assistant), exchange in zip(turns[0::2], turns[1::2], doc.metadata["exchanges"]):
        out.append((doc.parts[k:k + n_user], doc.parts[k + n_user:k + n_user + n_assistant], exchange))
        k += n_user + n_assistant
    return out


# --- scoring one reply ------------------------------------------------------------------------

def score_edit(drawn: Scene, before: Scene, edit: Edit) -> dict[str, float]:
    """exact: the drawn scene is the edited one; target: the edited object is as asked (a removal counts
    only when something of the scene is still drawn, so an empty or unrelated picture is no removal);
    kept: every untouched object is still there (None for a scene of one object: nothing to keep)."""
    after = edit.apply(before)
    untouched = [o for o in before.objects if o != edit.before]
    kept = [o in drawn.objects for o in untouched]
    if edit.after is not None:
        target = edit.after in drawn.objects
    else:
        target = edit.before not in drawn.objects and any(kept)
    return {"exact": float(drawn == after), "target": float(target),
            "kept": float(all(kept)) if untouched else None}


def score_reply(exchange: dict, reply: Document, scenes: list[Scene]) -> dict[str, float]:
    """The oracle's verdict on one reply (keys per kind; "correct" always)."""
    kind = exchange["kind"]
    images, text = reply.images, " ".join(reply.texts).strip()
    if kind in ("generate", "edit"):
        if not images:
            return {"correct": 0.0, "exact": 0.0, **({"target": 0.0, "kept": 0.0} if kind == "edit" else {})}
        drawn = parse_image(images[0])
        if kind == "edit":
            s = score_edit(drawn, scenes[exchange["before"]], Edit.from_dict(exchange["edit"]))
            return {"correct": s["exact"], **s}
        exact = float(drawn == scenes[exchange["image"]])  # the scene the follow-ups are written about
        if exchange.get("prompt"):
            return {"correct": float(judge(Prompt.from_dict(exchange["prompt"]), scene_things(drawn))[0]),
                    "exact": exact}
        return {"correct": exact, "exact": exact}
    if kind == "caption":
        try:
            return {"correct": float(parse_caption(text) == scenes[exchange["image"]])}
        except (CaptionParseError, ValueError):
            return {"correct": 0.0}
    return {"correct": float(normalize_answer(text) == normalize_answer(exchange["answer"]))}


# --- playing the conversations ----------------------------------------------------------------

def reply_sampling(engine, config: ChatEvalConfig) -> dict:
    """The image sampling the replies use: the config's cfg / diffusion_steps / image_temperature, else the
    model's own (its generation.yaml image_sampling, what `mixmodal chat` uses), else the mode's defaults:
    the shapes suite's rule (eval/shapes_tasks.py sampling)."""
    return sampling(config, engine.mode, getattr(engine, "image_sampling", None))


def _reply_config(engine, kind: str, settings: dict, image_cfg: float | None = None, story_length: int = 2):
    if kind in ("generate", "edit", "story"):
        images = story_length if kind == "story" else 1
        return GenerationConfig(mode="interleaved" if kind == "story" else "image", max_images=images,
                                max_new_tokens=(engine.per_image + 2 + (40 if kind == "story" else 0)) * images,
                                guidance=GuidanceConfig(scale=settings["cfg"], image_scale=image_cfg,
                                                        interval=settings.get("guidance_interval"),
                                                        plausibility=settings.get("plausibility") or 0.0),
                                diffusion_steps=settings["diffusion_steps"],
                                image=SamplingParams(temperature=settings["image_temperature"]))
    return GenerationConfig(mode="text", max_images=0, max_new_tokens=96, text=SamplingParams(temperature=0.0))


def play(engine, docs: list[Document], config: ChatEvalConfig, progress: Callable[[str], None],
         edit_image_cfg: float | None = None) -> list[dict]:
    """Play every conversation; one row per exchange: kind, turn, verdict, context_ok."""
    settings = reply_sampling(engine, config)
    plans = [_exchanges(d) for d in docs]
    scenes = [[Scene.from_dict(s) for s in d.metadata["scenes"]] for d in docs]
    history: list[list] = [[] for _ in docs]  # (role, parts) so far, the model's own replies included
    context_ok = [True] * len(docs)
    rows: list[dict] = []
    for turn in range(max(len(p) for p in plans)):
        live = [c for c, p in enumerate(plans) if turn < len(p)]
        for kind in ("generate", "caption", "vqa", "edit", "story"):
            batch = [c for c in live if plans[c][turn][2]["kind"] == kind]
            for start in range(0, len(batch), config.batch_size):
                chunk = batch[start:start + config.batch_size]
                prompts = []
                for c in chunk:
                    user = plans[c][turn][0]
                    turns = [[role, len(parts)] for role, parts in history[c]] + [["user", len(user)]]
                    parts = [p for _, ps in history[c] for p in ps] + list(user)
                    prompts.append(Document(parts, {"turns": turns}))
                gen = _reply_config(engine, kind, settings, edit_image_cfg if kind == "edit" else None,
                                    config.story_length)
                seeds = [config.seed + 100 * c + turn for c in chunk]
                results = _generate(engine, prompts, gen, seeds)
                for c, result in zip(chunk, results):
                    if result is None:  # the conversation outgrew the model's context: this reply and the rest fail
                        plans[c] = plans[c][:turn]
                        rows.append({"conversation": c, "turn": turn, "kind": kind, "context_ok": context_ok[c],
                                     "reply": "(the conversation is longer than the model's context)", "image": None,
                                     "correct": 0.0, **({"exact": 0.0, "target": 0.0, "kept": 0.0}
                                                        if kind == "edit" else {})})
                        continue
                    user, reference, exchange = plans[c][turn]
                    reply = Document([p for p in result.document.parts
                                      if not (isinstance(p, Text) and not p.text.strip())])
                    history[c] += [("user", list(user)), ("assistant", list(reply.parts))]
                    if kind == "story":  # context only; later turns are about its last picture
                        context_ok[c] = False
                        continue
                    verdict = score_reply(exchange, reply, scenes[c])
                    rows.append({"conversation": c, "turn": turn, "kind": kind, "context_ok": context_ok[c],
                                 "reply": " ".join(reply.texts).strip(), "image": (reply.images or [None])[0],
                                 **_details(exchange, scenes[c]), **verdict})
                    if kind in ("generate", "edit") and verdict["exact"] < 1:
                        context_ok[c] = False  # the follow-ups' reference answers are about a scene not drawn
                progress(f"shapes-chat turn {turn + 1} {kind}: {min(start + len(chunk), len(batch))}/{len(batch)}")
    return rows


def _details(exchange: dict, scenes: list[Scene]) -> dict:
    """What the breakdowns group by: the objects in the scene the exchange is about (an edit's: the
    picture before it), the question's type and reference answer, the edit's operation."""
    about = scenes[exchange["before"] if exchange["kind"] == "edit" else exchange["image"]]
    out: dict = {"objects": len(about.objects)}
    if exchange["kind"] == "vqa":
        out.update(question_type=exchange.get("question_type"), reference=exchange.get("answer"))
    if exchange["kind"] == "edit":
        out["op"] = exchange["edit"]["op"]
    return out


def _generate(engine, prompts: list[Document], gen, seeds: list[int]) -> list:
    """The batch's results; a prompt longer than the model's context gets None (scored wrong), not a crash."""
    try:
        return engine.generate(prompts, gen, seed=seeds)
    except PromptError:
        out = []
        for prompt, seed in zip(prompts, seeds):
            try:
                out += engine.generate([prompt], gen, seed=[seed])
            except PromptError:
                out.append(None)
        return out


def _mean(rows: list[dict], key: str = "correct") -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else float("nan")


BREAKDOWNS = {"vqa": ("question_type", "objects"), "edit": ("op", "objects"), "caption": ("objects",)}


def _by(rows: list[dict], key: str) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get(key) is not None:
            groups.setdefault(str(r[key]), []).append(r)
    return {k: {"accuracy": _mean(v), "n": len(v)} for k, v in sorted(groups.items())}


def summarise(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in SCORED:
        mine = [r for r in rows if r["kind"] == kind]
        right = [r for r in mine if r["context_ok"]]
        out[kind] = {"accuracy": _mean(mine), "n": len(mine),
                     "context_right": {"accuracy": _mean(right), "n": len(right)}}
        if kind in BREAKDOWNS:  # diagnostics, on the exchanges whose context is right
            for key in BREAKDOWNS[kind]:
                out[kind][f"by_{key}"] = _by(right, key)
        if kind == "edit":
            first = [r for r in mine if r["turn"] == 0]
            out[kind].update(target=_mean(mine, "target"), kept=_mean(mine, "kept"),
                             first_turn={"accuracy": _mean(first), "n": len(first)})
    follow = [r for r in rows if r["turn"] > 0 and r["context_ok"]]
    out["multi_turn"] = {"accuracy": _mean(follow), "n": len(follow),
                         "all_follow_ups": _mean([r for r in rows if r["turn"] > 0])}
    scored = [out[k]["accuracy"] for k in SCORED if out[k]["n"]]
    out["overall"] = float(np.mean(scored)) if scored else float("nan")
    return out


def evaluate_chat(checkpoint: str | Path, out: str | Path, config: ChatEvalConfig | None = None, *,
                  device: str = "cpu", progress: Callable[[str], None] = print) -> dict:
    """Run the shapes-chat suite; write OUT/metrics.json and OUT/report.md; return the metrics."""
    config = config or ChatEvalConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_dir = model_folder(checkpoint)
    engine = Engine.from_pretrained(model_dir, device=device)
    if engine.image_tokenizer is None:
        raise ValueError(f"{model_dir} has no image tokenizer: the shapes-chat suite draws and reads images")
    docs = conversations(config, engine.image_tokenizer.config.resolution)
    rows = play(engine, docs, config, progress)
    metrics: dict[str, Any] = {"checkpoint": str(model_dir), "suite": "shapes-chat", "config": asdict(config),
                               "chat_template": engine.chat_template, "image_mode": engine.mode,
                               "sampling": reply_sampling(engine, config), **summarise(rows)}
    if config.edit_image_cfg:
        edits = [d for d in docs if any(e["kind"] == "edit" for e in d.metadata["exchanges"])]
        three = summarise(play(engine, edits, config, progress, edit_image_cfg=config.edit_image_cfg))
        metrics["edit_3stream"] = {"image_cfg": config.edit_image_cfg, **three["edit"]}
    metrics["seconds"] = round(time.time() - started, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    _write_report(out, metrics, rows)
    return metrics


def _write_report(out: Path, metrics: dict, rows: list[dict]) -> None:
    lines = [f"# shapes-chat: {metrics['checkpoint']}", "",
             f"Template: {metrics['chat_template'] or 'none (a base model reads the conversation plainly)'}; "
             f"{metrics['config']['num_conversations']} held-out conversations; {metrics['seconds']} s.", "",
             "| exchange | accuracy | n |", "|---|---|---|"]
    for kind in SCORED:
        m = metrics[kind]
        extra = f" (target {m['target']:.3f}, kept {m['kept']:.3f})" if kind == "edit" else ""
        lines.append(f"| {kind} | {m['accuracy']:.3f}{extra} | {m['n']} |")
    mt = metrics["multi_turn"]
    lines.append(f"| multi-turn (follow-ups on right images) | {mt['accuracy']:.3f} | {mt['n']} |")
    if "edit_3stream" in metrics:
        e = metrics["edit_3stream"]
        lines.append(f"| edit, 3-stream (image cfg {e['image_cfg']}) | {e['accuracy']:.3f} | {e['n']} |")
    lines += ["", f"Overall (mean of the scored exchanges): {metrics['overall']:.3f}", "",
              "On the exchanges whose context is right (every picture the model drew before it exact, so the",
              "reference still holds for what it sees; above, an edit of a wrongly drawn picture is scored",
              "against the reference scene):", "", "| exchange | accuracy, context right | n |", "|---|---|---|"]
    for kind in SCORED:
        m = metrics[kind]["context_right"]
        lines.append(f"| {kind} | {m['accuracy']:.3f} | {m['n']} |")
    first = metrics["edit"]["first_turn"]
    lines.append(f"| edit, opening exchange (the user's picture) | {first['accuracy']:.3f} | {first['n']} |")
    if "edit_3stream" in metrics:
        e = metrics["edit_3stream"]["context_right"]
        lines.append(f"| edit, 3-stream | {e['accuracy']:.3f} | {e['n']} |")
    lines += ["", "Where the misses are (context right; `replies.jsonl` has every reply):", "",
              "| exchange | by | group: accuracy (n) |", "|---|---|---|"]
    for kind, keys in BREAKDOWNS.items():
        for key in keys:
            groups = metrics[kind].get(f"by_{key}", {})
            cells = ", ".join(f"{g}: {m['accuracy']:.2f} ({m['n']})" for g, m in groups.items())
            lines.append(f"| {kind} | {key.replace('_', ' ')} | {cells or '-'} |")
    lines.append("")
    images = out / "images"
    images.mkdir(exist_ok=True)
    lines += ["## Replies", ""]
    with open(out / "replies.jsonl", "w", encoding="utf-8") as f:
        for k, r in enumerate(rows):
            shown = None
            if k < 40:  # the report shows the first 40 replies, with their images
                if r["image"] is not None:
                    shown = f"images/{k:03d}.png"
                    r["image"].save(out / shown)
                lines.append(f"- conversation {r['conversation']} turn {r['turn'] + 1} {r['kind']}: "
                             f"{'right' if r['correct'] else 'wrong'} — {r['reply'][:80]!r}"
                             + (f" ![]({shown})" if shown else ""))
            f.write(json.dumps({**{key: v for key, v in r.items() if key != "image"}, "image": shown}) + "\n")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


__all__ = ["BREAKDOWNS", "ChatEvalConfig", "SCORED", "conversations", "evaluate_chat", "play", "reply_sampling", "score_edit", "score_reply",
           "summarise"]
