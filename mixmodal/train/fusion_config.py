"""The early-fusion task's run config (train/fusion.py): FusionTrainConfig and its sections, and
`resolve`, which expands `model.preset: PATH`, resolves paths relative to the config file and,
for fine-tuning, reads `init_from`'s architecture and tokenizers (a `model:` key that
contradicts the folder fails here, naming it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mixmodal.config import ConfigError, load_yaml, merge, relative_to_config
from mixmodal.data.pipeline import PipelineConfig
from mixmodal.data.shapes.geneval import PROMPT_SETS
from mixmodal.model.bundle import MODEL_DIR
from mixmodal.model.fusion import ModelConfig
from mixmodal.model.io import CONFIG_FILE, WEIGHTS_FILE
from mixmodal.model.lora import LoRAConfig
from mixmodal.objectives.diffusion import DiffusionConfig
from mixmodal.retrieval.augment import RetrievalConfig
from mixmodal.train.trainer import TrainerConfig

NOT_ARCHITECTURE = {"attention_backend"}


@dataclass
class FusionDataConfig:
    source: str = "shapes:split=train"  # any open_source spec (shapes renders at the image tokenizer's resolution)
    eval_source: str = "shapes:split=heldout"
    image_tokenizer: str = ""  # directory of a saved VQ (token mode) or KL-VAE (latent mode) tokenizer
    text_tokenizer: str = "auto"  # a saved text tokenizer, or auto: train a BPE on the source into RUN/text_tokenizer
    text_vocab_size: int = 1024  # auto only
    text_tokenizer_documents: int = 4000  # auto only: documents it is trained on
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)  # retrieval augmentation (off: index "")
    eval_batches: int = 8  # batches of eval_source behind every eval figure
    strict: bool = False  # stop on the first malformed record or corrupt image instead of skipping it


@dataclass
class FusionLossConfig:
    z_loss_weight: float = 1e-5  # Chameleon: 1e-5 * log^2 Z


@dataclass
class FusionEvalConfig:
    """GenEval-form accuracy at every eval (shapes world; trainer.eval_every): the learning curve
    in accuracy, not only in loss. Drawn with the eval suite's default sampling for the mode."""

    geneval_prompts: int = 0  # prompts per category and set; 0: off
    geneval_sets: list[str] = field(default_factory=lambda: ["heldout", "heldout-combos"])
    images_per_prompt: int = 1
    batch_size: int = 64  # prompts generated together
    # the text -> image sampling this model is evaluated with, over the eval suite's defaults for its mode
    # (cfg, image_temperature, plausibility, ...: eval/shapes_tasks.py SAMPLING_FIELDS): used by these evals and
    # written to RUN/model/generation.yaml (image_sampling), which `mixmodal eval` reads
    sampling: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [s for s in self.geneval_sets if s not in PROMPT_SETS]
        if bad:
            raise ValueError(f"eval.geneval_sets: unknown set(s) {bad}; choose from {', '.join(PROMPT_SETS)}")
        if self.geneval_prompts < 0 or self.images_per_prompt < 1 or self.batch_size < 1:
            raise ValueError("eval.geneval_prompts must be >= 0, eval.images_per_prompt and eval.batch_size >= 1")


@dataclass
class FusionTrainConfig:
    task: Literal["fusion"] = "fusion"
    init_from: str = ""  # a run or model folder to fine-tune from (its weights, architecture and tokenizers)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FusionDataConfig = field(default_factory=FusionDataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: FusionLossConfig = field(default_factory=FusionLossConfig)
    eval: FusionEvalConfig = field(default_factory=FusionEvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    lora: LoRAConfig | None = None  # LoRA adapters instead of full fine-tuning (model/lora.py); needs init_from

    def __post_init__(self) -> None:
        if self.lora is not None and not self.init_from:
            raise ConfigError("lora: LoRA adapts a pretrained model; set init_from (a converted Chameleon, a run or a "
                              "model folder), or drop lora to train every weight")


CONFIG = FusionTrainConfig


def resolve(data: dict, base_dir: Path) -> dict:
    """Expand `model.preset: PATH` (a ModelConfig YAML, relative to the config file or the
    working directory); fields given inline win. Tokenizer paths are resolved relative to
    the config file when they exist there."""
    if isinstance(data.get("init_from"), str) and data["init_from"]:
        data = _resolve_init_from(data, base_dir)
    section = data.get("model")
    if isinstance(section, dict) and "preset" in section:
        section = dict(section)
        path = relative_to_config(str(section.pop("preset")), base_dir)
        data = {**data, "model": merge(load_yaml(path), section)}
    d = data.get("data")
    if isinstance(d, dict):
        d = dict(d)
        for key in ("image_tokenizer", "text_tokenizer"):
            if isinstance(d.get(key), str) and d[key] not in ("", "auto"):
                d[key] = str(relative_to_config(d[key], base_dir))
        r = d.get("retrieval")
        if isinstance(r, dict):
            r = dict(r)
            for key in ("index", "encoder"):
                if isinstance(r.get(key), str) and r[key]:
                    r[key] = str(relative_to_config(r[key], base_dir))
            d["retrieval"] = r
        data = {**data, "data": d}
    return data


def init_folder(given: str | Path) -> Path:
    """The model folder `init_from` names: the folder itself, or RUN/model of a run."""
    path = Path(given)
    for folder in (path, path / MODEL_DIR):
        if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            return folder
    raise ConfigError(f"init_from={given}: no model folder there ({CONFIG_FILE} + {WEIGHTS_FILE}, or a run's "
                      f"{MODEL_DIR}/); give a finished run, RUN/model, or a converted checkpoint")


# architecture keys a fine-tune may turn on over a folder without them: a new head, fresh weights (train/fusion.py)
ADDABLE = ("image.patch_codes",)


def _resolve_init_from(data: dict, base_dir: Path) -> dict:
    """init_from: the folder's architecture under the given model keys (which must agree), its tokenizers
    unless data.* names others."""
    folder = init_folder(relative_to_config(data["init_from"], base_dir)).resolve()
    architecture = load_yaml(folder / CONFIG_FILE)
    given = data.get("model") or {}
    merged = merge(architecture, {k: v for k, v in given.items() if k != "preset"})
    clash = [k for k in _leaves(merged) if k.split(".")[0] not in NOT_ARCHITECTURE
             and _get(architecture, k) is not None and str(_get(merged, k)).lower() != str(_get(architecture, k)).lower()
             and not (k in ADDABLE and str(_get(architecture, k)) == "0")]
    if clash:  # (compared as text: a command-line override is still a string here)
        raise ConfigError(f"init_from={data['init_from']}: model.{clash[0]} = {_get(merged, clash[0])} contradicts "
                          f"the checkpoint's {_get(architecture, clash[0])!r} ({folder / CONFIG_FILE}); drop it")
    d = dict(data.get("data") or {})
    for key in ("image_tokenizer", "text_tokenizer"):
        if d.get(key) in (None, "", "auto") and (folder / key).is_dir():
            d[key] = str(folder / key)
    return {**data, "init_from": str(folder), "model": merged, "data": d}


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _get(tree: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree
