"""Skipping and counting bad input, or failing on the first one when asked to be strict.

Every reader takes a BadInputLog. A bad record is reported with where it is
(`file:line`, `shard.tar:member`) and why; by default it is skipped and counted, and
`summary()` lists the counts with examples. With `strict=True` the first one raises
BadInputError carrying the same message.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Reasons a record is skipped. Readers use these names so that summaries agree.
MALFORMED_JSON = "malformed-json"
BAD_SCHEMA = "bad-schema"
NOT_UTF8 = "not-utf8"
MISSING_IMAGE = "missing-image"
CORRUPT_IMAGE = "corrupt-image"
TRUNCATED_IMAGE = "truncated-image"
TOO_MANY_PIXELS = "too-many-pixels"
EMPTY_DOCUMENT = "empty-document"
MISSING_FIELD = "missing-field"
BAD_SHARD = "bad-shard"  # a tar shard (or .jsonl.gz) that cannot be opened or read to its end


class BadInputError(ValueError):
    """Raised in strict mode for the first bad record; the message names where and why."""


@dataclass
class BadInputLog:
    strict: bool = False
    max_examples: int = 5
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> ["where: detail", ...]

    def skip(self, where: str, reason: str, detail: str) -> None:
        """Record a bad record (raises BadInputError in strict mode)."""
        message = f"{where}: {reason}: {detail}"
        if self.strict:
            raise BadInputError(message + " (strict mode; pass strict=False to skip and count such records)")
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(f"{where}: {detail}")

    def convert(self, what: str) -> None:
        """Count a documented, lossless-enough conversion (e.g. 'CMYK->RGB'); never fatal."""
        self.converted[what] += 1

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "BadInputLog") -> None:
        self.skipped.update(other.skipped)
        self.converted.update(other.converted)
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: max(0, self.max_examples - len(mine))])

    def summary(self) -> str:
        if not self.skipped and not self.converted:
            return "bad input: none"
        lines = [f"bad input: {self.num_skipped} record(s) skipped"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    {example}" for example in self.examples.get(reason, []))
        if self.converted:
            lines.append("converted: " + ", ".join(f"{k} x{n}" for k, n in self.converted.most_common()))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"skipped": dict(self.skipped), "converted": dict(self.converted), "examples": self.examples}
