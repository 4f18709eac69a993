"""Chameleon's text vocabulary inside mixmodal: where its special tokens go, and the tokenizer adapter.

`convert hf-chameleon` permutes the vocabulary so that Chameleon's special tokens sit in
mixmodal's special slots (found by name, never from config.json's *_token_id fields, which
are stale on the hub: bos_token_id=1 is <pad>):

    mixmodal slot        Chameleon token        why
    <pad> 0              <pad>
    <bos> 1              <s>                    Meta puts one at the start of a prompt
    <eos> 2              </s>
    <boi> 3              <racm3:break>          begin of image
    <eoi> 4              <eoss>                 end of image (NOT mixmodal's <eoss> slot 5,
                                                which means CM3 end-of-span: same name, other token)
    <|end|> 17           <reserved08706>        end of turn (Meta's eot, HF's sep, Lumina's stop)
    the other 12 slots   unused <reservedNNNNN> untrained rows ("fillers"), chosen here

Never sampled (Meta's `VocabInfo`): a name that starts with "<" (other than "<" itself) is
not text, and an id without a name is not a token. Those ids, except the ones in the <eos>,
<|end|> and <boi> slots, go to vocab_map.json's never_sample; the engine masks them.

`ChameleonTokenizer` wraps Chameleon's own `tokenizers` file (MODEL/text_tokenizer/
tokenizer.json, copied from the source) and maps ids through vocab_map.json both ways, so
the engine, `mixmodal generate` and `mixmodal serve` use it as they use `TextTokenizer`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from mixmodal import vocab as V
from mixmodal.interop.vocab_map import VOCAB_MAP_FILE, VocabMap
from mixmodal.tokenizers.text import checked_text

# mixmodal special token -> Chameleon's name for it (facebookresearch/chameleon, inference/vocab.py)
CHAMELEON_SPECIALS = {V.PAD: "<pad>", V.BOS: "<s>", V.EOS: "</s>", V.BOI: "<racm3:break>", V.EOI: "<eoss>",
                      V.END_OF_TURN: "<reserved08706>"}
SOURCE_TOKENIZER_FILES = ("tokenizer.json", "text_tokenizer.json")  # transformers' folder, Meta's release
_RESERVED = re.compile(r"^<reserved(\d{5})>$")
# not fillers: 08706 end of turn, 08707 (transformers' <image>), 08796..08899 (Lumina-mGPT's row and size tokens)
_USED_RESERVED = {8706, 8707, *range(8796, 8900)}
_FILLER_FROM = 8708  # 08708.. are unused by every codebase read (docs/chameleon-reference.md); lower ones last


def is_text_name(name: str) -> bool:
    """Meta's rule: a name that starts with "<" (other than "<" itself) is a special token, not text."""
    return not (name.startswith("<") and name != "<")


@dataclass(frozen=True)
class SpecialLayout:
    hf_ids: list[int]  # the Chameleon id in each of mixmodal's special slots
    names: dict[str, str]  # mixmodal name -> Chameleon name, in slot order
    not_text: list[int]  # Chameleon ids never to sample (image ids are the caller's to drop)


def special_layout(names: dict[str, int], vocab_size: int) -> SpecialLayout | str:
    """Where Chameleon's special tokens go, from the source's vocabulary (name -> id); a string
    saying what is missing when the vocabulary does not have them."""
    missing = [n for n in CHAMELEON_SPECIALS.values() if n not in names]
    if missing:
        return f"the vocabulary has no {', '.join(missing)}"
    reserved = [(int(m[1]), name) for name in names if (m := _RESERVED.match(name))]
    free = [name for number, name in sorted(reserved, key=lambda r: (r[0] < _FILLER_FROM, r[0]))
            if number not in _USED_RESERVED]
    need = V.NUM_SPECIAL - len(CHAMELEON_SPECIALS)
    if len(free) < need:
        return f"the vocabulary has {len(free)} unused <reservedNNNNN> tokens for mixmodal's {need} other special slots"
    fillers = iter(free)
    slot_names = {token: CHAMELEON_SPECIALS.get(token) or next(fillers) for token in V.SPECIAL_TOKENS}
    hf_ids = [names[n] for n in slot_names.values()]
    if len(set(hf_ids)) != len(hf_ids) or not all(0 <= i < vocab_size for i in hf_ids):
        return (f"the vocabulary gives {', '.join(slot_names.values())} ids {hf_ids}: not distinct ids below "
                f"{vocab_size}")
    keep = {names[CHAMELEON_SPECIALS[t]] for t in (V.EOS, V.END_OF_TURN, V.BOI)}
    text = {i for name, i in names.items() if is_text_name(name)}
    not_text = [i for i in range(vocab_size) if i not in text and i not in keep]
    return SpecialLayout(hf_ids, slot_names, not_text)


def read_source_tokenizer(src: Path) -> tuple[Tokenizer, Path] | None:
    """The source folder's text tokenizer (tokenizer.json, else Meta's text_tokenizer.json), or None."""
    path = next((src / name for name in SOURCE_TOKENIZER_FILES if (src / name).is_file()), None)
    return (_read(path), path) if path is not None else None


def _read(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a valid tokenizers JSON file ({' '.join(str(e).split())}): it is truncated or "
                         "not a tokenizer; copy it again from the transformers folder (tokenizer.json, or Meta's "
                         "text_tokenizer.json)") from None


def _check_specials(vocab_map, origin: str) -> None:
    if vocab_map.special_tokens is None:
        names = ", ".join(CHAMELEON_SPECIALS.values())
        raise ValueError(f"{origin}: no Chameleon tokens are mapped to mixmodal's special slots (converted before the "
                         f"tokenizer adapter existed, or from a vocabulary without {names}): reconvert the "
                         "transformers folder with `mixmodal convert hf-chameleon`")


class ChameleonTokenizer:
    """Chameleon's text tokenizer seen through vocab_map.json: mixmodal ids in and out.

    Encodes without adding <s> (the layout adds <bos>) and with special-token matching off
    (text never produces control ids, as in TextTokenizer); reports mixmodal's names for the
    special slots. never_sample and stop_ids tell the engine what to mask and where to stop."""

    def __init__(self, tokenizer: Tokenizer, vocab_map, origin: str = "<in memory>") -> None:
        _check_specials(vocab_map, origin)
        specials = vocab_map.special_tokens
        self._to_ours = list(vocab_map.hf_to_mixmodal)
        self._to_hf = [0] * len(self._to_ours)
        for hf_id, ours in enumerate(self._to_ours):
            self._to_hf[ours] = hf_id
        for slot, name in enumerate(specials.values()):
            if tokenizer.token_to_id(name) != self._to_hf[slot]:
                raise ValueError(f"{origin}: {name!r} has id {tokenizer.token_to_id(name)} but vocab_map.json puts "
                                 f"Chameleon id {self._to_hf[slot]} in slot {slot}: this tokenizer is not the "
                                 "converted model's; copy the source's tokenizer.json there")
        if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_map.hf_vocab_size:
            raise ValueError(f"{origin}: {tokenizer.get_vocab_size(with_added_tokens=True)} ids, more than the "
                             f"model's {vocab_map.hf_vocab_size}: this tokenizer is not the converted model's")
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.text_size = vocab_map.text_size
        self.never_sample: tuple[int, ...] = tuple(vocab_map.never_sample)
        self.stop_ids: tuple[int, ...] = (V.special_id(V.EOS), V.special_id(V.END_OF_TURN))

    @classmethod
    def load(cls, model_dir: str | os.PathLike, tokenizer_file: str | os.PathLike) -> "ChameleonTokenizer":
        """The tokenizer of a converted model folder: model_dir/vocab_map.json and `tokenizer_file`."""
        vocab_map = VocabMap.read(Path(model_dir) / VOCAB_MAP_FILE)
        _check_specials(vocab_map, str(Path(model_dir) / VOCAB_MAP_FILE))
        file = Path(tokenizer_file)
        if not file.is_file():
            raise ValueError(f"{file} not found: {model_dir} is a converted Chameleon (it has {VOCAB_MAP_FILE}) and "
                             f"generates with Chameleon's own text tokenizer; copy the transformers folder's "
                             f"{SOURCE_TOKENIZER_FILES[0]} (or Meta's {SOURCE_TOKENIZER_FILES[1]}) to {file}")
        return cls(_read(file), vocab_map, str(file))

    @property
    def vocab_size(self) -> int:
        """The model's text range (Vocab.text_size): every id the tokenizer can give maps below it."""
        return self.text_size

    def vocab(self, num_image_codes: int = 0) -> V.Vocab:
        return V.Vocab(text_size=self.text_size, num_image_codes=num_image_codes)

    def encode(self, text: str) -> list[int]:
        return [self._to_ours[i] for i in self._tokenizer.encode(checked_text(text), add_special_tokens=False).ids]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self._to_ours[i] for i in e.ids]
                for e in self._tokenizer.encode_batch([checked_text(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode text ids; special slots and ids outside the text range are dropped."""
        hf = [self._to_hf[i] for i in ids if V.NUM_SPECIAL <= i < self.text_size]
        return self._tokenizer.decode(hf, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        if token in V.SPECIAL_TOKENS:  # mixmodal's names first: "<eoss>" is slot 5, Chameleon's <eoss> is <eoi>
            return V.special_id(token)
        hf_id = self._tokenizer.token_to_id(token)
        return None if hf_id is None else self._to_ours[hf_id]

    def id_to_token(self, i: int) -> str | None:
        if 0 <= i < V.NUM_SPECIAL:
            return V.SPECIAL_TOKENS[i]
        return self._tokenizer.id_to_token(self._to_hf[i]) if 0 <= i < len(self._to_hf) else None

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (Chameleon's ids)."""
        return self._tokenizer


__all__ = ["CHAMELEON_SPECIALS", "ChameleonTokenizer", "SpecialLayout", "is_text_name", "read_source_tokenizer",
           "special_layout"]
