"""The `dual-encoder` task: a CLIP-style text/image encoder for retrieval, trained contrastively.

    loss = symmetric InfoNCE over the batch's (text, image) pairs, with a learned temperature
           (scale = exp(model.logit_scale), clamped to 100)

logged as loss, scale and in-batch accuracy (the mean over text->image and image->text of
how often the pair's own partner scores highest). Eval (every trainer.eval_every and at
the end) embeds the first data.eval_pairs pairs of data.eval_source (the same pairs every
time) and ranks every text against every eval image and back: eval_t2i_r{1,5,10} and
eval_i2t_r{1,5,10} are recall@k over the whole eval set, not within a batch (an item is
right when it is the partner or a pixel- / token-identical copy of it: `equivalent_pairs`);
eval_loss is the contrastive loss over consecutive batches of trainer.batch_size eval
pairs, comparable with the training loss.

Pairs: each Image part of a document with the nearest non-blank Text part before it (after
it when there is none before). Documents without both are skipped and counted; corrupt
records are the source's business (its bad-input log). The pair iterator's state is the
index of a document and how many of its pairs were already used, so a resume is exact;
under torchrun each rank reads its own shard of the source.

Before training (`prepare`): data.text_tokenizer=auto trains a byte-level BPE of
data.text_vocab_size on the source into RUN/text_tokenizer (as the fusion task does; a path
is copied there), and model.text.{vocab_size, pad_id, bos_id, eos_id} are filled from it.
Shapes sources render at model.vision.image_size unless the spec names a resolution. At
the end the encoder is saved to RUN/encoder (DocumentEmbedder.from_pretrained(RUN) loads it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from mixmodal import vocab as V
from mixmodal.config import ConfigError, relative_to_config, to_dict
from mixmodal.documents import Document, Image, Text
from mixmodal.model.bundle import TEXT_TOKENIZER_DIR
from mixmodal.retrieval.document_embedder import save_dual_encoder
from mixmodal.retrieval.encoder import (ENCODER_DIR, DualEncoder, DualEncoderConfig, contrastive_loss,
                                        load_tokenizer, tokenize_texts)
from mixmodal.tokenizers.pixels import images_to_tensor
from mixmodal.tokenizers.text import TextTokenizer
from mixmodal.train import distributed
from mixmodal.train.checkpoint import artifact_remake
from mixmodal.train.fusion_prepare import prepare_text_tokenizer
from mixmodal.train.image_data import open_image_source
from mixmodal.train.task import OptimizerSpec, TaskBase
from mixmodal.train.trainer import TrainerConfig

NOT_ARCHITECTURE = {"logit_scale_init"}
RECALL_AT = (1, 5, 10)


@dataclass
class DualEncoderDataConfig:
    source: str = "shapes:split=train,tasks=caption"  # any open_source spec
    eval_source: str = "shapes:split=heldout,tasks=caption"
    text_tokenizer: str = "auto"  # a saved text tokenizer, or auto: train a BPE on the source into RUN/text_tokenizer
    text_vocab_size: int = 1024  # auto only
    text_tokenizer_documents: int = 4000  # auto only: documents it is trained on
    eval_pairs: int = 1000  # the first pairs of eval_source behind every eval figure
    strict: bool = False  # stop on the first malformed record or corrupt image instead of skipping it

    def __post_init__(self) -> None:
        if self.eval_pairs < 2:
            raise ValueError(f"data.eval_pairs must be >= 2 (retrieval needs something to rank), got {self.eval_pairs}")


@dataclass
class DualEncoderTrainConfig:
    task: Literal["dual-encoder"] = "dual-encoder"
    model: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    data: DualEncoderDataConfig = field(default_factory=DualEncoderDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


CONFIG = DualEncoderTrainConfig


def resolve(data: dict, base_dir: Path) -> dict:
    """A text_tokenizer path is taken relative to the config file when it exists there."""
    d = data.get("data")
    if isinstance(d, dict) and isinstance(d.get("text_tokenizer"), str) and d["text_tokenizer"] not in ("", "auto"):
        data = {**data, "data": {**d, "text_tokenizer": str(relative_to_config(d["text_tokenizer"], base_dir))}}
    return data


# --- before training ---------------------------------------------------------------------------

def prepare(config: DualEncoderTrainConfig, run_dir: str | Path, write: bool = True) -> DualEncoderTrainConfig:
    """The text tokenizer into RUN/text_tokenizer, model.text filled from it. write=False
    (torchrun ranks > 0): only point the config at what rank 0 wrote."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    d = config.data
    text_dir = prepare_text_tokenizer(config, run) if write else run / TEXT_TOKENIZER_DIR
    d.text_tokenizer = str(text_dir)
    fill_model_config(config)
    return config


def fill_model_config(config: DualEncoderTrainConfig) -> None:
    """model.text.vocab_size and the pad/bos/eos ids from the tokenizer (mixmodal.vocab's
    ids); contradictions are refused by key."""
    text = config.model.text
    tokenizer = TextTokenizer.load(config.data.text_tokenizer)
    if text.vocab_size and text.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"model.text.vocab_size={text.vocab_size} contradicts the text tokenizer "
                          f"({tokenizer.vocab_size}); drop the key to take it from there")
    text.vocab_size = tokenizer.vocab_size
    text.pad_id, text.bos_id, text.eos_id = V.special_id(V.PAD), V.special_id(V.BOS), V.special_id(V.EOS)
    if text.pooling != "eos":
        raise ConfigError(f"model.text.pooling={text.pooling}: pooling at the largest id finds the end of a text only "
                          "in OpenAI CLIP's vocabulary; a mixmodal tokenizer's <eos> is id 2, so use pooling: eos")


def build_task(config: DualEncoderTrainConfig) -> "DualEncoderTask":
    if not config.model.text.vocab_size:
        raise ConfigError("model.text.vocab_size is unset: run through `mixmodal train` (which prepares the text "
                          "tokenizer) or call mixmodal.train.dual_encoder.prepare(config, run_dir) first")
    if config.trainer.num_workers:
        raise ConfigError(f"trainer.num_workers={config.trainer.num_workers}: the dual-encoder task reads its "
                          "documents in the training process; set trainer.num_workers=0")
    return DualEncoderTask(config)


# --- pairs -------------------------------------------------------------------------------------

def document_pairs(doc: Document) -> list[tuple[str, Any]]:
    """(text, PIL image) for each Image part: the nearest non-blank Text part before it, else after it."""
    texts = [(i, p.text) for i, p in enumerate(doc.parts) if isinstance(p, Text) and p.text.strip()]
    pairs = []
    for i, part in enumerate(doc.parts):
        if isinstance(part, Image) and texts:
            before = [t for j, t in texts if j < i]
            pairs.append((before[-1] if before else next(t for j, t in texts if j > i), part.image))
    return pairs


@dataclass
class PairStats:
    documents: int = 0  # documents read
    skipped: int = 0  # documents without both a text and an image
    pairs: int = 0

    def as_dict(self) -> dict:
        return {"documents": self.documents, "skipped_documents": self.skipped, "pairs": self.pairs}


class PairBatches:
    """Batches of (text, image) pairs (a task.DataIterator): {"input_ids", "attention_mask"
    (B, L), "pixels" (B, 3, S, S) in [-1, 1]}.

    `source_factory()` returns a fresh Source (one pass); endless: a finite source is read
    again when it runs out. The state is (next_document, next_pair): the pair after the
    last one served, as an index into this rank's documents and into that document's pairs."""

    def __init__(self, source_factory, tokenizer, text_config, image_size: int, batch_size: int,
                 endless: bool = True) -> None:
        self.source_factory = source_factory
        self.tokenizer, self.text_config, self.image_size = tokenizer, text_config, image_size
        self.batch_size, self.endless = batch_size, endless
        self.next_document, self.next_pair = 0, 0
        self.stats = PairStats()
        self._pairs: Iterator | None = None

    def state_dict(self) -> dict:
        return {"next_document": self.next_document, "next_pair": self.next_pair}

    def load_state_dict(self, state: dict) -> None:
        if "next_document" not in state:
            raise ValueError(f"the checkpoint's data state {state} is not a dual-encoder pair position "
                             "(was the run started by another task?)")
        self.next_document, self.next_pair = int(state["next_document"]), int(state.get("next_pair", 0))
        self._pairs = None

    def _iterate(self, start_document: int, start_pair: int) -> Iterator[tuple[int, int, str, Any]]:
        """(document index, pair index, text, image) from the given position on; a finite source
        is read again when it runs out (endless)."""
        index = 0
        while True:
            source = self.source_factory()
            if index < start_document and hasattr(source, "skip"):  # the shapes world jumps straight there
                index += source.skip(start_document - index)
            whole_pass, served = index >= start_document, 0
            for doc in source:
                if index >= start_document:
                    pairs = document_pairs(doc)
                    self.stats.documents += 1
                    self.stats.skipped += not pairs
                    for j, (text, image) in enumerate(pairs):
                        if index > start_document or j >= start_pair:
                            served += 1
                            yield index, j, text, image
                index += 1
            if not self.endless:
                return
            if whole_pass and not served:
                summary = source.summary() if hasattr(source, "summary") else ""
                raise RuntimeError(f"the source {source!r} yields no (text, image) pairs: {self.stats.skipped} "
                                   "documents without both a text and an image"
                                   + (f"; {summary}" if summary else ""))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._pairs is None:
            self._pairs = self._iterate(self.next_document, self.next_pair)
        chunk = list(itertools.islice(self._pairs, self.batch_size))
        if not chunk:  # a finite pass is over
            raise StopIteration
        index, j, _, _ = chunk[-1]
        self.next_document, self.next_pair = index, j + 1
        self.stats.pairs += len(chunk)
        input_ids, attention_mask = tokenize_texts(self.tokenizer, [c[2] for c in chunk], self.text_config)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixels": images_to_tensor([c[3] for c in chunk], self.image_size)}


# --- retrieval metrics -------------------------------------------------------------------------

def recall_at(similarity: torch.Tensor, positive: torch.Tensor | None = None,
              ks: tuple[int, ...] = RECALL_AT) -> dict[int, float]:
    """similarity (N queries, N items), item i the partner of query i; `positive` (N, N) bool
    marks every item that is as right as the partner (default: the partner alone). Recall@k:
    the fraction of queries with a right item among their k best, i.e. with fewer than k
    wrong items scored above their best right one."""
    if positive is None:
        positive = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    best_right = similarity.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    wrong_above = ((similarity > best_right) & ~positive).sum(dim=1)
    return {k: float((wrong_above < k).float().mean()) for k in ks}


def equivalent_pairs(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(N, N) bool: pair j's image is a right answer for pair i's text (and its text for pair i's
    image) when j's image is pixel-identical to i's or j's text is token-identical to i's. The
    shapes world repeats simple scenes (about a quarter of its first 1000 held-out images are
    pixel copies of another), and no encoder can tell copies apart: counting only the partner
    would score a coin toss among them."""
    text_keys, image_keys = [], []
    for batch in batches:
        for ids, mask, pixels in zip(batch["input_ids"], batch["attention_mask"], batch["pixels"]):
            text_keys.append(tuple(ids[mask.bool()].tolist()))
            image_keys.append(pixels.numpy().tobytes())

    def same(keys: list) -> torch.Tensor:
        ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        index = torch.tensor([ids[key] for key in keys])
        return index[:, None] == index[None, :]
    return same(text_keys) | same(image_keys)


# --- the task ----------------------------------------------------------------------------------

class DualEncoderTask(TaskBase):
    progress_keys = ("loss", "accuracy", "scale")

    def __init__(self, config: DualEncoderTrainConfig) -> None:
        self.config = config
        self.device = torch.device("cpu")
        self._eval_set: list[dict[str, torch.Tensor]] | None = None
        self._positive: torch.Tensor | None = None  # (N, N) equivalent pairs of the eval set

    def setup(self, device: torch.device) -> None:
        self.device = device
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.tokenizer = load_tokenizer(Path(self.config.data.text_tokenizer) / "tokenizer.json")

    def architecture(self) -> dict:
        return {k: v for k, v in to_dict(self.config.model).items() if k not in NOT_ARCHITECTURE}

    def build_models(self) -> dict[str, torch.nn.Module]:
        return {"encoder": DualEncoder(self.config.model)}

    def optimizers(self, models) -> dict[str, OptimizerSpec]:
        return {"encoder": OptimizerSpec(models["encoder"])}

    def _batches(self, spec: str, batch_size: int, endless: bool, rank: int, world: int) -> PairBatches:
        image_size = self.config.model.vision.image_size

        def source():
            s = open_image_source(spec, image_size)
            s.rank, s.world_size = rank, world
            s.log.strict = self.config.data.strict
            return s

        return PairBatches(source, self.tokenizer, self.config.model.text, image_size, batch_size, endless)

    def data_iterator(self) -> PairBatches:
        self.train_batches = self._batches(self.config.data.source, self.config.trainer.batch_size, True,
                                           self.rank, self.world)
        return self.train_batches

    # -- one step --

    def train_step(self, models, batch, step: int) -> dict[str, Any]:
        text, image, scale = models["encoder"](batch["input_ids"], batch["attention_mask"], batch["pixels"])
        loss = contrastive_loss(text, image, scale)
        with torch.no_grad():
            logits = text @ image.T  # (B texts, B images)
            labels = torch.arange(logits.shape[0], device=logits.device)
            accuracy = ((logits.argmax(1) == labels).float().mean() + (logits.argmax(0) == labels).float().mean()) / 2
        return {"loss": loss, "scale": scale.detach(), "accuracy": accuracy}

    # -- eval --

    def _eval_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._eval_set is None:  # (rank 0 only, under torchrun) the same pairs every time
            n, size = self.config.data.eval_pairs, self.config.trainer.batch_size
            batches, count = [], 0
            for batch in self._batches(self.config.data.eval_source, size, False, 0, 1):
                keep = min(len(batch["input_ids"]), n - count)
                batches.append({k: v[:keep] for k, v in batch.items()})
                count += keep
                if count >= n:
                    break
            if count < 2:
                raise ConfigError(f"data.eval_source={self.config.data.eval_source!r} holds {count} (text, image) "
                                  "pairs; retrieval needs at least 2")
            self._eval_set = batches
        return self._eval_set

    def evaluate(self, models, step: int, run_dir: Path) -> dict[str, Any]:
        model = models["encoder"]
        texts, images, losses = [], [], []
        for batch in self._eval_batches():
            batch = {k: v.to(self.device) for k, v in batch.items()}
            text, image, scale = model(batch["input_ids"], batch["attention_mask"], batch["pixels"])
            texts.append(text)
            images.append(image)
            if len(text) > 1:
                losses.append(float(contrastive_loss(text, image, scale)))
        similarity = torch.cat(texts) @ torch.cat(images).T  # (N texts, N images)
        if self._positive is None:
            self._positive = equivalent_pairs(self._eval_batches()).to(similarity.device)
        metrics: dict[str, Any] = {"eval_loss": sum(losses) / max(len(losses), 1), "eval_pairs": similarity.shape[0]}
        for name, sim in (("t2i", similarity), ("i2t", similarity.T)):
            metrics.update({f"eval_{name}_r{k}": v for k, v in recall_at(sim, self._positive).items()})
        if hasattr(self, "train_batches"):
            metrics["data"] = self.train_batches.stats.as_dict()
        return metrics

    def save_artifacts(self, models, run_dir: Path) -> None:
        save_dual_encoder(models["encoder"], self.tokenizer, Path(run_dir) / ENCODER_DIR,
                          remake=artifact_remake(run_dir))


__all__ = ["CONFIG", "DualEncoderDataConfig", "DualEncoderTask", "DualEncoderTrainConfig", "PairBatches",
           "build_task", "document_pairs", "equivalent_pairs", "prepare", "recall_at"]
