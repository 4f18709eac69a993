"""Conversations: the chat template over the vocabulary's role tokens, for training and generation.

A conversation is a Document whose parts are the turns' parts in order, with
`metadata["turns"] = [[role, number of parts], ...]` saying which parts each turn holds (a
turn may hold text and images, or nothing). In a documents JSONL it is written in the
`messages` form (docs/data.md), which `record_to_document` flattens into exactly that:

    {"messages": [{"role": "user", "parts": [{"type": "image", "path": "a.png"},
                                             {"type": "text", "text": "Make the circle green."}]},
                  {"role": "assistant", "parts": [{"type": "image", "path": "b.png"}]}]}

    ("content": "a string" is short for one text part.)

Laid out by the one layout (data/layout.py) as

    <bos> <|system|> ... <|end|> <|user|> text <boi> IMAGE <eoi> <|end|> <|assistant|> ... <|end|> <eos>

That is the "mixmodal" template. A converted Chameleon has no role tokens (its role slots hold
untrained rows), so its "chameleon" template is Meta's: each turn's content then `<|end|>`
(Chameleon's `<reserved08706>`), and the reply follows directly:

    <bos> text <boi> IMAGE <eoi> <|end|> reply ... <|end|>

Only assistant turns are targets (their text, their images and their closing `<|end|>`):
role tokens, system and user turns carry no loss, and their images, in latent mode, are fed
clean and get no diffusion loss (they are what the model reads, not what it writes). A
generation prompt is the conversation so far followed by `<|assistant|>`; the reply ends at
`<|end|>`. The same function lays out both, so a prompt is a prefix of the training row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mixmodal.data.segments import Segment
from mixmodal.vocab import Vocab

ROLES = ("system", "user", "assistant")
TARGET_ROLE = "assistant"
TEMPLATES = ("mixmodal", "chameleon")  # with role tokens; Meta's Chameleon (turns closed by <|end|> only)


@dataclass(frozen=True)
class Turn:
    role: str
    parts: int  # how many of the document's parts, in order, this turn holds


def turns_of(metadata: dict, num_parts: int, where: str = "metadata") -> list[Turn] | None:
    """The turns of a conversation document (None when `metadata` has no "turns"); raises
    ValueError naming the field when they do not describe the document's parts."""
    raw = metadata.get("turns")
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f'{where}.turns must be a non-empty list of [role, number of parts]; got {raw!r}')
    turns = []
    for i, item in enumerate(raw):
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or item[0] not in ROLES
                or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0):
            raise ValueError(f"{where}.turns[{i}] must be [role, parts] with role one of {', '.join(ROLES)} "
                             f"and parts a count >= 0; got {item!r}")
        turns.append(Turn(item[0], item[1]))
    total = sum(t.parts for t in turns)
    if total != num_parts:
        raise ValueError(f"{where}.turns hold {total} parts but the document has {num_parts}; "
                         "each turn's count must match its parts, in order")
    return turns


def role_token(vocab: Vocab, role: str) -> int:
    return {"system": vocab.system, "user": vocab.user, "assistant": vocab.assistant}[role]


def chat_segments(part_segments: Sequence[Sequence[Segment]], turns: Sequence[Turn], vocab: Vocab, *,
                  add_generation_prompt: bool = False, template: str = "mixmodal") -> list[Segment]:
    """The segments of a conversation: `part_segments[k]` are the segments of part k (an empty
    list for a text part with no tokens). Loss only on assistant turns; `add_generation_prompt`
    appends `<|assistant|>` (mixmodal template; nothing for chameleon), the prompt the model answers."""
    if template not in TEMPLATES:
        raise ValueError(f"chat template must be one of {', '.join(TEMPLATES)}; got {template!r}")
    roles = template == "mixmodal"
    if sum(t.parts for t in turns) != len(part_segments):
        raise ValueError(f"turns hold {sum(t.parts for t in turns)} parts; got {len(part_segments)}")
    out: list[Segment] = []
    k = 0
    for turn in turns:
        target = turn.role == TARGET_ROLE
        if roles:
            out.append(Segment("text", [role_token(vocab, turn.role)], loss=False))
        for segments in part_segments[k:k + turn.parts]:
            out += [Segment(s.kind, list(s.ids), s.image, loss=target) for s in segments]
        k += turn.parts
        out.append(Segment("text", [vocab.end_of_turn], loss=target))
    if add_generation_prompt and roles:
        out.append(Segment("text", [vocab.assistant], loss=False))
    return out


def messages_to_parts(messages: object, where: str = "messages") -> tuple[list[dict], list[list]]:
    """The JSONL `messages` form -> (parts in the `parts` form, turns). Raises ValueError naming
    the field that breaks the form."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where} must be a non-empty list of {{"role": ..., "parts": [...]}} objects')
    parts: list[dict] = []
    turns: list[list] = []
    for i, message in enumerate(messages):
        here = f"{where}[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f'{here} must be an object with "role": one of {", ".join(ROLES)}')
        if "content" in message and "parts" in message:
            raise ValueError(f'{here} has both "content" and "parts"; give one')
        if "content" in message:
            if not isinstance(message["content"], str):
                raise ValueError(f'{here}.content must be a string (use "parts" for images)')
            items = [{"type": "text", "text": message["content"]}]
        else:
            items = message.get("parts")
            if not isinstance(items, list):
                raise ValueError(f'{here} needs "parts": a list of text/image parts, or "content": a string')
        parts += items
        turns.append([message["role"], len(items)])
    return parts, turns


def parts_to_messages(parts: list[dict], turns: Sequence[Sequence]) -> list[dict]:
    """The inverse of messages_to_parts (records written by `document_to_record`)."""
    out, k = [], 0
    for role, n in turns:
        out.append({"role": role, "parts": parts[k:k + n]})
        k += n
    return out


__all__ = ["ROLES", "TARGET_ROLE", "TEMPLATES", "Turn", "chat_segments", "messages_to_parts", "parts_to_messages", "role_token",
           "turns_of"]
