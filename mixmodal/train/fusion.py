"""The early-fusion training task: one model, `model.image.mode: tokens | latents`.

    loss = CE(next token) + z_loss                                   every mode
         + diffusion.loss_weight * MSE(prediction, noise | velocity)  latent mode (Transfusion)

logged as a breakdown: text_ce (targets that are text or control ids), image_ce (targets
that are image codes, token mode), z_loss, diffusion. Eval (every trainer.eval_every and at
the end) computes the same terms on the first data.eval_batches batches of
data.eval_source, with a fixed noise stream, so evals of one run and of two runs are
comparable; text_ppl = exp(text_ce).

Before training (`prepare`, called by `mixmodal train` with the run directory):
  - the text tokenizer: data.text_tokenizer=auto trains a byte-level BPE of
    data.text_vocab_size on the first data.text_tokenizer_documents documents of the
    source into RUN/text_tokenizer (kept on resume); a path is copied there;
  - the image tokenizer (data.image_tokenizer: a saved VQ or VAE) is copied to
    RUN/image_tokenizer;
  - model.text_vocab_size and model.image.{num_codes, latent_channels, grid_size} are
    filled from them, and contradictions (latent mode with a VQ tokenizer, a sequence
    shorter than one image, ...) fail here, naming the keys, before anything trains.
With data.retrieval.index (a memory bank, `mixmodal index build`), every training and eval
document is preceded by k documents retrieved for it (CM3Leon; mixmodal/retrieval/augment.py);
`prepare` opens the bank and its dual encoder first, so a bank that does not match its store
or encoder stops the run before anything trains.
At the end the model is saved to RUN/model (config.yaml, model.safetensors and both
tokenizers): `mixmodal.load_model(RUN/model)` reads it.

Fine-tuning (`init_from: RUN` or a model folder, e.g. SFT on conversations, data/chat.py): the
model starts from that folder's weights; its architecture and, unless given, both tokenizers
come from the folder (a `model:` key that contradicts it fails before training). The folder is
read as the engine reads it (model/bundle.py `load_text_tokenizer`, `read_model_settings`),
so a converted Chameleon (`mixmodal convert hf-chameleon`) fine-tunes with its own tokenizer
(vocab_map.json, copied to RUN/ beside RUN/text_tokenizer), its images prepared by its
`image_preprocessing` and encoded by its VQGAN, its conversations in its `chat_template`; features
that would train ids its engine never samples (CM3 sentinels, `uncond: mask`: unused
<reservedNNNNN> rows of Chameleon) are refused before training. RUN/model is then a folder of
the same kind: vocab_map.json, hf_config.json and the generation.yaml settings the folder stated
(image_generation, image_preprocessing, chat_template; max_length at least the folder's) are
carried over, so `mixmodal generate`, `serve` and `convert to-hf-chameleon` take it as they took
the converted one.

LoRA (`lora: {rank, alpha, targets, dropout}`, model/lora.py; needs init_from): adapters on the
named projections of every transformer block, everything else frozen (the optimizer sees the
trainable parameters only). Checkpoints hold the whole model (base + adapters), so a resume is
exact as every run's; RUN/model holds the base weights as they were (in init_from's dtype) and
adapter.safetensors + adapter_config.yaml, which every model-folder reader merges
(`mixmodal convert merge-lora RUN OUT` writes them merged into a plain folder).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mixmodal.config import ConfigError, load_yaml, merge, relative_to_config, to_dict
from mixmodal.data.pipeline import IGNORE, DocumentEncoder, FusionBatches, PipelineConfig
from mixmodal.model.bundle import (HF_CONFIG_FILE, IMAGE_TOKENIZER_DIR, MODEL_DIR, TEXT_TOKENIZER_DIR, TRAINING_FILE,
                                   VOCAB_MAP_FILE, Bundle, load_text_tokenizer, read_chat_template, read_model_settings,
                                   write_generation_settings)
from mixmodal.model.fusion import FusionModel, ModelConfig
from mixmodal.model.io import CONFIG_FILE, WEIGHTS_FILE, check_model_state, read_model_state, tied_aliases
from mixmodal.model.lora import LoRAConfig
from mixmodal.objectives.diffusion import DiffusionConfig, build_schedule, diffusion_loss
from mixmodal.objectives.next_token import next_token_loss
from mixmodal.retrieval.augment import RetrievalConfig
from mixmodal.train import distributed
from mixmodal.train.trainer import OptimizerSpec, TaskBase, TrainerConfig

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

    def __post_init__(self) -> None:
        from mixmodal.data.shapes.geneval import PROMPT_SETS

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


def _resolve_init_from(data: dict, base_dir: Path) -> dict:
    """init_from: the folder's architecture under the given model keys (which must agree), its tokenizers
    unless data.* names others."""
    folder = init_folder(relative_to_config(data["init_from"], base_dir)).resolve()
    architecture = load_yaml(folder / CONFIG_FILE)
    given = data.get("model") or {}
    merged = merge(architecture, {k: v for k, v in given.items() if k != "preset"})
    clash = [k for k in _leaves(merged) if k.split(".")[0] not in NOT_ARCHITECTURE
             and _get(architecture, k) is not None and str(_get(merged, k)).lower() != str(_get(architecture, k)).lower()]
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


# --- before training: tokenizers in the run directory, model config filled and checked -------

def prepare(config: FusionTrainConfig, run_dir: str | Path, write: bool = True) -> FusionTrainConfig:
    """Tokenizers into RUN/, model fields filled. write=False (torchrun ranks > 0): only
    point the config at what rank 0 wrote there."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    d = config.data
    if not write:
        d.image_tokenizer, d.text_tokenizer = str(run / IMAGE_TOKENIZER_DIR), str(run / TEXT_TOKENIZER_DIR)
        fill_model_config(config)
        return config
    if not d.image_tokenizer:
        raise ConfigError("data.image_tokenizer: give the directory of a saved image tokenizer (a VQ for "
                          "model.image.mode=tokens, a KL-VAE for latents), e.g. from `mixmodal train "
                          "configs/tokenizers/vq-shapes-64.yaml --out RUN` -> RUN/tokenizer")
    image_dir = run / IMAGE_TOKENIZER_DIR
    _into_run(d.image_tokenizer, image_dir, "config.yaml",
              f"data.image_tokenizer={d.image_tokenizer}: no saved image tokenizer there (config.yaml + model.safetensors)")
    d.image_tokenizer = str(image_dir)
    given_text = Path(d.text_tokenizer) if d.text_tokenizer != "auto" else None
    d.text_tokenizer = str(prepare_text_tokenizer(config, run))
    _carry_vocab_map(given_text, run)
    fill_model_config(config)
    if d.retrieval.enabled:
        check_retrieval(config)
    return config


def check_retrieval(config: FusionTrainConfig) -> None:
    """Open the memory bank and its encoder now: a mismatch stops the run before it trains."""
    from mixmodal.retrieval.select import Retriever

    r = config.data.retrieval
    try:
        Retriever.open(r.index, r.selection(), encoder=r.encoder or None)
    except ValueError as e:
        raise ConfigError(f"data.retrieval.index={r.index}: {e}") from None
    r.index = str(Path(r.index).resolve())
    if r.encoder:
        r.encoder = str(Path(r.encoder).resolve())


def prepare_text_tokenizer(config, run: Path) -> Path:
    """RUN/text_tokenizer: a BPE trained on config.data.source (data.text_tokenizer=auto; kept on
    resume) or a copy of the given one. Shared by every task that reads text (fusion, dual-encoder)."""
    d = config.data
    text_dir = run / TEXT_TOKENIZER_DIR
    if d.text_tokenizer == "auto":
        if not (text_dir / "tokenizer.json").is_file():
            _train_text_tokenizer(config, text_dir)
    else:
        _into_run(d.text_tokenizer, text_dir, "tokenizer.json",
                  f"data.text_tokenizer={d.text_tokenizer}: no tokenizer.json there; give a directory written by "
                  "`mixmodal tokenizer train`, or auto")
    return text_dir


def _carry_vocab_map(given_text: Path | None, run: Path) -> None:
    """RUN/vocab_map.json: the map beside the given text tokenizer (a converted Chameleon's), so that
    RUN/text_tokenizer is read as the engine reads the folder's (model/bundle.load_text_tokenizer)."""
    target = run / VOCAB_MAP_FILE
    if given_text is None or given_text.resolve() == (run / TEXT_TOKENIZER_DIR).resolve():
        return  # trained here, or already in the run (a resume): RUN/ holds what the run started with
    source = given_text.parent / VOCAB_MAP_FILE
    if source.is_file():
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        tmp.rename(target)
    else:
        target.unlink(missing_ok=True)


def _into_run(given: str, dst: Path, marker: str, missing: str) -> None:
    """Copy the directory `given` to `dst` in the run (nothing to do when it is already there)."""
    if Path(given).resolve() == dst.resolve():
        return
    if not Path(given, marker).is_file():
        raise ConfigError(missing)
    _copy_dir(Path(given), dst)


def _copy_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def _train_text_tokenizer(config: FusionTrainConfig, out: Path) -> None:
    from mixmodal.data.sources import open_source
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig

    d = config.data
    source = open_source(d.source)
    texts = (t for doc in _take(source, d.text_tokenizer_documents) for t in doc.texts)
    tokenizer = TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=d.text_vocab_size))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _take(iterable, n: int):
    for i, item in enumerate(iterable):
        if i >= n:
            return
        yield item


def fill_model_config(config: FusionTrainConfig) -> None:
    """Fill the model fields that the tokenizers determine; refuse contradictions by key."""
    from mixmodal.tokenizers.image import load_image_tokenizer

    m, d = config.model, config.data
    text = load_text_tokenizer(d.text_tokenizer)
    image = load_image_tokenizer(d.image_tokenizer)
    names = {"vq": "a VQ tokenizer", "vae": "a KL-VAE", "pca": "a PCA patch tokenizer", "kmeans": "a k-means patch tokenizer"}
    where = f"data.image_tokenizer={d.image_tokenizer} is {names.get(image.kind, image.kind)}"

    def fill(key: str, obj, field_name: str, value: int) -> None:
        given = getattr(obj, field_name)
        if given and given != value:
            raise ConfigError(f"{key}={given} contradicts the tokenizer ({value}); drop the key to take it from there")
        setattr(obj, field_name, value)

    fill("model.text_vocab_size", m, "text_vocab_size", text.vocab_size)
    if m.image.mode == "tokens":
        if not image.discrete:
            raise ConfigError(f"model.image.mode=tokens needs a discrete image tokenizer (vq, kmeans), but {where} "
                              "(continuous latents); use model.image.mode=latents or a VQ tokenizer")
        fill("model.image.num_codes", m.image, "num_codes", image.num_codes)
    else:
        if image.discrete:
            raise ConfigError(f"model.image.mode=latents needs a continuous image tokenizer (vae, pca), but {where} "
                              "(discrete codes); use model.image.mode=tokens or a VAE tokenizer")
        fill("model.image.latent_channels", m.image, "latent_channels", image.latent_channels)
    fill("model.image.grid_size", m.image, "grid_size", image.grid_size)
    if m.image.mode == "latents" and m.image.grid_size % m.image.patch_size:
        raise ConfigError(f"model.image.patch_size={m.image.patch_size} does not divide the latent grid "
                          f"({m.image.grid_size}) of data.image_tokenizer")
    need = m.image.positions_per_image + 4  # <bos> <boi> IMAGE <eoi> <eos>
    if d.pipeline.seq_len < need:
        raise ConfigError(f"data.pipeline.seq_len={d.pipeline.seq_len} is shorter than one image: an image takes "
                          f"{m.image.positions_per_image} positions (model.image.mode={m.image.mode}, grid "
                          f"{m.image.grid_size}x{m.image.grid_size}"
                          + (f", patch_size={m.image.patch_size}" if m.image.mode == "latents" else "")
                          + f") plus 4 control tokens; raise data.pipeline.seq_len to >= {need}")
    check_learnable_ids(config, text)
    if config.model.attention_backend == "flex" and config.model.transformer.attention_dropout:
        raise ConfigError("model.attention_backend=flex has no attention dropout; set "
                          "model.transformer.attention_dropout=0 or model.attention_backend=sdpa")


def check_learnable_ids(config: FusionTrainConfig, text_tokenizer) -> None:
    """Refuse pipeline features that would train ids the tokenizer says the engine never samples (a
    converted Chameleon: mixmodal's <mask:k> and <eoss> slots hold unused <reservedNNNNN> rows,
    vocab_map.json never_sample): CM3 makes them targets, `uncond: mask` feeds <mask:0> for a stream
    the engine refuses to run."""
    never = set(text_tokenizer.never_sample)
    vocab, p = config.model.vocab, config.data.pipeline
    if vocab.mask(0) not in never:
        return
    if p.cm3.rate > 0:
        raise ConfigError(f"data.pipeline.cm3.rate={p.cm3.rate}: CM3 trains the sentinels <mask:k> and <eoss>, which "
                          f"this model's tokenizer never samples ({Path(config.data.text_tokenizer).parent / VOCAB_MAP_FILE}"
                          " never_sample: unused <reservedNNNNN> rows of a converted Chameleon), so generation could "
                          "never use them; set data.pipeline.cm3.rate=0")
    if p.cond_dropout > 0 and p.uncond == "mask":
        raise ConfigError("data.pipeline.uncond=mask feeds <mask:0>, an unused <reservedNNNNN> row of this converted "
                          "Chameleon that the engine refuses as guidance.uncond; use data.pipeline.uncond=empty "
                          "(Meta's unconditional stream <s> <racm3:break>)")


# --- the task --------------------------------------------------------------------------------

def training_compute(model, config: FusionTrainConfig, world_size: int = 1, steps: int | None = None) -> dict:
    """Training compute from the model's own accounting: every position of every packed row
    (padding included: it was computed) costs `model.flops_per_token(seq_len)`, forward and
    backward. The image tokenizer's encoding is not counted (it is frozen and could be cached).
    `steps`: the updates made so far (default: the whole run's trainer.steps)."""
    t = config.trainer
    steps = t.steps if steps is None else steps
    seq_len = config.data.pipeline.seq_len
    positions = steps * t.batch_size * t.grad_accumulation * world_size * seq_len
    per_position = model.flops_per_token(seq_len)
    return {"steps": steps, "batch_size": t.batch_size, "grad_accumulation": t.grad_accumulation,
            "world_size": world_size, "seq_len": seq_len, "positions": positions,
            "parameters": model.num_parameters(), "non_embedding_parameters": model.num_parameters(non_embedding=True),
            "flops_per_position": per_position, "flops": positions * per_position,
            "image_mode": config.model.image.mode}


def build_task(config: FusionTrainConfig) -> "FusionTask":
    if not config.model.text_vocab_size:
        raise ConfigError("model.text_vocab_size is unset: run through `mixmodal train` (which prepares the "
                          "tokenizers) or call mixmodal.train.fusion.prepare(config, run_dir) first")
    return FusionTask(config)


def noise_images(schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, targets: torch.Tensor | None,
                 image_weights: torch.Tensor | None):
    """The model's image inputs at times `t`, and the per-image loss weights. Images that are no
    target (`targets` False: a user's image in a conversation, which the model reads) are fed as
    the engine feeds a prompt's image, clean at the grid's first time, and weigh 0."""
    noisy = schedule.add_noise(x0, noise, t)
    if targets is None or bool(targets.all()):
        return noisy, t, image_weights
    targets = targets.to(x0.device)
    noisy = torch.where(targets.view(-1, *[1] * (x0.dim() - 1)), noisy, x0)
    t = torch.where(targets, t, torch.full_like(t, 1.0 / schedule.num_timesteps))
    weights = targets.float() if image_weights is None else image_weights.to(x0.device) * targets
    return noisy, t, weights


class FusionTask(TaskBase):
    progress_keys = ("loss", "text_ce", "image_ce", "diffusion")

    def __init__(self, config: FusionTrainConfig) -> None:
        self.config = config
        self.latent = config.model.image.mode == "latents"
        # a batch without images leaves the patch layers without gradients; DDP must expect that
        self.ddp_find_unused_parameters = self.latent
        self.schedule = build_schedule(config.diffusion) if self.latent else None
        self.device = torch.device("cpu")
        self.noise = torch.Generator()
        self._eval_batches: list[dict] | None = None

    def setup(self, device: torch.device) -> None:
        from mixmodal.tokenizers.image import load_image_tokenizer

        self.device = device
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.noise = torch.Generator().manual_seed(self.config.trainer.seed + 1000 + self.rank)
        self.text_tokenizer = load_text_tokenizer(self.config.data.text_tokenizer)  # as the engine loads it
        self.image_tokenizer = load_image_tokenizer(self.config.data.image_tokenizer, device=device).eval()
        for p in self.image_tokenizer.parameters():
            p.requires_grad_(False)
        self.vocab = self.config.model.vocab
        # the init_from folder's generation.yaml, read as the engine reads it
        self.init_settings = read_model_settings(Path(self.config.init_from)) if self.config.init_from else None
        self.image_preprocessing = self.init_settings.image_preprocessing if self.init_settings else "mixmodal"
        self.chat_template = self._training_chat_template()

    def _training_chat_template(self) -> str:
        """The layout of conversations: the init folder's template; without one, "chameleon" for a tokenizer
        whose role slots are never sampled (a converted Chameleon has no role tokens), else "mixmodal"."""
        never = set(self.text_tokenizer.never_sample)
        roles_unused = self.vocab.user in never
        template = self.init_settings.chat_template if self.init_settings else None
        if template == "mixmodal" and roles_unused:
            raise ConfigError(f"init_from={self.config.init_from}: generation.yaml says chat_template: mixmodal, but "
                              "this tokenizer never samples the role tokens (a converted Chameleon); set "
                              "chat_template: chameleon there")
        return template or ("chameleon" if roles_unused else "mixmodal")

    def architecture(self) -> dict:
        arch = {k: v for k, v in to_dict(self.config.model).items() if k not in NOT_ARCHITECTURE}
        if self.config.lora is not None:  # the adapters are weights of the checkpoints too
            arch["lora"] = to_dict(self.config.lora)
        return arch

    def build_models(self) -> dict[str, torch.nn.Module]:
        model = FusionModel(self.config.model)
        if self.config.init_from:  # fine-tuning: the pretrained weights (a resume then loads its checkpoint over them)
            folder = Path(self.config.init_from)
            state = read_model_state(folder)  # a LoRA run's folder: its adapter merged
            check_model_state(model, state, folder / WEIGHTS_FILE)
            for alias, owner in tied_aliases(model).items():
                state[alias] = state[owner]
            model.load_state_dict(state)
        if self.config.lora is not None:
            from mixmodal.model.lora import apply_lora

            apply_lora(model, self.config.lora)  # draws the adapters (seeded): base frozen, adapters trainable
        return {"model": model}

    def optimizers(self, models) -> dict[str, OptimizerSpec]:
        return {"model": OptimizerSpec(models["model"])}

    def generators(self) -> dict[str, torch.Generator]:
        return {"noise": self.noise}

    def _batches(self, spec: str, batch_size: int, endless: bool, rank: int, world: int) -> FusionBatches:
        from mixmodal.train.image_data import open_image_source

        resolution = self.image_tokenizer.config.resolution

        def source():
            s = open_image_source(spec, resolution)
            s.rank, s.world_size = rank, world
            s.log.strict = self.config.data.strict
            return s

        encoder = DocumentEncoder(self.text_tokenizer, self.image_tokenizer, self.vocab, self.config.model.image.mode,
                                  self.device, chat_template=self.chat_template,
                                  image_preprocessing=self.image_preprocessing)
        augmenter = None
        if self.config.data.retrieval.enabled:
            from mixmodal.retrieval.augment import RetrievalAugmenter

            augmenter = RetrievalAugmenter(self.config.data.retrieval, encoder, seed=self.config.trainer.seed,
                                           rank=rank, device=self.device)
        return FusionBatches(source, encoder, self.config.data.pipeline, batch_size,
                             self.config.model.image.positions_per_image, seed=self.config.trainer.seed, rank=rank,
                             endless=endless, augmenter=augmenter, training=endless)

    def data_iterator(self) -> FusionBatches:
        self.train_batches = self._batches(self.config.data.source, self.config.trainer.batch_size, True,
                                           self.rank, self.world)
        return self.train_batches

    # -- one step --

    def losses(self, model, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        image = self.config.model.image
        kwargs = dict(positions=batch["positions"], document_ids=batch["document_ids"],
                      image_ids=batch["image_ids"] if image.is_bidirectional else None)
        if self.latent and batch["image_latents"].numel():
            x0 = batch["image_latents"]
            n = x0.shape[0]
            t = self.schedule.sample_times(n, generator=generator, device=torch.device("cpu"),
                                           limited=batch["image_limited"].cpu()).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            noisy, t, image_weights = noise_images(self.schedule, x0, noise, t, batch.get("image_loss"),
                                                   batch.get("image_weights"))
            kwargs.update(image_latents=noisy, image_times=t, image_index=batch["image_index"])
            target = self.schedule.target(x0, noise, t)
        out = model(batch["input_ids"], **kwargs)
        labels = batch["labels"]
        is_image = self.vocab.is_image_code(labels) if image.mode == "tokens" else torch.zeros_like(labels, dtype=torch.bool)
        groups = {"text": (labels != IGNORE) & ~is_image}
        if image.mode == "tokens":
            groups["image"] = is_image
        terms = next_token_loss(out.logits, labels, z_loss_weight=self.config.loss.z_loss_weight, groups=groups,
                                weights=batch.get("loss_weights"))
        losses = {"loss": terms["ce"] + terms["z_loss"], "ce": terms["ce"].detach(), "z_loss": terms["z_loss"].detach(),
                  "text_ce": terms["text_ce"]}
        if image.mode == "tokens":
            losses["image_ce"] = terms["image_ce"]
        if self.latent:
            if "image_latents" in kwargs:
                diffusion = diffusion_loss(out.image_prediction, target, weight=self.config.diffusion.loss_weight,
                                           image_weights=image_weights)
                losses["loss"] = losses["loss"] + diffusion
            else:  # a batch without images: keep the graph shape of every step the same
                diffusion = out.logits.sum() * 0.0
            losses["diffusion"] = diffusion.detach()
        return losses

    def train_step(self, models, batch, step: int) -> dict[str, Any]:
        return self.losses(models["model"], batch, self.noise)

    # -- eval --

    def evaluate(self, models, step: int, run_dir: Path) -> dict[str, Any]:
        if self._eval_batches is None:  # (rank 0 only, under torchrun) the same held-out batches every time
            it = self._batches(self.config.data.eval_source, self.config.trainer.batch_size, False, 0, 1)
            self._eval_batches = [b for _, b in zip(range(self.config.data.eval_batches), it)]
        model = models["model"]
        generator = torch.Generator().manual_seed(12345)  # the same noise at every eval
        sums: dict[str, float] = {}
        for batch in self._eval_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            for k, v in self.losses(model, batch, generator).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        n = max(len(self._eval_batches), 1)
        metrics = {f"eval_{k}": v / n for k, v in sums.items()}
        if "eval_text_ce" in metrics:
            metrics["eval_text_ppl"] = math.exp(min(metrics["eval_text_ce"], 50.0))
        metrics["train_flops"] = training_compute(model, self.config, getattr(self, "world", 1), steps=step)["flops"]
        if self.config.eval.geneval_prompts:
            metrics.update(self.geneval(model))
        if hasattr(self, "train_batches"):
            metrics["data"] = self.train_batches.stats.as_dict()
        return metrics

    def geneval(self, model) -> dict[str, float]:
        """GenEval-form accuracy of `model` as it is now (eval.geneval_*): geneval_SET_overall and
        geneval_SET_CATEGORY for each set; the eval suite's prompts, seeds and default sampling."""
        from mixmodal.eval.shapes_suite import ShapesEvalConfig, geneval_scores

        e = self.config.eval
        bundle = Bundle(model, self.text_tokenizer, self.image_tokenizer, max_length=self.config.data.pipeline.seq_len,
                        diffusion=self.config.diffusion if self.latent else None,
                        image_generation=self.init_settings.image_generation if self.init_settings else True,
                        image_preprocessing=self.image_preprocessing)
        suite = ShapesEvalConfig(geneval_prompts=e.geneval_prompts, images_per_prompt=e.images_per_prompt,
                                 batch_size=e.batch_size)
        return geneval_scores(bundle, suite, e.geneval_sets)

    def save_artifacts(self, models, run_dir: Path) -> None:
        from mixmodal.model import lora
        from mixmodal.model.io import save_model_dir
        from mixmodal.train.checkpoint import artifact_remake
        from mixmodal.weights import write_manifest

        out = Path(run_dir) / MODEL_DIR
        model = models["model"]
        # An earlier RUN/model's manifest stays until the last line, so a crash in between leaves a folder that fails it
        if self.config.lora is not None:  # the base as it was (init_from's dtype: it never changed) + the adapter
            self._save_base(model, out)
            lora.save_adapter(model, self.config.lora, out)
        else:
            save_model_dir(model, out, manifest=False)
            lora.remove_adapter(out)
        _copy_dir(Path(self.config.data.text_tokenizer), out / TEXT_TOKENIZER_DIR)
        _copy_dir(Path(self.config.data.image_tokenizer), out / IMAGE_TOKENIZER_DIR)
        self._carry_files(out)
        compute = training_compute(model, self.config, getattr(self, "world", 1))
        if hasattr(self, "train_batches"):  # padding positions cost compute too; a tighter packing would save them
            fill = self.train_batches.stats.as_dict().get("fill")
            if fill is not None:
                compute.update(fill=fill, non_padding_flops=compute["flops"] * fill)
        (out / TRAINING_FILE).write_text(json.dumps(compute, indent=1) + "\n", encoding="utf-8")
        r = self.config.data.retrieval
        init = getattr(self, "init_settings", None)
        stated = init.stated if init is not None else frozenset()
        max_length = self.config.data.pipeline.seq_len
        if init is not None and init.max_length:  # the positions the pretrained model learned are still learned
            max_length = max(max_length, init.max_length)
        write_generation_settings(out, max_length=max_length,
                                  diffusion=self.config.diffusion if self.latent else None,
                                  retrieval={"index": r.index, "encoder": r.encoder, "k": r.k} if r.enabled else None,
                                  chat_template=self._chat_template(),
                                  image_generation=init.image_generation if "image_generation" in stated else None,
                                  image_preprocessing=(init.image_preprocessing if "image_preprocessing" in stated
                                                       else None))
        write_manifest(out, remake=artifact_remake(run_dir))  # last: every file above, sizes and SHA-256s

    def _save_base(self, model, out: Path) -> None:
        from mixmodal.model import lora
        from mixmodal.model.io import write_model_dir
        from mixmodal.weights import read_weights

        aliases = tied_aliases(model)
        state = {k: v.detach() for k, v in model.state_dict().items() if not lora.is_adapter_key(k) and k not in aliases}
        init = read_weights(Path(self.config.init_from) / WEIGHTS_FILE)  # memory-mapped: only the dtypes are read
        state = {k: v.to(init[k].dtype) if k in init else v for k, v in state.items()}
        write_model_dir(model.config, state, out, manifest=False)

    def _carry_files(self, out: Path) -> None:
        """A converted Chameleon's files: RUN/vocab_map.json (what the text tokenizer was read through) and
        init_from's hf_config.json (for to-hf-chameleon); absent ones are removed from RUN/model."""
        sources = {VOCAB_MAP_FILE: Path(self.config.data.text_tokenizer).parent / VOCAB_MAP_FILE,
                   HF_CONFIG_FILE: Path(self.config.init_from) / HF_CONFIG_FILE if self.config.init_from else None}
        for name, source in sources.items():
            if source is not None and source.is_file():
                shutil.copyfile(source, out / name)
            else:
                (out / name).unlink(missing_ok=True)

    def _chat_template_of_init(self) -> str | None:
        return read_chat_template(Path(self.config.init_from)) if self.config.init_from else None

    def _chat_template(self) -> str | None:
        """The template conversations were laid out in once the model has been trained on some (in this run,
        or before init_from; a converted Chameleon keeps its own); None for a model that never saw one."""
        if hasattr(self, "train_batches") and self.train_batches.stats.conversations:
            return self.chat_template
        return self._chat_template_of_init()
