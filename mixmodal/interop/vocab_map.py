"""A converted Chameleon's vocabulary map (RUN/model/vocab_map.json): Chameleon id <-> mixmodal id,
the Chameleon names in mixmodal's special slots, and the ids never sampled. Written by
`mixmodal convert hf-chameleon` (interop/hf_chameleon.py), read by the converted model's text
tokenizer (interop/chameleon_tokenizer.py) and by the converters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mixmodal.interop.common import ConversionError
from mixmodal.vocab import NUM_SPECIAL, SPECIAL_TOKENS, Vocab

VOCAB_MAP_FILE = "vocab_map.json"  # in a converted model folder, beside text_tokenizer/ (model/bundle.py's layout)
VOCAB_MAP_FORMAT = "mixmodal.vocab_map.v1"


@dataclass(frozen=True)
class VocabMap:
    """Chameleon id -> mixmodal id. hf_to_mixmodal has one entry per Chameleon id.

    special_tokens (a converted Chameleon whose vocabulary names its special tokens): the
    Chameleon name in each of mixmodal's special slots, {mixmodal name: Chameleon name}, in
    slot order; None when the source's names were not found (the model then cannot be
    driven through mixmodal's special ids). never_sample: mixmodal ids that are not text by
    Meta's rule (chameleon_tokenizer.py), masked at sampling time."""

    hf_to_mixmodal: tuple[int, ...]
    text_size: int
    num_image_codes: int
    special_tokens: dict[str, str] | None = None
    never_sample: tuple[int, ...] = ()

    @classmethod
    def from_image_ids(cls, hf_vocab_size: int, hf_id_of_code: list[int], special_hf_ids: list[int] = ()) -> "VocabMap":
        """special_hf_ids[k] goes to id k; the other text ids follow in ascending order; code c goes
        to text_size + c."""
        image_ids = set(hf_id_of_code)
        text_size = hf_vocab_size - len(hf_id_of_code)
        ours = [0] * hf_vocab_size
        first = set(special_hf_ids)
        text = [*special_hf_ids, *(j for j in range(hf_vocab_size) if j not in image_ids and j not in first)]
        for i, hf_id in enumerate(text):
            ours[hf_id] = i
        for code, hf_id in enumerate(hf_id_of_code):
            ours[hf_id] = text_size + code
        return cls(tuple(ours), text_size, len(hf_id_of_code))

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.text_size, self.num_image_codes)

    @property
    def hf_vocab_size(self) -> int:
        return len(self.hf_to_mixmodal)

    def index(self) -> torch.Tensor:
        return torch.tensor(self.hf_to_mixmodal, dtype=torch.long)

    def to_dict(self) -> dict:
        about = ("hf_to_mixmodal[chameleon_id] = mixmodal_id. Image code c is text_size + c; mixmodal ids from "
                 "hf_vocab_size up to mixmodal_vocab_size are padding (zero rows). ")
        if self.special_tokens is None:
            about += ("Text ids keep their order. mixmodal's own special-token ids do not apply: the source named no "
                      "special tokens, so this model cannot be driven through mixmodal's special ids.")
        else:
            about += ("special_tokens names the Chameleon token in each of mixmodal's special slots (ids 0.."
                      f"{NUM_SPECIAL - 1}); the other text ids follow in Chameleon's order. never_sample: mixmodal "
                      "ids that are not text (Meta's rule), never sampled. text_tokenizer/tokenizer.json is "
                      "Chameleon's tokenizer, driven through this map.")
        out = {"format": VOCAB_MAP_FORMAT, "about": about, "hf_vocab_size": self.hf_vocab_size,
               "text_size": self.text_size, "num_image_codes": self.num_image_codes,
               "mixmodal_vocab_size": self.vocab.size}
        if self.special_tokens is not None:
            out.update(special_tokens=dict(self.special_tokens), never_sample=list(self.never_sample))
        return {**out, "hf_to_mixmodal": list(self.hf_to_mixmodal)}

    @classmethod
    def read(cls, path: Path) -> "VocabMap":
        fix = "re-run `mixmodal convert hf-chameleon SRC OUT`, or copy the converted folder again"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise ConversionError(f"{path}: cannot read the vocabulary map ({' '.join(str(e).split())}): it is "
                                  f"truncated or damaged; {fix}") from None
        if not isinstance(data, dict) or data.get("format") != VOCAB_MAP_FORMAT:
            raise ConversionError(f"{path}: not a mixmodal vocabulary map (expected \"format\": \"{VOCAB_MAP_FORMAT}\"); "
                                  f"{fix}")
        ours = data.get("hf_to_mixmodal")
        text_size, num_codes = data.get("text_size"), data.get("num_image_codes")
        if not isinstance(ours, list) or not isinstance(text_size, int) or not isinstance(num_codes, int) \
                or not all(isinstance(i, int) for i in ours) \
                or sorted(ours) != list(range(len(ours))) or len(ours) != text_size + num_codes:
            raise ConversionError(f"{path}: hf_to_mixmodal must be a permutation of 0..text_size + num_image_codes - 1; "
                                  f"{fix}")
        specials, never = data.get("special_tokens"), data.get("never_sample", [])
        if specials is not None and (not isinstance(specials, dict) or list(specials) != list(SPECIAL_TOKENS)):
            raise ConversionError(f"{path}: special_tokens must map each of mixmodal's special tokens, in order "
                                  f"({', '.join(SPECIAL_TOKENS)}), to a Chameleon name; reconvert the checkpoint")
        if not isinstance(never, list) or not all(isinstance(i, int) and 0 <= i < text_size for i in never):
            raise ConversionError(f"{path}: never_sample must be a list of text ids below text_size={text_size}; {fix}")
        return cls(tuple(ours), text_size, num_codes, specials, tuple(never))
