"""Byte-level BPE text tokenizer, built on Hugging Face `tokenizers`.

The special tokens of `mixmodal.vocab` are the tokenizer's first ids, in order, so a
`tokenizer.json` written here also loads in `transformers.PreTrainedTokenizerFast`.
Text is encoded with special-token matching switched off: a document that happens to
contain the string "<boi>" gets ordinary text tokens for it, never a control id. Control
ids are placed by the data pipeline from `Vocab`, the one source of ids.

Byte-level BPE with no normalizer and no prefix space makes decode(encode(s)) == s for
every Unicode string.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mixmodal import vocab as V

TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = V.NUM_SPECIAL + 256  # specials + the 256-byte alphabet


@dataclass
class TextTokenizerConfig:
    """How to train the text tokenizer."""

    vocab_size: int = 4096  # total ids, special tokens included
    min_frequency: int = 2  # a merge must occur at least this often
    max_texts: int | None = None  # train on at most this many text parts (None: all)

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={self.vocab_size} is too small: byte-level BPE needs at least "
                f"{MIN_VOCAB_SIZE} ids ({V.NUM_SPECIAL} special tokens + 256 bytes)"
            )
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")


def checked_text(text: str) -> str:
    """`text`, or a ValueError saying it is not text: not a str, or holding bytes that were not UTF-8
    (a command line or file decoded with surrogateescape carries them as lone surrogates)."""
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {type(text).__name__}: {str(text)[:60]!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid UTF-8 (an undecodable byte at character {e.start}: "
                         f"{text[max(e.start - 20, 0):e.start]!r}...); pass UTF-8 text") from None
    return text


class TextTokenizer:
    """Encode/decode text to ids of the shared vocabulary's text range.

    never_sample / stop_ids tell the engine which text-range ids it must never sample and which
    end a sequence; a converted Chameleon's adapter (interop/chameleon_tokenizer.py) sets its own."""

    never_sample: tuple[int, ...] = ()
    # <|end|> closes an assistant's turn (data/chat.py): a reply stops there, not in a made-up next turn
    stop_ids: tuple[int, ...] = (V.special_id(V.EOS), V.special_id(V.END_OF_TURN))

    def __init__(self, tokenizer: Tokenizer, origin: str = "<in memory>") -> None:
        for i, token in enumerate(V.SPECIAL_TOKENS):
            got = tokenizer.token_to_id(token)
            if got != i:
                raise ValueError(
                    f"{origin}: special token {token!r} has id {got}, but mixmodal.vocab expects {i}; "
                    "this tokenizer was not trained by mixmodal (or by an incompatible version). "
                    "Retrain it with `mixmodal tokenizer train SOURCE --out DIR`."
                )
        tokenizer.encode_special_tokens = True  # text never produces control ids
        self._tokenizer = tokenizer

    # --- training ----------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], config: TextTokenizerConfig | None = None) -> "TextTokenizer":
        config = config or TextTokenizerConfig()
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=list(V.SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(_limit(texts, config.max_texts), trainer=trainer)
        return cls(tokenizer)

    # --- io ----------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> Path:
        """out_dir/tokenizer.json, tokenizer_config.json and last manifest.json (weights.py: sizes and SHA-256s,
        which `load` checks)."""
        from mixmodal.weights import write_manifest  # late: mixmodal.weights imports torch; this module does not

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / TOKENIZER_FILE
        tmp = path.with_name(path.name + ".tmp")
        self._tokenizer.save(str(tmp))
        os.replace(tmp, path)
        # Lets transformers' AutoTokenizer / PreTrainedTokenizerFast open the folder too.
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": V.BOS,
                    "eos_token": V.EOS,
                    "pad_token": V.PAD,
                    "add_prefix_space": False,
                },
                indent=2,
            )
        )
        write_manifest(out, [TOKENIZER_FILE, "tokenizer_config.json"])
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> "TextTokenizer":
        """Load from a folder holding tokenizer.json, or from the file itself; the folder's manifest.json, when
        it has one, is checked first (weights.py; `verify=False`: the caller checked a manifest listing it)."""
        from contextlib import nullcontext

        from mixmodal.weights import checked_folder  # late: as in save

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} at {path}; train one with `mixmodal tokenizer train SOURCE --out DIR`"
            )
        fix = "copy the tokenizer folder again, or train one with `mixmodal tokenizer train SOURCE --out DIR`"
        with checked_folder(path.parent, fix, only=[path.name]) if verify else nullcontext():
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:  # the library raises a bare Exception on bad JSON
                raise ValueError(f"{path} is not a valid tokenizers JSON file ({' '.join(str(e).split())}): it is "
                                 f"truncated or not a tokenizer; {fix}") from None
        return cls(tokenizer, origin=str(path))

    # --- use ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the text tokenizer uses, special tokens included (= Vocab.text_size)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def vocab(self, num_image_codes: int = 0) -> V.Vocab:
        return V.Vocab(text_size=self.vocab_size, num_image_codes=num_image_codes)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(checked_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch([checked_text(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode text ids; special ids are dropped (they are not text)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tokenizer.id_to_token(i)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer


def _limit(texts: Iterable[str], n: int | None) -> Iterable[str]:
    for i, t in enumerate(texts):
        if n is not None and i >= n:
            return
        yield t
