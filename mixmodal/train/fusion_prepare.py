"""Before the early-fusion task trains (train/fusion.py): the tokenizers into the run directory,
the model config filled from them and checked.

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

Fine-tuning (`init_from: RUN` or a model folder, e.g. SFT on conversations, data/chat.py): the
model starts from that folder's weights; its architecture and, unless given, both tokenizers
come from the folder (a `model:` key that contradicts it fails before training). The folder is
read as the engine reads it (model/bundle.py `load_text_tokenizer`, `read_model_settings`),
so a converted Chameleon (`mixmodal convert hf-chameleon`) fine-tunes with its own tokenizer
(vocab_map.json, copied to RUN/ beside RUN/text_tokenizer), its images prepared by its
`image_preprocessing` and encoded by its VQGAN, its conversations in its `chat_template`; features
that would train ids its engine never samples (CM3 sentinels, `uncond: mask`: unused
<reservedNNNNN> rows of Chameleon) are refused before training. (What RUN/model then carries
over from the folder: train/fusion.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mixmodal.config import ConfigError
from mixmodal.data.sources import open_source
from mixmodal.model.bundle import IMAGE_TOKENIZER_DIR, TEXT_TOKENIZER_DIR, VOCAB_MAP_FILE, load_text_tokenizer
from mixmodal.retrieval.select import Retriever
from mixmodal.tokenizers.image import load_image_tokenizer
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
from mixmodal.train.fusion_config import FusionTrainConfig


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
    copy_dir(Path(given), dst)


def copy_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def _train_text_tokenizer(config: FusionTrainConfig, out: Path) -> None:
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
        if m.image.code_embedding != "learned":
            width = int(image.code_vectors(m.image.code_vectors).shape[1])
            fill("model.image.code_features", m.image, "code_features", width)
    else:
        if image.discrete:
            raise ConfigError(f"model.image.mode=latents needs a continuous image tokenizer (vae, pca), but {where} "
                              "(discrete codes); use model.image.mode=tokens or a VAE tokenizer")
        fill("model.image.latent_channels", m.image, "latent_channels", image.latent_channels)
    fill("model.image.grid_size", m.image, "grid_size", image.grid_size)
    if m.image.mode == "latents" and m.image.grid_size % m.image.patch_size:
        raise ConfigError(f"model.image.patch_size={m.image.patch_size} does not divide the latent grid "
                          f"({m.image.grid_size}) of data.image_tokenizer")
    if config.diffusion.clean_patches > 0 and (m.image.mode != "latents" or m.image.patchify == "unet"):
        raise ConfigError(f"diffusion.clean_patches={config.diffusion.clean_patches} gives an image's patches their own "
                          f"times, which needs model.image.mode=latents with patchify linear or mlp (got mode "
                          f"{m.image.mode}, patchify {m.image.patchify}); set diffusion.clean_patches=0")
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

