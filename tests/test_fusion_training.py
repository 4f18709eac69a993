"""The early-fusion task end to end on tiny models: packing, both image modes, the loss
breakdown, exact resume, the non-finite guard, and configs that contradict themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixmodal.config import ConfigError
from mixmodal.data.pipeline import IGNORE, DocumentEncoder, FusionBatches, PipelineConfig
from mixmodal.data.sources import ShapesSource
from mixmodal.data.shapes import ShapesConfig
from mixmodal.objectives.diffusion import DiffusionConfig
from mixmodal.tokenizers.image import save_image_tokenizer
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer
from mixmodal.train import checkpoint as ckpt
from mixmodal.train.metrics import read_metrics
from mixmodal.train.run import load_run_config, train
from mixmodal.train.trainer import TrainingError
from mixmodal.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
TINY = {"tokens": ROOT / "configs/models/tiny-tokens.yaml", "latents": ROOT / "configs/models/tiny-latents.yaml"}
SHAPES32 = ShapesConfig(resolution=32)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Random tiny image tokenizers (32 px, x4 down: 8 x 8 per image) and a small BPE."""
    root = tmp_path_factory.mktemp("tokenizers")
    torch.manual_seed(0)
    trunk = dict(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2], num_res_blocks=1, norm_groups=4)
    save_image_tokenizer(VQTokenizer(VQConfig(**trunk, latent_channels=8, codebook_size=64, codebook_dim=4)), root / "vq")
    save_image_tokenizer(VAETokenizer(VAEConfig(**trunk, latent_channels=4)), root / "vae")
    texts = (t for doc in ShapesSource(SHAPES32, num=300) for t in doc.texts)
    TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=300)).save(root / "text")
    return {"vq": root / "vq", "vae": root / "vae", "text": root / "text"}


def _config(mode: str, tokenizers, *overrides: str):
    kind = "vq" if mode == "tokens" else "vae"
    return load_run_config(TINY[mode], [f"data.image_tokenizer={tokenizers[kind]}",
                                        f"data.text_tokenizer={tokenizers['text']}", *overrides])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))


# --- the pipeline ----------------------------------------------------------------------------

def _batches(tokenizers, mode: str, seq_len: int = 160, batch_size: int = 3, **pipeline):
    from mixmodal.tokenizers.image import load_image_tokenizer

    text = TextTokenizer.load(tokenizers["text"])
    image = load_image_tokenizer(tokenizers["vq" if mode == "tokens" else "vae"])
    vocab = Vocab(text.vocab_size, 64 if mode == "tokens" else 0)
    encoder = DocumentEncoder(text, image, vocab, mode)
    per_image = 64 if mode == "tokens" else 16
    return FusionBatches(lambda: ShapesSource(SHAPES32), encoder, PipelineConfig(seq_len=seq_len, **pipeline),
                         batch_size, per_image, seed=0), vocab


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_packed_rows_keep_documents_apart_and_shift_targets(tokenizers, mode):
    it, vocab = _batches(tokenizers, mode)
    batch = next(it)
    ids, labels, docs = batch["input_ids"], batch["labels"], batch["document_ids"]
    for r in range(ids.shape[0]):
        for d in docs[r].unique().tolist():
            if d < 0:
                assert (ids[r][docs[r] == d] == vocab.pad).all() and (labels[r][docs[r] == d] == IGNORE).all()
                continue
            where = (docs[r] == d).nonzero().flatten()
            seq, lab = ids[r, where], labels[r, where]
            assert seq[0] == vocab.bos and seq[-1] == vocab.eos
            assert (batch["positions"][r, where] == torch.arange(len(where))).all()  # RoPE restarts per document
            assert lab[-1] == IGNORE  # nothing predicted across the document boundary
            ok = lab[:-1] != IGNORE
            assert (lab[:-1][ok] == seq[1:][ok]).all()  # labels are the next ids
            n_images = int((seq == vocab.boi).sum())
            assert n_images == int((seq == vocab.eoi).sum())
    if mode == "tokens":
        codes = vocab.is_image_code(ids)
        assert codes.any() and (batch["image_ids"][codes] >= 0).all()
    else:
        index = batch["image_index"]
        assert batch["image_latents"].shape == (index.shape[0], 4, 8, 8)
        flat_ids, flat_labels = ids.flatten(), labels.flatten()
        assert (flat_ids[index] == vocab.pad).all()  # placeholders
        assert (flat_labels[index] == IGNORE).all()  # no CE on latent positions (nor on the forced <eoi>)
        starts = index[:, 0]
        assert (flat_ids[starts - 1] == vocab.boi).all() and (flat_ids[index[:, -1] + 1] == vocab.eoi).all()
        assert len(batch["image_limited"]) == index.shape[0]


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_pipeline_resumes_exactly(tokenizers, mode):
    straight, _ = _batches(tokenizers, mode)
    expected = [next(straight) for _ in range(4)]
    first, _ = _batches(tokenizers, mode)
    for _ in range(2):
        next(first)
    resumed, _ = _batches(tokenizers, mode)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for want in expected[2:]:
        got = next(resumed)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_cm3_sentinels_are_not_targets(tokenizers):
    from mixmodal.data.cm3 import CM3Config

    it, vocab = _batches(tokenizers, "tokens", seq_len=200, cm3=CM3Config(rate=1.0))
    batch = next(it)
    is_mask = (batch["input_ids"] >= vocab.mask(0)) & (batch["input_ids"] < vocab.mask(0) + len(vocab.mask_ids))
    assert is_mask.any()
    labels = batch["labels"]
    assert not ((labels >= vocab.mask(0)) & (labels < vocab.mask(0) + len(vocab.mask_ids))).any()


def test_long_documents_are_cut_at_part_boundaries(tokenizers):
    it, vocab = _batches(tokenizers, "tokens", seq_len=100)  # one 64-code image per row at most
    for _ in range(3):
        batch = next(it)
        for r in range(batch["input_ids"].shape[0]):
            row = batch["input_ids"][r]
            assert int((row == vocab.boi).sum()) == int((row == vocab.eoi).sum()) <= 1
    assert it.stats.truncated > 0


# --- training ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_trains_and_reports_the_loss_breakdown(tokenizers, tmp_path, mode):
    config = _config(mode, tokenizers, "trainer.steps=4", "trainer.log_every=1")
    result = train(config, tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    keys = set(records[0]["losses"])
    want = {"loss", "text_ce", "z_loss"} | ({"image_ce"} if mode == "tokens" else {"diffusion"})
    assert want <= keys
    assert all(torch.isfinite(torch.tensor(v)) for r in records for v in r["losses"].values())
    assert "eval_text_ce" in result
    from mixmodal.model.io import load_model_dir

    model = load_model_dir(tmp_path / "run" / "model")
    assert (tmp_path / "run" / "model" / "text_tokenizer" / "tokenizer.json").is_file()
    out = model(torch.tensor([[1, 20, 30]]))
    assert out.logits.shape == (1, 3, model.vocab.size)
    # what training cost, from the model's own accounting (mixmodal eval and the study read it)
    import json

    compute = json.loads((tmp_path / "run" / "model" / "training.json").read_text())
    seq_len = config.data.pipeline.seq_len
    assert compute["steps"] == 4 and compute["positions"] == 4 * config.trainer.batch_size * seq_len
    assert compute["flops"] == pytest.approx(compute["positions"] * model.flops_per_token(seq_len))
    assert 0 < compute["fill"] <= 1 and compute["non_padding_flops"] == pytest.approx(compute["flops"] * compute["fill"])


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_geneval_during_training_logs_the_accuracy_curve(tokenizers, tmp_path, mode):
    config = _config(mode, tokenizers, "trainer.steps=2", "trainer.eval_every=1", "trainer.ema_decay=0.9",
                     "eval.geneval_prompts=1", "eval.geneval_sets=[heldout,heldout-combos]")
    train(config, tmp_path / "run")
    evals = read_metrics(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [1, 2]
    for record in evals:
        m = record["metrics"]
        assert set(m) >= {"geneval_heldout_overall", "geneval_heldout_single_object", "geneval_heldout_combos_overall",
                          "geneval_heldout_combos_colors"}
        assert all(0.0 <= m[k] <= 1.0 for k in m if k.startswith("geneval_"))
    with pytest.raises(ValueError, match="geneval_sets"):
        _config(mode, tokenizers, "eval.geneval_sets=[train]")


@pytest.mark.parametrize("mode, overrides", [("tokens", []), ("latents", []),
                                             ("latents", ["diffusion.clean_patches=0.5", "diffusion.kind=flow"]),
                                             ("latents", ["model.image.patch_codes=16", "diffusion.clean_patches=0.5"])])
def test_losses_fall_on_a_repeated_batch(tokenizers, mode, overrides):
    """Overfitting one batch: every loss term must fall (the gradient reaches every part), also when some
    patches are fed clean at t = 0 without loss (diffusion.clean_patches) and with the patch-code head."""
    from mixmodal.train.fusion import FusionTask, fill_model_config

    config = _config(mode, tokenizers, *overrides)
    fill_model_config(config)
    task = FusionTask(config)
    task.setup(torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_models()["model"]
    batch = next(task.data_iterator())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    keys = ["text_ce", "image_ce"] if mode == "tokens" else ["text_ce", "diffusion"]
    if config.model.image.patch_codes:
        keys.append("patch_code_ce")
    history = []
    for step in range(40):
        task.noise.manual_seed(7)  # the same noise every step: the diffusion term is a fixed target
        losses = task.losses(model, batch, task.noise)
        history.append({k: float(losses[k]) for k in keys})
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    for k in keys:
        assert history[-1][k] < 0.7 * history[0][k], (k, history[0][k], history[-1][k])


@pytest.mark.parametrize("read", [False, True])
def test_noise_limit_read_caps_the_images_a_text_target_reads(tokenizers, monkeypatch, read):
    from mixmodal.train.fusion import FusionTask, fill_model_config

    config = _config("latents", tokenizers, f"diffusion.noise_limit_read={str(read).lower()}")
    fill_model_config(config)
    task = FusionTask(config)
    task.setup(torch.device("cpu"))
    model = task.build_models()["model"]
    batch = next(task.data_iterator())
    n = batch["image_latents"].shape[0]
    batch["image_limited"] = torch.zeros(n, dtype=torch.bool)
    batch["image_read"] = torch.arange(n) % 2 == 0
    seen = {}
    sample = task.schedule.sample_times

    def spy(count, **kwargs):
        seen["limited"] = kwargs["limited"].clone()
        return sample(count, **kwargs)

    monkeypatch.setattr(task.schedule, "sample_times", spy)
    task.losses(model, batch, task.noise)
    assert seen["limited"].tolist() == (batch["image_read"] if read else batch["image_limited"]).tolist()


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_clean_read_feeds_the_images_text_reads_clean_and_without_loss(tokenizers, monkeypatch, share):
    import mixmodal.train.fusion as fusion

    config = _config("latents", tokenizers, f"diffusion.clean_read={share}")
    fusion.fill_model_config(config)
    task = fusion.FusionTask(config)
    task.setup(torch.device("cpu"))
    model = task.build_models()["model"]
    batch = next(task.data_iterator())
    n = batch["image_latents"].shape[0]
    assert n >= 2
    batch["image_read"] = torch.arange(n) % 2 == 0
    batch["image_loss"] = torch.ones(n, dtype=torch.bool)
    seen = {}
    real = fusion.noise_images

    def spy(schedule, x0, noise, t, targets, weights):
        out = real(schedule, x0, noise, t, targets, weights)
        seen.update(x0=x0, noisy=out[0], weights=out[2])
        return out

    monkeypatch.setattr(fusion, "noise_images", spy)
    task.losses(model, batch, task.noise)
    read = batch["image_read"]
    same = [torch.equal(seen["noisy"][i], seen["x0"][i]) for i in range(n)]
    if share:
        assert same == read.tolist()  # read images clean, the others noised
        assert seen["weights"].tolist() == (~read).float().tolist()
    else:
        assert not any(same)
        assert seen["weights"] is None or bool((seen["weights"] > 0).all())


@pytest.mark.parametrize("mode, extra", [("tokens", []), ("latents", []), ("latents", ["model.image.patch_codes=16"])])
def test_resume_is_bitwise_exact(tokenizers, tmp_path, mode, extra):
    common = ["trainer.steps=6", "trainer.save_every=3", "model.transformer.dropout=0.1", *extra]
    train(_config(mode, tokenizers, *common), tmp_path / "straight")
    cut = _config(mode, tokenizers, *common, "trainer.steps=3")
    train(cut, tmp_path / "resumed")
    train(_config(mode, tokenizers, *common, "trainer.resume=true"), tmp_path / "resumed")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nonfinite_losses_skip_steps_then_stop_with_the_last_checkpoint(tokenizers, tmp_path, monkeypatch):
    from mixmodal.train.fusion import FusionTask

    real = FusionTask.train_step

    def poisoned(self, models, batch, step):
        losses = real(self, models, batch, step)
        if step >= 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(FusionTask, "train_step", poisoned)
    config = _config("tokens", tokenizers, "trainer.steps=20", "trainer.save_every=2", "trainer.max_nonfinite_streak=3")
    with pytest.raises(TrainingError, match="non-finite"):
        train(config, tmp_path / "run")
    assert ckpt.latest_checkpoint(tmp_path / "run").name.endswith("000002")
    skipped = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "nonfinite"]
    assert len(skipped) == 3


def test_contradictory_configs_fail_before_training_naming_the_keys(tokenizers, tmp_path):
    with pytest.raises(ConfigError, match=r"model.image.mode=latents.*VQ"):
        train(_config("latents", tokenizers, f"data.image_tokenizer={tokenizers['vq']}"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"model.image.mode=tokens.*KL-VAE"):
        train(_config("tokens", tokenizers, f"data.image_tokenizer={tokenizers['vae']}"), tmp_path / "b")
    with pytest.raises(ConfigError, match=r"data.pipeline.seq_len=40 is shorter than one image.*>= 68"):
        train(_config("tokens", tokenizers, "data.pipeline.seq_len=40"), tmp_path / "c")
    with pytest.raises(ConfigError, match=r"model.image.patch_size=3"):
        train(_config("latents", tokenizers, "model.image.patch_size=3"), tmp_path / "d")
    with pytest.raises(ConfigError, match=r"model.image.num_codes=999 contradicts"):
        train(_config("tokens", tokenizers, "model.image.num_codes=999"), tmp_path / "e")
    with pytest.raises(ConfigError, match="data.image_tokenizer"):
        train(_config("tokens", tokenizers, "data.image_tokenizer="), tmp_path / "f")
    with pytest.raises(ConfigError, match=r"diffusion.clean_patches=0.5 .*patchify unet"):
        train(_config("latents", tokenizers, "diffusion.clean_patches=0.5", "model.image.patchify=unet"), tmp_path / "g")
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_patch_code_head_classifies_clean_patches_and_a_fine_tune_can_add_it(tokenizers, tmp_path):
    """model.image.patch_codes: K centroids of the clean latent patches, fitted from data.source when the run
    starts and saved with the weights; the head's loss is logged. init_from a run without the head adds a fresh
    one and loads everything else; a different K than the folder's is a contradiction."""
    from mixmodal.model.patches import patchify
    from mixmodal.model.io import load_model_dir, read_model_state
    from mixmodal.tokenizers.patch import nearest_centroid
    from mixmodal.train.fusion import FusionTask, fill_model_config

    config = _config("latents", tokenizers, "model.image.patch_codes=16")
    fill_model_config(config)
    task = FusionTask(config)
    task.setup(torch.device("cpu"))
    model = task.build_models()["model"]
    centroids = model.patch_codebook
    assert centroids.shape == (16, 4 * 2 * 2) and len(centroids.unique(dim=0)) == 16
    batch = next(task.data_iterator())
    patches = patchify(batch["image_latents"], 2).flatten(0, 1)
    own = ((patches - centroids[nearest_centroid(patches, centroids)]) ** 2).sum(1)
    assert bool((own <= ((patches[:, None] - centroids[None]) ** 2).sum(2).min(1).values + 1e-5).all())
    assert torch.equal(task.fit_patch_codebook(), centroids)  # a pure function of the source
    out = model(batch["input_ids"], positions=batch["positions"], document_ids=batch["document_ids"],
                image_ids=batch["image_ids"], image_latents=batch["image_latents"],
                image_times=torch.full((len(batch["image_latents"]),), 0.5), image_index=batch["image_index"])
    assert out.image_code_logits.shape == (*batch["image_index"].shape, 16)

    train(_config("latents", tokenizers, "trainer.steps=2"), tmp_path / "base")
    train(_config("latents", tokenizers, "trainer.steps=2", "trainer.log_every=1", "model.image.patch_codes=16",
                  f"init_from={tmp_path / 'base'}"), tmp_path / "ft")
    assert all("patch_code_ce" in r["losses"] for r in read_metrics(tmp_path / "ft", "train"))
    base, ft = read_model_state(tmp_path / "base" / "model"), load_model_dir(tmp_path / "ft" / "model")
    assert ft.config.image.patch_codes == 16 and ft.patch_codebook.abs().sum() > 0
    assert not any(k.startswith("patch_code") for k in base)
    with pytest.raises(ConfigError, match="model.image.patch_codes = 8 contradicts"):
        train(_config("latents", tokenizers, "model.image.patch_codes=8", f"init_from={tmp_path / 'ft'}"),
              tmp_path / "bad")
    with pytest.raises(ValueError, match="image.patch_codes=8.*latents only"):
        _config("tokens", tokenizers, "model.image.patch_codes=8")


def test_clean_patches_feed_some_patches_clean_at_time_zero_without_loss(tokenizers):
    from mixmodal.objectives.diffusion import build_schedule
    from mixmodal.train.fusion import clean_patches

    schedule = build_schedule(DiffusionConfig(kind="flow"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    t = torch.rand(64, generator=g) * 0.9 + 0.05
    noisy = schedule.add_noise(x0, noise, t)
    targets = torch.ones(64, dtype=torch.bool)
    targets[:8] = False  # a user's image in a conversation: read clean, no patch of it is touched
    fed, times, loss_mask = clean_patches(x0, noisy, t, targets, 2, 1.0, torch.Generator().manual_seed(1))
    assert times.shape == (64, 16) and loss_mask.shape == (64, 1, 8, 8)
    clean = times == 0
    assert not clean[:8].any() and clean[8:].any(1).float().mean() > 0.8 and not clean.all(1).any()
    assert torch.equal(times[~clean], t[:, None].expand(-1, 16)[~clean])
    for i in (8, 20, 63):  # each patch: 2 x 2 latent pixels
        for k in range(16):
            r, c = divmod(k, 4)
            cell = (slice(None), slice(2 * r, 2 * r + 2), slice(2 * c, 2 * c + 2))
            assert torch.equal(fed[i][cell], (x0 if clean[i, k] else noisy)[i][cell])
            assert bool(loss_mask[i][(slice(None),) + cell[1:]].all()) == (not clean[i, k])


def test_two_process_torchrun_trains_the_latent_model(tokenizers, tmp_path):
    """`torchrun -m mixmodal train`: the CLI path, DDP with unused patch layers on image-less
    batches allowed; rank 0 alone writes the summary, metrics and the model."""
    import os
    import subprocess
    import sys

    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mixmodal",
               "train", str(TINY["latents"]), "--out", str(run), f"data.image_tokenizer={tokenizers['vae']}",
               f"data.text_tokenizer={tokenizers['text']}", "trainer.steps=3", "trainer.log_every=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained fusion for 3 steps") == 1
    train_records = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    state = json.loads((ckpt.latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2
    assert (run / "model" / "model.safetensors").is_file()


def test_a_bad_config_under_torchrun_stops_every_rank_with_the_message(tokenizers, tmp_path):
    """Rank 0 prepares the run alone; when that fails the other ranks must stop too, not wait."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mixmodal",
               "train", str(TINY["tokens"]), "--out", str(tmp_path / "bad"), f"data.image_tokenizer={tokenizers['vq']}",
               f"data.text_tokenizer={tokenizers['text']}", "data.pipeline.seq_len=40"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "data.pipeline.seq_len=40 is shorter than one image" in done.stderr + done.stdout
