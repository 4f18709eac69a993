"""The early-fusion training task: one model, `model.image.mode: tokens | latents`.

    loss = CE(next token) + z_loss                                   every mode
         + diffusion.loss_weight * MSE(prediction, noise | velocity)  latent mode (Transfusion)

logged as a breakdown: text_ce (targets that are text or control ids), image_ce (targets
that are image codes, token mode), z_loss, diffusion. Eval (every trainer.eval_every and at
the end) computes the same terms on the first data.eval_batches batches of
data.eval_source, with a fixed noise stream, so evals of one run and of two runs are
comparable; text_ppl = exp(text_ce).

The run config (FusionTrainConfig, `resolve`) is fusion_config.py's; what happens before training
(`prepare`: tokenizers into RUN/, model fields filled and checked, the memory bank opened,
init_from's tokenizer read as the engine reads it) is fusion_prepare.py's; both are re-exported
here, the module `mixmodal train` loads for `task: fusion`.
At the end the model is saved to RUN/model (config.yaml, model.safetensors and both
tokenizers): `mixmodal.load_model(RUN/model)` reads it. Fine-tuned from a converted Chameleon
(`init_from`), RUN/model is a folder of the same kind: vocab_map.json, hf_config.json and the
generation.yaml settings the folder stated (image_generation, image_preprocessing,
chat_template; max_length at least the folder's) are carried over, so `mixmodal generate`,
`serve` and `convert to-hf-chameleon` take it as they took the converted one.

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
from pathlib import Path
from typing import Any

import torch

from mixmodal.config import ConfigError, to_dict
from mixmodal.data.pipeline import IGNORE, DocumentEncoder, FusionBatches
from mixmodal.eval.shapes_tasks import ShapesEvalConfig, check_sampling, geneval_scores
from mixmodal.model import lora
from mixmodal.model.bundle import (HF_CONFIG_FILE, IMAGE_TOKENIZER_DIR, MODEL_DIR, TEXT_TOKENIZER_DIR, TRAINING_FILE,
                                   VOCAB_MAP_FILE, Bundle, load_text_tokenizer, read_chat_template, read_model_settings,
                                   write_generation_settings)
from mixmodal.model.fusion import FusionModel, ModelConfig
from mixmodal.model.patches import patchify
from mixmodal.model.io import (WEIGHTS_FILE, check_model_state, read_model_state, save_model_dir, tied_aliases,
                               write_model_dir)
from mixmodal.objectives.diffusion import build_schedule, clean_patch_mask, diffusion_loss, patch_code_loss, patch_map
from mixmodal.objectives.next_token import next_token_loss
from mixmodal.retrieval.augment import RetrievalAugmenter
from mixmodal.tokenizers.image import load_image_tokenizer
from mixmodal.tokenizers.patch import fit_codebook, nearest_centroid
from mixmodal.train import distributed
from mixmodal.train.checkpoint import artifact_remake
from mixmodal.train.fusion_config import (CONFIG, NOT_ARCHITECTURE, FusionDataConfig, FusionEvalConfig,
                                          FusionLossConfig, FusionTrainConfig, init_folder, resolve)
from mixmodal.train.fusion_prepare import (check_learnable_ids, check_retrieval, copy_dir, fill_model_config, prepare,
                                           prepare_text_tokenizer)
from mixmodal.train.image_data import open_image_source
from mixmodal.train.task import OptimizerSpec, TaskBase
from mixmodal.weights import read_weights, write_manifest


PATCH_CODE_IMAGES = 2000  # images whose latent patches model.image.patch_codes' centroids are fitted on
NEW_HEADS = ("patch_codebook", "patch_code_head.")  # tensors of a head fusion_config.ADDABLE lets a fine-tune add


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


def clean_patches(x0: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, targets: torch.Tensor | None, patch_size: int,
                  share: float, generator: torch.Generator):
    """diffusion.clean_patches: for a `share` of the target images, a random subset of their patches is fed
    clean at t = 0 and carries no loss (objectives/diffusion.py `clean_patch_mask`). Returns the inputs, the
    per-patch times [N, P] and the mask of the latent elements that carry loss [N, 1, h, w]."""
    n, p = x0.shape[0], patch_size
    clean = clean_patch_mask(n, (x0.shape[-1] // p) ** 2, share, generator).to(x0.device)
    if targets is not None:
        clean = clean & targets.to(x0.device)[:, None]
    pixels = patch_map(clean, p)
    noisy = torch.where(pixels, x0, noisy)
    times = torch.where(clean, torch.zeros((), dtype=t.dtype, device=t.device), t[:, None])
    return noisy, times, ~pixels


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
        if config.eval.sampling:  # named now, not at the first eval
            check_sampling(config.eval.sampling, "eval.sampling")

    def setup(self, device: torch.device) -> None:
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
        # the sampling its evals use and its model folder states: eval.sampling, else what init_from states
        self.image_sampling = (self.config.eval.sampling
                               or (self.init_settings.image_sampling if self.init_settings else None) or None)
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

    def architecture_defaults(self) -> dict:
        return {k: v for k, v in to_dict(ModelConfig()).items() if k not in NOT_ARCHITECTURE}

    def build_models(self) -> dict[str, torch.nn.Module]:
        model = FusionModel(self.config.model)
        if model.code_in is not None:  # the tokenizer's code vectors (init_from / a resume load them over these)
            model.set_code_features(self.image_tokenizer.code_vectors(self.config.model.image.code_vectors).cpu())
        if self.config.model.image.patch_codes:  # the head's classes (init_from / a resume load theirs over them)
            model.set_patch_codebook(self.fit_patch_codebook())
        if self.config.init_from:  # fine-tuning: the pretrained weights (a resume then loads its checkpoint over them)
            folder = Path(self.config.init_from)
            state = read_model_state(folder)  # a LoRA run's folder: its adapter merged
            for name, value in model.state_dict().items():  # a head the folder lacks (fusion_config ADDABLE): fresh
                if name.startswith(NEW_HEADS) and name not in state:
                    state[name] = value
            check_model_state(model, state, folder / WEIGHTS_FILE)
            for alias, owner in tied_aliases(model).items():
                state[alias] = state[owner]
            model.load_state_dict(state)
        if self.config.lora is not None:
            lora.apply_lora(model, self.config.lora)  # draws the adapters (seeded): base frozen, adapters trainable
        return {"model": model}

    @torch.no_grad()
    def fit_patch_codebook(self) -> torch.Tensor:
        """model.image.patch_codes = K centroids of the clean latent patches of the first PATCH_CODE_IMAGES images
        of data.source (encoded as training encodes them): a pure function of the source, so every rank and a
        restarted run fit the same ones (a resume loads the checkpoint's anyway)."""
        image = self.config.model.image
        source = open_image_source(self.config.data.source, self.image_tokenizer.config.resolution)
        images = []
        for doc in source:
            images += doc.images
            if len(images) >= PATCH_CODE_IMAGES:
                break
        if not images:
            raise ConfigError(f"model.image.patch_codes={image.patch_codes}: data.source={self.config.data.source} "
                              "yielded no images to fit the patch centroids on")
        latents = torch.stack(self._encoder().encode_images(images[:PATCH_CODE_IMAGES]))
        X = patchify(latents, image.patch_size).flatten(0, 1).cpu()
        centroids, _ = fit_codebook(X, image.patch_codes, torch.round(X * 1000).long(), iterations=25,
                                    seed=self.config.trainer.seed)
        return centroids

    def optimizers(self, models) -> dict[str, OptimizerSpec]:
        return {"model": OptimizerSpec(models["model"])}

    def generators(self) -> dict[str, torch.Generator]:
        return {"noise": self.noise}

    def _patch_codebook(self, model) -> torch.Tensor:
        return getattr(model, "module", model).patch_codebook  # under DDP, the wrapped model's

    def _encoder(self) -> DocumentEncoder:
        """Documents -> ids and latents, as training, evaluation and the patch centroids' fit read them."""
        return DocumentEncoder(self.text_tokenizer, self.image_tokenizer, self.vocab, self.config.model.image.mode,
                               self.device, chat_template=self.chat_template, image_preprocessing=self.image_preprocessing)

    def _batches(self, spec: str, batch_size: int, endless: bool, rank: int, world: int) -> FusionBatches:
        resolution = self.image_tokenizer.config.resolution

        def source():
            s = open_image_source(spec, resolution)
            s.rank, s.world_size = rank, world
            s.log.strict = self.config.data.strict
            return s

        encoder = self._encoder()
        augmenter = None
        if self.config.data.retrieval.enabled:
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
        loss_mask = None
        if self.latent and batch["image_latents"].numel():
            x0 = batch["image_latents"]
            n = x0.shape[0]
            limited = batch["image_limited"].cpu()
            if self.config.diffusion.noise_limit_read:
                limited = limited | batch["image_read"].cpu()
            t = self.schedule.sample_times(n, generator=generator, device=torch.device("cpu"),
                                           limited=limited).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            targets = batch.get("image_loss")
            if self.config.diffusion.clean_read > 0:  # read images fed clean, as the engine feeds them, no loss
                clean = batch["image_read"].cpu() & (torch.rand(n, generator=generator) < self.config.diffusion.clean_read)
                targets = ~clean if targets is None else targets & ~clean.to(targets.device)
            noisy, t, image_weights = noise_images(self.schedule, x0, noise, t, targets, batch.get("image_weights"))
            target = self.schedule.target(x0, noise, t)
            if self.config.diffusion.clean_patches > 0:
                noisy, t, loss_mask = clean_patches(x0, noisy, t, targets, image.patch_size,
                                                    self.config.diffusion.clean_patches, generator)
            kwargs.update(image_latents=noisy, image_times=t, image_index=batch["image_index"])
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
                                           image_weights=image_weights, element_mask=loss_mask)
                losses["loss"] = losses["loss"] + diffusion
                if out.image_code_logits is not None:  # image.patch_codes: which centroid each clean patch is
                    codes = nearest_centroid(patchify(x0, image.patch_size).flatten(0, 1).float(),
                                             self._patch_codebook(model)).view(out.image_code_logits.shape[:2])
                    patch_mask = None if loss_mask is None else loss_mask[:, 0, ::image.patch_size, ::image.patch_size].flatten(1)
                    code_ce = patch_code_loss(out.image_code_logits, codes, weight=1.0, image_weights=image_weights,
                                              patch_mask=patch_mask)
                    losses["loss"] = losses["loss"] + self.config.diffusion.code_loss_weight * code_ce
                    losses["patch_code_ce"] = code_ce.detach()
            else:  # a batch without images: keep the graph shape of every step the same
                diffusion = out.logits.sum() * 0.0
                if image.patch_codes:
                    losses["patch_code_ce"] = diffusion.detach()
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
        e = self.config.eval
        bundle = Bundle(model, self.text_tokenizer, self.image_tokenizer, max_length=self.config.data.pipeline.seq_len,
                        diffusion=self.config.diffusion if self.latent else None,
                        image_generation=self.init_settings.image_generation if self.init_settings else True,
                        image_preprocessing=self.image_preprocessing, image_sampling=self.image_sampling)
        suite = ShapesEvalConfig(geneval_prompts=e.geneval_prompts, images_per_prompt=e.images_per_prompt,
                                 batch_size=e.batch_size)
        return geneval_scores(bundle, suite, e.geneval_sets)

    def save_artifacts(self, models, run_dir: Path) -> None:
        out = Path(run_dir) / MODEL_DIR
        model = models["model"]
        # An earlier RUN/model's manifest stays until the last line, so a crash in between leaves a folder that fails it
        if self.config.lora is not None:  # the base as it was (init_from's dtype: it never changed) + the adapter
            self._save_base(model, out)
            lora.save_adapter(model, self.config.lora, out)
        else:
            save_model_dir(model, out, manifest=False)
            lora.remove_adapter(out)
        copy_dir(Path(self.config.data.text_tokenizer), out / TEXT_TOKENIZER_DIR)
        copy_dir(Path(self.config.data.image_tokenizer), out / IMAGE_TOKENIZER_DIR)
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
                                                       else None),
                                  image_sampling=getattr(self, "image_sampling", None))
        write_manifest(out, remake=artifact_remake(run_dir))  # last: every file above, sizes and SHA-256s

    def _save_base(self, model, out: Path) -> None:
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


__all__ = ["CONFIG", "FusionDataConfig", "FusionEvalConfig", "FusionLossConfig", "FusionTask", "FusionTrainConfig",
           "build_task", "check_learnable_ids", "check_retrieval", "fill_model_config", "init_folder", "noise_images",
           "prepare", "prepare_text_tokenizer", "resolve", "training_compute"]
