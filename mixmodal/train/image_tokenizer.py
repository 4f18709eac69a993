"""The image-tokenizer training task (VQ or KL-VAE), run by the generic Trainer.

    loss = reconstruction_weight * (l1 | l2)(reconstruction, image)
         + codebook_weight * (codebook + commitment)           VQ (commitment carries tokenizer.vq.beta)
         + tokenizer.vae.kl_weight * KL                          VAE
         + gan.weight * adaptive * hinge_generator_loss          after gan.start_step, if gan.weight > 0
    disc_loss = hinge on real vs detached reconstructions      (the discriminator's own optimizer)

Eval (every trainer.eval_every and at the end, on the first eval.num_images of
data.eval_source): PSNR, SSIM, codebook usage and perplexity (VQ), mean KL (VAE), and the
shapes oracle on reconstructions: the fraction whose parse is exactly the original scene
(oracle_overall) and per attribute. A sample grid (original | reconstruction) goes to
RUN/samples/step_NNNNNN.png; at the end the tokenizer is saved to RUN/tokenizer/ (for a
VAE after fitting its latent scaling factor).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import PIL.Image
import torch
import torch.nn.functional as F

from mixmodal.config import ConfigError, load_yaml, merge, relative_to_config, to_dict
from mixmodal.data.shapes import Scene, score
from mixmodal.eval.image_metrics import psnr, ssim
from mixmodal.tokenizers.image import build_image_tokenizer, save_image_tokenizer
from mixmodal.tokenizers.pixels import tensor_to_images
from mixmodal.tokenizers.vae import VAEConfig, fit_latent_scaling
from mixmodal.tokenizers.vq import VQConfig, stats_from_counts
from mixmodal.train import distributed
from mixmodal.train.checkpoint import artifact_remake
from mixmodal.train.image_data import ImageBatches, eval_images
from mixmodal.train.patch_gan import (
    GANConfig,
    PatchDiscriminator,
    adaptive_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    last_decoder_weight,
)
from mixmodal.train.task import OptimizerSpec, TaskBase
from mixmodal.train.trainer import TrainerConfig

# Model-config fields that change training, not the shape of the weights: a resume may change them.
NOT_ARCHITECTURE = {"beta", "ema_decay", "restart_after", "kl_weight", "scaling_factor", "shift_factor"}
ORACLE_KEYS = ("overall", "count", "colour", "shape", "size", "position", "background")


@dataclass
class TokenizerChoice:
    """Which tokenizer to train (`kind`) and its model config; only that kind's section is needed."""

    kind: Literal["vq", "vae"] = "vq"
    vq: VQConfig | None = None
    vae: VAEConfig | None = None

    def __post_init__(self) -> None:
        if self.kind == "vq" and self.vq is None:
            self.vq = VQConfig()
        if self.kind == "vae" and self.vae is None:
            self.vae = VAEConfig()

    @property
    def model(self) -> VQConfig | VAEConfig:
        return self.vq if self.kind == "vq" else self.vae


@dataclass
class ImageDataConfig:
    source: str = "shapes:split=train"  # any open_source spec; shapes renders at the tokenizer's resolution
    eval_source: str = "shapes:split=heldout"


@dataclass
class ImageLossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"
    reconstruction_weight: float = 1.0
    codebook_weight: float = 1.0  # VQ: multiplies codebook + commitment
    gan: GANConfig = field(default_factory=GANConfig)


@dataclass
class ImageEvalConfig:
    num_images: int = 256
    batch_size: int = 64
    num_samples: int = 16  # image pairs in the sample grid
    oracle: bool = True  # score reconstructions with the shapes oracle (when the eval images have scenes)


@dataclass
class ImageTokenizerTrainConfig:
    task: Literal["image-tokenizer"] = "image-tokenizer"
    tokenizer: TokenizerChoice = field(default_factory=TokenizerChoice)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: ImageLossConfig = field(default_factory=ImageLossConfig)
    eval: ImageEvalConfig = field(default_factory=ImageEvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


CONFIG = ImageTokenizerTrainConfig


def resolve(data: dict, base_dir: Path) -> dict:
    """Expand `tokenizer.preset: PATH` (a model preset, `kind:` + fields, as in
    configs/tokenizers/models/; relative to the config file, else to the working directory)
    into `tokenizer.kind` and `tokenizer.<kind>`; fields given inline win over the preset's."""
    section = data.get("tokenizer")
    if not isinstance(section, dict) or "preset" not in section:
        return data
    section = dict(section)
    path = relative_to_config(str(section.pop("preset")), base_dir)
    preset = load_yaml(path)
    kind = preset.pop("kind", None)
    if kind not in ("vq", "vae"):
        raise ConfigError(f"{path}: kind: expected vq or vae (the image tokenizer type), got {kind!r}")
    if "kind" in section and str(section["kind"]) != kind:
        raise ConfigError(f"tokenizer.kind={section['kind']} contradicts tokenizer.preset {path} (kind: {kind})")
    section["kind"] = kind
    section[kind] = merge(preset, section.get(kind) or {})
    return {**data, "tokenizer": section}


def build_task(config: ImageTokenizerTrainConfig) -> "ImageTokenizerTask":
    return ImageTokenizerTask(config)


class ImageTokenizerTask(TaskBase):
    progress_keys = ("loss", "rec", "perplexity", "kl")

    def __init__(self, config: ImageTokenizerTrainConfig) -> None:
        self.config = config
        self.kind = config.tokenizer.kind
        self.model_config = config.tokenizer.model
        self.resolution = self.model_config.resolution
        self.device = torch.device("cpu")
        self.noise = torch.Generator()  # the VAE's posterior samples; seeded in setup
        self._eval: tuple[torch.Tensor, list] | None = None

    @property
    def gan(self) -> GANConfig:
        return self.config.loss.gan

    def setup(self, device: torch.device) -> None:
        self.device = device
        self.noise = torch.Generator(device=device).manual_seed(distributed.rank_seed(self.config.trainer.seed + 1))

    def architecture(self) -> dict:
        model = {k: v for k, v in to_dict(self.model_config).items() if k not in NOT_ARCHITECTURE}
        arch: dict[str, Any] = {"tokenizer": {"kind": self.kind, **model}}
        if self.gan.weight > 0:
            arch["discriminator"] = {"channels": self.gan.channels, "num_layers": self.gan.num_layers}
        return arch

    def build_models(self) -> dict[str, torch.nn.Module]:
        # A copy: fitting the VAE's scaling factor writes into the model's config, not the run's.
        models = {"tokenizer": build_image_tokenizer(copy.deepcopy(self.model_config))}
        if self.gan.weight > 0:
            models["discriminator"] = PatchDiscriminator(self.gan)
        return models

    def optimizers(self, models) -> dict[str, OptimizerSpec]:
        specs = {"tokenizer": OptimizerSpec(models["tokenizer"], "loss")}
        if "discriminator" in models:  # taming's GAN betas: a short memory suits the moving target
            specs["discriminator"] = OptimizerSpec(models["discriminator"], "disc_loss", lr=self.gan.lr, betas=(0.5, 0.9))
        return specs

    def data_iterator(self) -> ImageBatches:
        t = self.config.trainer
        return ImageBatches(self.config.data.source, self.resolution, t.batch_size, t.num_workers)

    def generators(self) -> dict[str, torch.Generator]:
        return {"noise": self.noise}

    def locally_updated_modules(self, models) -> list[torch.nn.Module]:
        # The VQ codebook's EMA and dead-code restarts run in the forward pass on each rank's
        # own batch; under data parallelism rank 0's codebook is copied to all after each update.
        return [models["tokenizer"].quantize] if self.kind == "vq" else []

    # -- training --

    def train_step(self, models, batch: torch.Tensor, step: int) -> dict[str, Any]:
        model = models["tokenizer"]
        loss_config = self.config.loss
        losses: dict[str, Any] = {}
        if self.kind == "vq":
            out = model(batch)
            regulariser = loss_config.codebook_weight * (out.losses["codebook"] + out.losses["commitment"])
            losses.update(codebook=out.losses["codebook"], commitment=out.losses["commitment"], **out.stats)
        else:
            out = model(batch, generator=self.noise)
            regulariser = self.model_config.kl_weight * out.losses["kl"]
            losses["kl"] = out.losses["kl"]
        reconstruction = out.reconstruction.float()  # (B, 3, R, R)
        error = F.l1_loss if loss_config.reconstruction == "l1" else F.mse_loss
        rec = loss_config.reconstruction_weight * error(reconstruction, batch)
        loss = rec + regulariser
        losses["rec"] = rec
        if self.gan.weight > 0 and step >= self.gan.start_step:
            discriminator = models["discriminator"]
            adversarial = hinge_generator_loss(discriminator(reconstruction))
            last_layer = last_decoder_weight(getattr(model, "module", model))  # DDP wraps the model: look inside
            scale = adaptive_weight(rec, adversarial, last_layer) if self.gan.adaptive_weight else 1.0
            loss = loss + self.gan.weight * scale * adversarial
            losses.update(g_adv=adversarial, gan_scale=scale,
                          disc_loss=hinge_discriminator_loss(discriminator(batch), discriminator(reconstruction.detach())))
        losses["loss"] = loss
        return losses

    # -- evaluation --

    def _eval_set(self) -> tuple[torch.Tensor, list]:
        if self._eval is None:
            self._eval = eval_images(self.config.data.eval_source, self.resolution, self.config.eval.num_images)
        return self._eval

    def evaluate(self, models, step: int, run_dir: Path) -> dict[str, Any]:
        images, scenes = self._eval_set()
        recons, metrics = evaluate_reconstructions(models["tokenizer"], images, scenes if self.config.eval.oracle else None,
                                                   batch_size=self.config.eval.batch_size, device=self.device)
        if self.config.eval.num_samples:
            save_sample_grid(images, recons, self.config.eval.num_samples, run_dir / "samples" / f"step_{step:06d}.png")
        return metrics

    def save_artifacts(self, models, run_dir: Path) -> None:
        model = models["tokenizer"].eval()
        if self.kind == "vae":  # Stable Diffusion's recipe: 1 / std of latents of training images
            images, _ = eval_images(self.config.data.source, self.resolution, self.config.eval.num_images)
            fit_latent_scaling(model, (c.to(self.device) for c in images.split(self.config.eval.batch_size)))
        save_image_tokenizer(model, run_dir / "tokenizer", remake=artifact_remake(run_dir))


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu"):
    """Deterministic reconstructions of (N, 3, R, R) images in batches: VQ codes, the VAE's
    posterior mean. Returns (reconstructions clamped to [-1, 1] on the CPU, stats: codebook
    usage and perplexity over all N images (VQ) or the mean KL (VAE))."""
    out, kl_total = [], 0.0
    counts = torch.zeros(getattr(model, "num_codes", 1), dtype=torch.long)
    for chunk in images.split(batch_size):
        x = chunk.to(device)
        if model.kind == "vq":
            result = model(x)
            counts += torch.bincount(result.codes.flatten().cpu(), minlength=model.num_codes)
            recon = result.reconstruction
        elif model.discrete:  # a computed codebook (tokenizers/patch.py)
            codes = model.encode(x)
            counts += torch.bincount(codes.flatten().cpu(), minlength=model.num_codes)
            recon = model.decode(codes)
        else:
            posterior = model.encode_distribution(x)
            kl_total += float(posterior.kl().float().sum())
            recon = model.decode(posterior.mean)
        out.append(recon.float().clamp(-1, 1).cpu())
    stats = stats_from_counts(counts) if model.discrete else {"kl": kl_total / len(images)}
    return torch.cat(out), stats


def evaluate_reconstructions(model, images: torch.Tensor, scenes: list | None, batch_size: int = 64,
                             device: str | torch.device = "cpu") -> tuple[torch.Tensor, dict[str, Any]]:
    """PSNR, SSIM, codebook usage/perplexity (VQ) or KL (VAE) of `model`'s reconstructions of
    `images` ((N, 3, R, R) in [-1, 1]), and, when every image has its shapes scene, the oracle
    on the reconstructions: `oracle_overall` = fraction parsed back to exactly the original
    scene, plus per attribute. Returns (reconstructions, metrics)."""
    recons, stats = reconstruct(model, images, batch_size, device)
    a, b = (images + 1) / 2, (recons + 1) / 2  # [0, 1]
    metrics = {"psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean()), **stats}
    if scenes and all(s is not None for s in scenes):
        totals = dict.fromkeys(ORACLE_KEYS, 0.0)
        for image, scene in zip(tensor_to_images(recons), scenes):
            scores = score(image, Scene.from_dict(scene))
            for key in ORACLE_KEYS:
                totals[key] += scores[key]
        metrics.update({f"oracle_{k}": v / len(scenes) for k, v in totals.items()})
    return recons, metrics


def save_sample_grid(images: torch.Tensor, recons: torch.Tensor, num: int, path: Path, columns: int = 4) -> Path:
    """A PNG of `num` (original | reconstruction) pairs, `columns` pairs per row."""
    num = min(num, len(images))
    originals, reconstructions = tensor_to_images(images[:num]), tensor_to_images(recons[:num])
    side, gap = images.shape[-1], 2
    rows = (num + columns - 1) // columns
    sheet = PIL.Image.new("RGB", (columns * (2 * side + gap) - gap, rows * (side + gap) - gap), (255, 255, 255))
    for i, (original, recon) in enumerate(zip(originals, reconstructions)):
        x, y = (i % columns) * (2 * side + gap), (i // columns) * (side + gap)
        sheet.paste(original, (x, y))
        sheet.paste(recon, (x + side, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
