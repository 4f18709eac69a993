"""A saved dual encoder, and the embedder that retrieval calls.

    save_dual_encoder  DIR/config.yaml + model.safetensors + tokenizer.json + manifest.json (their
                       sizes and SHA-256s, weights.py), atomically; from_pretrained checks them
    find_encoder_dir   an encoder directory, or a dual-encoder run's RUN/encoder
    DocumentEmbedder   a saved encoder on a device: texts, images and documents -> float32
                       L2-normalised numpy rows (what the memory bank stores and searches)

The model, its tokenization and the folder's file names are in retrieval/encoder.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixmodal.config import ConfigError, build_config, load_yaml, save_config, to_dict
from mixmodal.model.io import ModelDirError, check_model_state
from mixmodal.retrieval.encoder import (CONFIG_FILE, ENCODER_DIR, ENCODER_FIX, TOKENIZER_FILE, WEIGHTS_FILE,
                                        DualEncoder, DualEncoderConfig, EncoderError, load_tokenizer,
                                        tokenize_texts)
from mixmodal.tokenizers.pixels import images_to_tensor
from mixmodal.weights import ManifestError, checked_folder, read_manifest, write_manifest

if TYPE_CHECKING:
    import PIL.Image
    import tokenizers

    from mixmodal.documents import Document


# --- on disk ---------------------------------------------------------------------------------

def save_dual_encoder(model: DualEncoder, tokenizer: "tokenizers.Tokenizer", out: str | os.PathLike, *,
                      remake: str | None = None) -> Path:
    """Write out/config.yaml, out/model.safetensors, out/tokenizer.json and last out/manifest.json (`remake`:
    how to write the folder again, for a loader's error). Atomic: everything goes to a temporary sibling
    directory that then replaces `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {name: t.detach().float().contiguous().cpu() for name, t in model.state_dict().items()}
    # one metadata key: safetensors writes several in hash order, and the bytes must be a function
    # of the weights alone (DocumentEmbedder.fingerprint hashes them)
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    save_config(to_dict(model.config), tmp, CONFIG_FILE)
    tokenizer.save(str(tmp / TOKENIZER_FILE))
    write_manifest(tmp, remake=remake)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def check_encoder_state(model: nn.Module, state: dict[str, torch.Tensor], origin: str | os.PathLike,
                        hint: str = f"were {CONFIG_FILE} and the weights saved from different models? {ENCODER_FIX}"
                        ) -> None:
    """Raise EncoderError listing every missing, unexpected and wrongly shaped tensor (one line ending with `hint`)."""
    try:
        check_model_state(model, state, origin, hint=hint)
    except ModelDirError as e:
        raise EncoderError(str(e)) from None


def read_encoder_config(path: Path) -> DualEncoderConfig:
    try:
        return build_config(DualEncoderConfig, load_yaml(path))
    except (ConfigError, ValueError) as e:
        said = str(e) if str(path) in str(e) else f"{path}: not a dual-encoder config: {e}"
        raise EncoderError(f"{said}; {ENCODER_FIX}") from None


def find_encoder_dir(path: str | os.PathLike) -> Path:
    """`path` itself, or its encoder/ (a run directory of the dual-encoder task); EncoderError
    naming what is missing when neither is an encoder directory."""
    path = Path(path)
    if not path.is_dir():
        raise EncoderError(f"dual-encoder directory {path} does not exist (or is not a directory); give a directory "
                           f"holding {CONFIG_FILE}, {WEIGHTS_FILE} and {TOKENIZER_FILE}: RUN/{ENCODER_DIR} of `mixmodal "
                           "train configs/retrieval/...`, or the output of `mixmodal convert hf-clip`")
    if not (path / WEIGHTS_FILE).is_file() and (path / ENCODER_DIR / WEIGHTS_FILE).is_file():
        path = path / ENCODER_DIR
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (path / name).is_file()]
    if missing:
        hint = (" (a run directory: the encoder is written to RUN/encoder when training ends)"
                if (path / "checkpoints").is_dir() else "")
        raise EncoderError(f"{path} is not a dual-encoder directory: {', '.join(missing)} missing{hint}; it needs "
                           f"{CONFIG_FILE}, {WEIGHTS_FILE} and {TOKENIZER_FILE} (written by save_dual_encoder: RUN/"
                           f"{ENCODER_DIR} of the dual-encoder task, or `mixmodal convert hf-clip`)")
    return path


# --- what retrieval uses -----------------------------------------------------------------------

class DocumentEmbedder:
    """What retrieval uses: a DualEncoder + its tokenizer on a device, eval mode, no grad, batched.

    `fingerprint` is the sha256 of model.safetensors: a memory bank records it and refuses
    to be searched with other weights."""

    def __init__(self, model: DualEncoder, tokenizer: "tokenizers.Tokenizer", path: Path, fingerprint: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config: DualEncoderConfig = model.config
        self.path = path
        self.fingerprint = fingerprint
        self.dim = self.config.embed_dim
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "DocumentEmbedder":
        """Load a saved encoder directory, or a dual-encoder run directory (its encoder/)."""
        from safetensors.torch import load as load_safetensors

        folder = find_encoder_dir(path)
        with checked_folder(folder, ENCODER_FIX):  # sizes, and hashes of the small files (weights.py)
            config = read_encoder_config(folder / CONFIG_FILE)
            data = (folder / WEIGHTS_FILE).read_bytes()
            fingerprint = hashlib.sha256(data).hexdigest()
            listed = ((read_manifest(folder) or {}).get("files") or {}).get(WEIGHTS_FILE)
            if listed is not None and listed["sha256"] != fingerprint:  # hashed anyway: the full check is free
                raise ManifestError(f"{folder / WEIGHTS_FILE} does not match its SHA-256 in {folder}/manifest.json: "
                                    f"the folder is damaged or changed since it was written; {ENCODER_FIX}")
            if not data:
                raise EncoderError(f"{folder / WEIGHTS_FILE} is empty (0 bytes): the save was cut short; {ENCODER_FIX}")
            try:
                state = load_safetensors(data)
            except Exception as e:  # safetensors raises its own error types on a torn file
                raise EncoderError(f"{folder / WEIGHTS_FILE}: cannot read it as safetensors ({len(data)} bytes; {e}): it "
                                   f"is truncated or not weights; {ENCODER_FIX}") from None
            tokenizer = load_tokenizer(folder / TOKENIZER_FILE)
            size = tokenizer.get_vocab_size(with_added_tokens=True)
            if size > config.text.vocab_size:
                raise EncoderError(f"{folder / TOKENIZER_FILE} has {size} ids but {folder / CONFIG_FILE} says "
                                   f"text.vocab_size={config.text.vocab_size}: were they saved from different models? "
                                   f"{ENCODER_FIX}")
            with torch.device("meta"):
                check_encoder_state(DualEncoder(config), state, folder / WEIGHTS_FILE)
            model = DualEncoder(config)
            model.load_state_dict(state)
        return cls(model.to(device), tokenizer, folder, fingerprint)

    def __repr__(self) -> str:
        return f"DocumentEmbedder({self.path}, dim={self.dim}, fingerprint={self.fingerprint[:12]})"

    def tokenize(self, texts: Sequence[str], query_dropout: float = 0.0, rng: np.random.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_texts(self.tokenizer, texts, self.config.text, query_dropout, rng)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, query_dropout: float = 0.0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
        """float32 (N, dim), L2-normalised."""
        texts = list(texts) if not isinstance(texts, str) else texts
        ids, mask = self.tokenize(texts, query_dropout, rng)
        out = [F.normalize(self.model.encode_text(ids[i:i + batch_size].to(self.device),
                                                  mask[i:i + batch_size].to(self.device)).float(), dim=-1).cpu()
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def embed_images(self, images: Sequence["PIL.Image.Image"], batch_size: int = 256) -> np.ndarray:
        """float32 (N, dim), L2-normalised; images are centre-cropped and resized to vision.image_size."""
        images, size = list(images), self.config.vision.image_size
        out = [F.normalize(self.model.encode_image(images_to_tensor(images[i:i + batch_size], size).to(self.device))
                           .float(), dim=-1).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def embed_documents(self, docs: Sequence["Document"], batch_size: int = 256, query_dropout: float = 0.0,
                        rng: np.random.Generator | None = None) -> np.ndarray:
        """float32 (N, dim). CM3Leon §2.1: the normalised mean of a document's text embedding (its
        Text parts joined by " ", embedded once) and its image embedding (the normalised mean of
        its images' normalised embeddings); one modality alone when the other is absent."""
        texts, text_of, images, image_owner = [], {}, [], []
        for i, doc in enumerate(docs):
            joined = " ".join(doc.texts)
            if joined.strip():
                text_of[i] = len(texts)
                texts.append(joined)
            for image in doc.images:
                images.append(image)
                image_owner.append(i)
            if i not in text_of and not doc.images:
                raise EncoderError(f"document {i} (id {doc.id!r}) has neither text nor an image: nothing to embed")
        num_docs = len(docs)
        out = np.zeros((num_docs, self.dim), np.float32)
        if images:
            image_embeds = torch.from_numpy(self.embed_images(images, batch_size))
            sums = torch.zeros(num_docs, self.dim).index_add_(0, torch.tensor(image_owner), image_embeds)
            out += F.normalize(sums, dim=-1).numpy()  # a zero row where a document has no image
        if texts:
            rows = np.fromiter(text_of.keys(), dtype=np.int64, count=len(text_of))
            out[rows] += self.embed_texts(texts, batch_size, query_dropout, rng)
        return F.normalize(torch.from_numpy(out), dim=-1).numpy()


__all__ = ["DocumentEmbedder", "find_encoder_dir", "save_dual_encoder"]
