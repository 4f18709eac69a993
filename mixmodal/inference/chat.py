"""`mixmodal chat RUN`: an interactive terminal conversation with a model, and its Python twin `ChatSession`.

    session = ChatSession(engine, GenerationConfig(mode="interleaved"), out="chat_out")
    reply = session.ask("draw two red stars")       # a Document: the assistant's text and images
    session.ask("how many stars are there?")        # a later turn sees the whole conversation
    session.save()                                  # chat_out/conversation.jsonl (the `messages` form) + PNGs

The conversation is a document with turns (data/chat.py), laid out in the model's chat template
(generation.yaml `chat_template`), exactly as `mixmodal serve` lays out a chat request. Turn k
draws from seed + k, so the same inputs give the same conversation.

In the terminal: type a message; `/image PATH` attaches an image to the next message; `/reset`
starts over; `/save [FILE]` writes the conversation; `/quit` (or Ctrl-D) ends. Generated images
are saved under --out and their paths printed; in a terminal that shows pictures (kitty, iTerm2,
WezTerm) they are also drawn inline.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from pathlib import Path
from typing import Callable, TextIO

import PIL.Image

from mixmodal.documents import Document, Image, Text, write_jsonl
from mixmodal.inference.config import GenerationConfig
from mixmodal.inference.events import End, Event, ImageDone, TextDelta
from mixmodal.inference.prompt import PromptError, load_prompt_image

HELP = "commands: /image PATH (attach to the next message), /reset, /save [FILE], /help, /quit"


class ChatSession:
    def __init__(self, engine, config: GenerationConfig | None = None, *, seed: int = 0,
                 out: str | os.PathLike = "chat_out", system: str = "") -> None:
        self.engine, self.config, self.seed = engine, config or GenerationConfig(), seed
        self.out = Path(out)
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.parts: list = []
        self.turns: list[list] = []
        self.pending: list[PIL.Image.Image] = []  # images attached to the next message
        self.images_saved = 0
        if self.system:
            self._add("system", [Text(self.system)])

    def _add(self, role: str, parts: list) -> None:
        self.parts += parts
        self.turns.append([role, len(parts)])

    def attach(self, path: str | os.PathLike) -> None:
        """Attach an image file to the next message (PromptError naming the file when it cannot be read)."""
        self.pending.append(load_prompt_image(path).image)

    def document(self) -> Document:
        return Document(list(self.parts), {"turns": [list(t) for t in self.turns]})

    def ask(self, text: str, on_event: Callable[[Event], None] | None = None) -> Document:
        """Send a user message (with any attached images first) and return the assistant's reply."""
        user = [Image(im, origin="attached") for im in self.pending] + ([Text(text)] if text else [])
        if not user:
            raise PromptError("an empty message: type some text or attach an image with /image PATH")
        state = (list(self.parts), [list(t) for t in self.turns])
        self._add("user", user)
        seed = self.seed + sum(role == "assistant" for role, _ in self.turns)
        reply = None
        try:
            for event in self.engine.stream(self.document(), self.config, seed=seed):
                if on_event is not None:
                    on_event(event)
                if isinstance(event, End):
                    reply = event.result.document
        except BaseException:  # a message that fails (or is interrupted) is not part of the conversation
            self.parts, self.turns = state
            raise
        self.pending = []
        parts = [p for p in reply.parts if not (isinstance(p, Text) and not p.text.strip())]
        self._add("assistant", parts)
        return Document(parts)

    def save_image(self, image: PIL.Image.Image) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"image_{self.images_saved:03d}.png"
        image.save(path)
        self.images_saved += 1
        return path

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """The conversation as documents JSONL (the `messages` form), its images beside it."""
        path = Path(path) if path else self.out / "conversation.jsonl"
        write_jsonl([self.document()], path)
        return path


def inline_image(image: PIL.Image.Image, env: dict | None = None, scale: int = 4) -> str:
    """The escape sequence that draws `image` in this terminal (kitty's or iTerm2's protocol), or ""."""
    env = os.environ if env is None else env
    big = image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    if env.get("TERM") == "xterm-kitty" or "KITTY_WINDOW_ID" in env:
        chunks = [data[i:i + 4096] for i in range(0, len(data), 4096)]
        return "".join(f"\x1b_G{'a=T,f=100,' if k == 0 else ''}m={int(k < len(chunks) - 1)};{c}\x1b\\"
                       for k, c in enumerate(chunks)) + "\n"
    if env.get("TERM_PROGRAM") in ("iTerm.app", "WezTerm"):
        return f"\x1b]1337;File=inline=1;size={len(buf.getvalue())}:{data}\x07\n"
    return ""


def run_repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """The terminal loop: returns 0 at /quit or end of input."""
    history = Path.home() / ".mixmodal_chat_history"
    try:
        import readline  # line editing and history where the platform has it

        try:
            readline.read_history_file(history)
        except OSError:
            pass
    except ImportError:
        readline = None
    print(f"mixmodal chat ({HELP})", file=out)
    try:
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                print(file=out)
                return 0
            except KeyboardInterrupt:
                print("\n(Ctrl-D or /quit to leave)", file=out)
                continue
            if not line:
                continue
            if line.startswith("/"):
                command, _, arg = line.partition(" ")
                if command in ("/quit", "/exit"):
                    return 0
                if command == "/help":
                    print(HELP, file=out)
                elif command == "/reset":
                    session.reset()
                    print("(conversation cleared)", file=out)
                elif command == "/image":
                    try:
                        session.attach(arg.strip())
                        print(f"(attached {arg.strip()}; it goes with your next message)", file=out)
                    except PromptError as e:
                        print(f"error: {e}", file=out)
                elif command == "/save":
                    print(f"(saved {session.save(arg.strip() or None)})", file=out)
                else:
                    print(f"unknown command {command}; {HELP}", file=out)
                continue
            _answer(session, line, out)
    finally:
        if readline is not None:
            try:
                readline.write_history_file(history)
            except OSError:
                pass


def _answer(session: ChatSession, line: str, out: TextIO) -> None:
    print("model> ", end="", file=out, flush=True)

    def show(event: Event) -> None:
        if isinstance(event, TextDelta):
            print(event.text, end="", file=out, flush=True)
        elif isinstance(event, ImageDone) and event.pil is not None:
            path = session.save_image(event.pil)
            print(f"\n[image {path}]", file=out, flush=True)
            drawn = inline_image(event.pil) if out.isatty() else ""
            if drawn:
                print(drawn, end="", file=out, flush=True)

    try:
        session.ask(line, show)
    except (PromptError, ValueError) as e:
        print(f"\nerror: {e}", file=out)
        return
    except KeyboardInterrupt:
        print("\n(interrupted; the message was dropped)", file=out)
        return
    print(file=out, flush=True)


__all__ = ["ChatSession", "HELP", "inline_image", "run_repl"]
