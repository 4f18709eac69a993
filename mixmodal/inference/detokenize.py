"""Incremental detokenization of one text run (vLLM's incremental detokenizer): each new id's
text is the difference between a short window decoded before and after it, so streaming costs
a few ids per step, not the whole run; an id that ends inside a UTF-8 character (the decoder
shows U+FFFD) waits for the next one. Stop strings cut the run's text where they begin.

    run = IncrementalDetokenizer(tokenizer)
    delta = run.add(token_id)                  # text to stream now ("" while a character is open)
    delta, stopped = run.stop_at(["\\n\\n"], delta)
    rest = run.flush()                         # the run ended: what the decoder still held back
    run.text                                   # the run's text (cut at the stop string, if one hit)
"""

from __future__ import annotations

from typing import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""  # text streamed so far
        self._window = (0, 0)  # (window start, ids already read)
        self._cut: str | None = None  # the run's text, cut at a stop string

    def add(self, token: int) -> str:
        """Append one id; the text it adds to the stream (may be "")."""
        self.ids.append(token)
        start, read = self._window
        before = self.tokenizer.decode(self.ids[start:read])
        after = self.tokenizer.decode(self.ids[start:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._window = (read, len(self.ids))
        delta = after[len(before):]
        self.emitted += delta
        return delta

    def stop_at(self, stops: Sequence[str], delta: str) -> tuple[str, bool]:
        """(delta, stopped): if a stop string now appears in the streamed text, the run's text ends
        where it begins and the delta keeps only what comes before it."""
        if not delta:
            return delta, False
        stop = next((s for s in stops if s and s in self.emitted), None)
        if stop is None:
            return delta, False
        cut = self.emitted.index(stop)
        delta = delta[:max(0, cut - (len(self.emitted) - len(delta)))]
        self.emitted = self._cut = self.emitted[:cut]
        return delta, True

    def flush(self) -> str:
        """The run ended: the text the decoder still held back (an unfinished character), streamed."""
        if self._cut is not None:
            return ""
        rest = self.tokenizer.decode(self.ids)[len(self.emitted):]
        self.emitted += rest
        return rest

    @property
    def text(self) -> str:
        return self._cut if self._cut is not None else self.tokenizer.decode(self.ids)


__all__ = ["IncrementalDetokenizer"]
