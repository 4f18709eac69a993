"""The one place that defines special tokens and the id layout of the shared vocabulary.

Layout of the shared id space (token mode; latent mode uses only the text part):

    [0, num_special)                      special tokens, in the order of SPECIAL_TOKENS
    [num_special, text_size)              byte-level BPE tokens of the text tokenizer
    [text_size, text_size + num_codes)    image codes 0..num_codes-1 of the VQ tokenizer
    [.., size)                            padding up to a multiple of `pad_to_multiple`
                                          (never produced; masked out at sampling time)

The text tokenizer is trained with SPECIAL_TOKENS as its first added tokens, so the ids
below are the same in `tokenizer.json` and here; `tokenizers/text.py` checks it on load.
Nothing else in the code base writes an id as a literal: ask a `Vocab`.
"""

from __future__ import annotations

from dataclasses import dataclass

PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
BOI = "<boi>"  # begin of image
EOI = "<eoi>"  # end of image
END_OF_SPAN = "<eoss>"  # CM3: closes an infilled span moved to the end of the document
NUM_MASK_SENTINELS = 8  # CM3: Poisson(1) span counts are clamped to this
SYSTEM = "<|system|>"  # chat roles for instruction tuning
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"


def mask_token(k: int) -> str:
    """The CM3 sentinel string for the k-th masked span, `<mask:k>`."""
    if not 0 <= k < NUM_MASK_SENTINELS:
        raise ValueError(f"mask sentinel index {k} out of range [0, {NUM_MASK_SENTINELS})")
    return f"<mask:{k}>"


SPECIAL_TOKENS: tuple[str, ...] = (
    PAD,
    BOS,
    EOS,
    BOI,
    EOI,
    END_OF_SPAN,
    *(mask_token(k) for k in range(NUM_MASK_SENTINELS)),
    SYSTEM,
    USER,
    ASSISTANT,
    END_OF_TURN,
)
NUM_SPECIAL = len(SPECIAL_TOKENS)
_SPECIAL_ID = {token: i for i, token in enumerate(SPECIAL_TOKENS)}


def special_id(token: str) -> int:
    """Id of a special token string (e.g. "<boi>"); raises with the known tokens otherwise."""
    try:
        return _SPECIAL_ID[token]
    except KeyError:
        raise KeyError(f"{token!r} is not a special token; known: {', '.join(SPECIAL_TOKENS)}") from None


@dataclass(frozen=True)
class Vocab:
    """The shared id space of one model: special tokens, text tokens, image codes.

    text_size: ids used by the text tokenizer (special tokens included).
    num_image_codes: codebook size of the VQ tokenizer in token mode, 0 in latent mode.
    """

    text_size: int
    num_image_codes: int = 0
    pad_to_multiple: int = 64

    def __post_init__(self) -> None:
        if self.text_size <= NUM_SPECIAL:
            raise ValueError(
                f"text_size={self.text_size} leaves no room for text tokens: the first "
                f"{NUM_SPECIAL} ids are special tokens"
            )
        if self.num_image_codes < 0:
            raise ValueError(f"num_image_codes must be >= 0, got {self.num_image_codes}")
        if self.pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {self.pad_to_multiple}")

    # --- special ids -------------------------------------------------------------------
    pad = property(lambda self: _SPECIAL_ID[PAD])
    bos = property(lambda self: _SPECIAL_ID[BOS])
    eos = property(lambda self: _SPECIAL_ID[EOS])
    boi = property(lambda self: _SPECIAL_ID[BOI])
    eoi = property(lambda self: _SPECIAL_ID[EOI])
    end_of_span = property(lambda self: _SPECIAL_ID[END_OF_SPAN])
    system = property(lambda self: _SPECIAL_ID[SYSTEM])
    user = property(lambda self: _SPECIAL_ID[USER])
    assistant = property(lambda self: _SPECIAL_ID[ASSISTANT])
    end_of_turn = property(lambda self: _SPECIAL_ID[END_OF_TURN])

    def mask(self, k: int) -> int:
        """Id of the CM3 sentinel `<mask:k>`."""
        return _SPECIAL_ID[mask_token(k)]

    @property
    def mask_ids(self) -> range:
        return range(_SPECIAL_ID[mask_token(0)], _SPECIAL_ID[mask_token(0)] + NUM_MASK_SENTINELS)

    @property
    def special_ids(self) -> range:
        return range(0, NUM_SPECIAL)

    # --- ranges --------------------------------------------------------------------------
    @property
    def text_ids(self) -> range:
        """Ids of ordinary (non-special) text tokens."""
        return range(NUM_SPECIAL, self.text_size)

    @property
    def image_code_ids(self) -> range:
        return range(self.text_size, self.text_size + self.num_image_codes)

    @property
    def size(self) -> int:
        """Rows of the embedding table / LM head (padded; padding ids are never produced)."""
        used = self.text_size + self.num_image_codes
        m = self.pad_to_multiple
        return (used + m - 1) // m * m

    # --- image codes <-> ids (work on ints, numpy arrays and torch tensors alike) ---------
    def image_code_to_id(self, codes):
        return codes + self.text_size

    def id_to_image_code(self, ids):
        return ids - self.text_size

    def is_image_code(self, ids):
        return (ids >= self.text_size) & (ids < self.text_size + self.num_image_codes)

    def to_dict(self) -> dict:
        return {
            "text_size": self.text_size,
            "num_image_codes": self.num_image_codes,
            "pad_to_multiple": self.pad_to_multiple,
            "special_tokens": list(SPECIAL_TOKENS),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        saved = d.get("special_tokens")
        if saved is not None and list(saved) != list(SPECIAL_TOKENS):
            raise ValueError(
                "this checkpoint was made with a different special-token list "
                f"({saved}) than this version of mixmodal ({list(SPECIAL_TOKENS)}); "
                "its ids would be misread, so refusing to load it"
            )
        return cls(int(d["text_size"]), int(d.get("num_image_codes", 0)), int(d.get("pad_to_multiple", 64)))
