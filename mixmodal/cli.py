"""`mixmodal VERB [SUBVERB] POSITIONAL --options key=value...`

Every verb is a short function below; trailing `key=value` arguments are dotlist
overrides of the verb's typed config (see mixmodal/config.py).
"""

from __future__ import annotations

import argparse
import os
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

EPILOG_OVERRIDES = "Trailing key=value arguments override fields of the verb's config (e.g. max_objects=2)."


# --- data ---------------------------------------------------------------------------------

def cmd_data_shapes(args: argparse.Namespace, overrides: list[str]) -> int:
    from tqdm import tqdm

    from mixmodal.config import build_config, save_config, to_dict
    from mixmodal.data.shapes import ShapesConfig, shapes_document
    from mixmodal.data.sources import write_webdataset
    from mixmodal.documents import write_jsonl

    flags = _flags(args, resolution="resolution", seed="seed")
    config = build_config(ShapesConfig, args.config, flags + overrides)  # defaults <- YAML <- flags <- key=value
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    docs = (shapes_document(config, args.split, i) for i in range(args.num))
    docs = tqdm(docs, total=args.num, desc=f"shapes {args.split}", unit="doc", disable=args.quiet)
    if args.format == "jsonl":
        n = write_jsonl(docs, out / "documents.jsonl")
        written = str(out / "documents.jsonl")
    else:
        shards = write_webdataset(docs, out, shard_size=args.shard_size)
        n, written = args.num, f"{len(shards)} shard(s) in {out}"
    save_config({"shapes": to_dict(config), "split": args.split, "num": args.num, "format": args.format}, out)
    print(f"wrote {n} {args.split} documents ({config.resolution}px) -> {written} in {time.perf_counter() - started:.1f}s")
    return 0


def _open(args: argparse.Namespace):
    from mixmodal.data.sources import open_source

    kwargs = {"strict": args.strict}
    if args.max_pixels is not None:
        kwargs["max_pixels"] = args.max_pixels
    return open_source(args.source, **kwargs)


def _flags(args: argparse.Namespace, **fields: str) -> list[str]:
    """Command-line flags given by the user, as overrides of config fields (field=flag_dest)."""
    return [f"{field}={getattr(args, dest)}" for field, dest in fields.items() if getattr(args, dest) is not None]


def _report_bad_input(source) -> None:
    if source.log.num_skipped or source.log.converted:
        print(source.log.summary())


def _take(source, limit: int | None):
    for i, doc in enumerate(source):
        if limit is not None and i >= limit:
            return
        yield doc


def cmd_data_show(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.data.show import contact_sheet

    _no_overrides("data show", overrides)
    source = _open(args)
    docs = list(_take(source, args.num))
    sheet = contact_sheet(docs, columns=args.columns, thumb=args.thumb)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"contact sheet of {len(docs)} documents -> {out}")
    _report_bad_input(source)
    return 0


def cmd_data_stats(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.data.stats import dataset_stats, format_stats

    _no_overrides("data stats", overrides)
    tokenizer = None
    if args.tokenizer:
        from mixmodal.tokenizers.text import TextTokenizer

        tokenizer = TextTokenizer.load(args.tokenizer)
    source = _open(args)
    stats = dataset_stats(_take(source, args.num), tokenizer)
    stats["bad_input"] = source.log.to_dict()["skipped"]
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"{args.source}:")
        print(format_stats(stats))
        print(source.log.summary())
    return 0


# --- tokenizer ------------------------------------------------------------------------------

def cmd_tokenizer_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.config import build_config, save_config, to_dict
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig

    flags = _flags(args, vocab_size="vocab_size", min_frequency="min_frequency", max_texts="max_texts")
    config = build_config(TextTokenizerConfig, args.config, flags + overrides)  # defaults <- YAML <- flags <- key=value
    source = _open(args)
    started = time.perf_counter()
    texts = (p for doc in source for p in doc.texts)
    tokenizer = TextTokenizer.train(texts, config)
    path = tokenizer.save(args.out)
    save_config({"text_tokenizer": to_dict(config), "source": args.source}, args.out)
    print(f"trained byte-level BPE: {tokenizer.vocab_size} ids -> {path} in {time.perf_counter() - started:.1f}s")
    _report_bad_input(source)
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.tokenizers.text import TextTokenizer

    _no_overrides("tokenizer encode", overrides)
    tokenizer = TextTokenizer.load(args.tokenizer)
    ids = tokenizer.encode(args.text)
    print(json.dumps({"ids": ids, "tokens": [tokenizer.id_to_token(i) for i in ids]}, ensure_ascii=False))
    return 0


# --- image ------------------------------------------------------------------------------

def cmd_image_encode(args: argparse.Namespace, overrides: list[str]) -> int:
    import numpy as np
    import torch

    from mixmodal.data.bad_input import BadInputLog
    from mixmodal.data.images import DEFAULT_MAX_PIXELS, decode_image
    from mixmodal.tokenizers.image import load_image_tokenizer
    from mixmodal.tokenizers.pixels import images_to_tensor

    _no_overrides("image encode", overrides)
    tokenizer = load_image_tokenizer(args.tokenizer)
    log = BadInputLog(strict=True)  # one bad file fails the command, naming the file and why
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    pil_images = [decode_image(None, path, log=log, max_pixels=max_pixels) for path in args.images]
    resolution = tokenizer.config.resolution
    if not args.resize:
        for path, image in zip(args.images, pil_images):
            if image.size != (resolution, resolution):
                raise ValueError(f"{path}: image is {image.width}x{image.height} but the tokenizer was trained at "
                                 f"{resolution}x{resolution}; pass --resize to centre-crop and resize it (bicubic)")
    pixels = images_to_tensor(pil_images, resolution)  # (N, 3, R, R) in [-1, 1]
    with torch.no_grad():
        out = torch.cat([tokenizer.encode(batch) for batch in pixels.split(args.batch_size)])
    array = out.numpy().astype(np.int32 if tokenizer.kind == "vq" else np.float32)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    what = "codes" if tokenizer.kind == "vq" else "latents (unscaled)"
    print(f"encoded {len(pil_images)} image(s) -> {what} {list(array.shape)} {array.dtype} -> {path}")
    return 0


def cmd_image_decode(args: argparse.Namespace, overrides: list[str]) -> int:
    import numpy as np
    import torch

    from mixmodal.tokenizers.image import load_image_tokenizer
    from mixmodal.tokenizers.pixels import tensor_to_images

    _no_overrides("image decode", overrides)
    tokenizer = load_image_tokenizer(args.tokenizer)
    array = np.load(args.array, allow_pickle=False)  # never unpickle a user file
    if tokenizer.kind == "vq" and (array.ndim != 3 or array.dtype.kind not in "iu"):
        raise ValueError(f"{args.array}: a VQ tokenizer decodes integer codes [N, h, w]; got {array.dtype} {list(array.shape)}")
    if tokenizer.kind == "vae" and (array.ndim != 4 or array.dtype.kind != "f"):
        raise ValueError(f"{args.array}: a VAE tokenizer decodes float latents [N, C, h, w] (unscaled); "
                         f"got {array.dtype} {list(array.shape)}")
    values = torch.from_numpy(array.astype(np.int64 if tokenizer.kind == "vq" else np.float32))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = 0
    with torch.no_grad():
        for batch in values.split(args.batch_size):
            for image in tensor_to_images(tokenizer.decode(batch)):
                image.save(out / f"{index:05d}.png")
                index += 1
    print(f"decoded {index} image(s) -> {out}/00000.png ...")
    return 0


def cmd_image_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.tokenizers.image import load_image_tokenizer
    from mixmodal.train.image_data import eval_images
    from mixmodal.train.image_tokenizer import evaluate_reconstructions

    _no_overrides("image eval", overrides)
    tokenizer = load_image_tokenizer(args.tokenizer)
    started = time.perf_counter()
    images, scenes = eval_images(args.source, tokenizer.config.resolution, args.num)
    _, metrics = evaluate_reconstructions(tokenizer, images, scenes, batch_size=args.batch_size)
    metrics = {"tokenizer": str(args.tokenizer), "source": args.source, "images": len(images), **metrics}
    print(json.dumps(metrics, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    print(f"({time.perf_counter() - started:.1f}s)", file=sys.stderr)
    return 0


# --- eval --------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.config import build_config
    from mixmodal.eval.shapes_suite import ShapesEvalConfig, evaluate

    if args.suite not in ("shapes", "shapes-chat"):
        raise ValueError(f"--suite {args.suite}: the suites are shapes (the built-in world: text-to-image, captions, "
                         "VQA) and shapes-chat (instruction following in conversation)")
    preset = _load_yaml(args.config) if args.config else {}
    if args.suite == "shapes-chat":
        from mixmodal.eval.chat_suite import ChatEvalConfig, evaluate_chat

        metrics = evaluate_chat(args.checkpoint, args.out, build_config(ChatEvalConfig, preset, overrides),
                                device=args.device, progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps({k: metrics[k] for k in ("overall", "generate", "caption", "vqa", "edit", "multi_turn")},
                         indent=1))
        print(f"report: {Path(args.out) / 'report.md'}")
        return 0
    if args.quick:
        preset = {**QUICK_EVAL, **preset}
    if args.sweep:
        from mixmodal.eval.shapes_suite import SWEEP_PRESET, sweep

        config = build_config(ShapesEvalConfig, {**SWEEP_PRESET, **preset}, overrides)
        result = sweep(args.checkpoint, args.out, config, device=args.device,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps({"best": result["best"]}, indent=1))
        print(f"sweep: {Path(args.out) / 'sweep.md'}")
        return 0
    config = build_config(ShapesEvalConfig, preset, overrides)
    metrics = evaluate(args.checkpoint, args.out, config, inception=args.inception, feature_net=args.feature_net,
                       encoder=args.encoder, device=args.device,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(_headline(metrics), indent=1))
    out = Path(args.out)
    print(f"metrics: {out / 'metrics.json'}\nreport:  {out / 'report.md'}\nhtml:    {out / 'report.html'}")
    return 0


QUICK_EVAL = {"num_prompts": 32, "num_captions": 32, "num_vqa": 32, "num_ppl": 32, "num_fid_real": 256, "samples": 8,
              "geneval_prompts": 8, "images_per_prompt": 2}


def _load_yaml(path: str) -> dict:
    from mixmodal.config import load_yaml

    return load_yaml(path) or {}


def _headline(metrics: dict) -> dict:
    """The numbers a reader looks for first."""
    out: dict = {}
    for which, m in metrics.get("geneval", {}).items():
        out[f"geneval_{which}_overall"] = round(m["overall"], 4)
        for category, c in m["categories"].items():
            out[f"geneval_{which}_{category}"] = round(c["accuracy"], 4)
    for split, m in metrics.get("text_to_image", {}).items():
        out[f"t2i_{split}_overall"] = round(m["overall"], 4)
        if "fid" in m:
            out[f"t2i_{split}_fid"] = round(m["fid"]["fid"], 3)
        if "clip_score" in m:
            out[f"t2i_{split}_clip_score"] = round(m["clip_score"]["clip_score"], 3)
    if "captioning" in metrics:
        out["caption_cider"] = round(metrics["captioning"]["cider"], 4)
        out["caption_bleu4"] = round(metrics["captioning"]["bleu4"], 4)
    if "vqa" in metrics:
        out["vqa_accuracy"] = round(metrics["vqa"]["accuracy"], 4)
    if "text" in metrics:
        out["text_perplexity"] = round(metrics["text"]["perplexity"], 4)
    out["training_flops"] = metrics.get("training", {}).get("flops")
    return out


# --- convert -----------------------------------------------------------------------------

def cmd_convert_diffusers_vae(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.interop.diffusers_vae import convert_diffusers_vae

    _no_overrides("convert diffusers-vae", overrides)
    model, notes = convert_diffusers_vae(args.src, args.out)
    _report_conversion(model, notes, args.out)
    return 0


def cmd_convert_chameleon_vqgan(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.interop.chameleon_vqgan import convert_chameleon_vqgan

    _no_overrides("convert chameleon-vqgan", overrides)
    model, notes = convert_chameleon_vqgan(args.src, args.out, config=args.config)
    _report_conversion(model, notes, args.out)
    return 0


def cmd_convert_hf_chameleon(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.interop.hf_chameleon import convert_hf_chameleon

    _no_overrides("convert hf-chameleon", overrides)
    config, notes = convert_hf_chameleon(args.src, args.out, image_generation=args.image_generation, vqgan=args.vqgan,
                                         vqgan_config=args.vqgan_config)
    t, vocab = config.transformer, config.vocab
    print(f"converted Chameleon ({t.num_layers} layers, dim {t.dim}, {t.num_heads} heads / {t.kv_heads} kv, "
          f"{'swin' if t.swin_norm else 'pre'}-norm; {vocab.text_size} text ids + {vocab.num_image_codes} image codes) "
          f"-> {args.out}")
    for note in notes:
        print(f"note: {note}")
    return 0


def cmd_convert_to_hf_chameleon(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.interop.hf_chameleon import convert_to_hf_chameleon

    _no_overrides("convert to-hf-chameleon", overrides)
    hf_config, notes = convert_to_hf_chameleon(args.src, args.out)
    print(f"wrote transformers ChameleonForConditionalGeneration ({hf_config['num_hidden_layers']} layers, "
          f"vocab_size {hf_config['vocab_size']}) -> {args.out}")
    for note in notes:
        print(f"note: {note}")
    return 0


def cmd_convert_merge_lora(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.model.lora import merge_lora_folder

    _no_overrides("convert merge-lora", overrides)
    out, config = merge_lora_folder(args.src, args.out)
    print(f"merged the LoRA adapter (rank {config.rank}, alpha {config.alpha:g}, {', '.join(config.targets)}) into the "
          f"weights -> {out} (a plain model folder; every other file copied)")
    return 0


def cmd_convert_hf_clip(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.interop.hf_clip import convert_hf_clip

    _no_overrides("convert hf-clip", overrides)
    embedder, notes = convert_hf_clip(args.src, args.out)
    c = embedder.config
    params = sum(p.numel() for p in embedder.model.parameters())
    print(f"converted CLIP ({params / 1e6:.1f}M parameters; text {c.text.num_layers} layers x {c.text.dim}, "
          f"{c.text.max_length} positions; vision {c.vision.num_layers} layers x {c.vision.dim}, "
          f"{c.vision.image_size}px / patch {c.vision.patch_size}; {c.embed_dim}-d embeddings) -> {args.out}")
    for note in notes:
        print(f"note: {note}")
    return 0


def _report_conversion(model, notes: list[str], out: str) -> None:
    c = model.config
    shape = (f"{c.codebook_size} codes, {model.grid_size}x{model.grid_size} grid" if model.kind == "vq"
             else f"{c.latent_channels} x {model.grid_size}x{model.grid_size} latents")
    params = sum(p.numel() for p in model.parameters())
    print(f"converted {model.kind} tokenizer ({params / 1e6:.1f}M parameters, {c.resolution}px -> {shape}) -> {out}")
    for note in notes:
        print(f"note: {note}")


# --- train --------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.train.checkpoint import CheckpointError
    from mixmodal.train.run import load_run_config, train
    from mixmodal.train.trainer import TrainingError

    flags = ["trainer.resume=true"] if args.resume else []
    config = load_run_config(args.config, overrides + flags)  # defaults <- YAML <- key=value <- flags
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    started = time.perf_counter()
    try:
        result = train(config, out)
    except (TrainingError, CheckpointError) as e:
        print(f"mixmodal train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the run folder became unwritable (full, read-only) outside a checkpoint write
        from mixmodal.train.checkpoint import latest_checkpoint

        latest = latest_checkpoint(out)
        print(f"mixmodal train: error: cannot write to {e.filename or out} ({e.strerror or e}); "
              f"{'the last checkpoint, ' + str(latest) + ', is intact' if latest else 'no checkpoint was written yet'}"
              "; free space on that disk or make it writable, then continue with --resume", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun: one summary, from rank 0
        return 0
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    print(f"trained {config.task} for {result['step']} steps in {time.perf_counter() - started:.0f}s -> {out}\n"
          f"final eval: {shown}")
    return 0


def cmd_plot(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.train.plots import plot_runs

    _no_overrides("plot", overrides)
    if args.labels and len(args.labels) != len(args.runs):
        raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise ValueError(f"{run}: no metrics.jsonl there (is it a run directory of `mixmodal train`?)")
    out = plot_runs(args.runs, args.out, labels=args.labels, keys=args.keys, title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    import uvicorn

    from mixmodal.inference.checkpoint import load_checkpoint, read_retrieval_settings
    from mixmodal.inference.generate import DTYPES, open_retriever
    from mixmodal.serve import Limits, Scheduler, create_app

    if overrides:
        raise SystemExit(f"mixmodal serve takes no key=value overrides; got {' '.join(overrides)} (sampling options "
                         "are per request: docs/serve.md)")
    engine = load_checkpoint(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype], require_image_tokenizer=False)
    scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=args.max_queue)
    name = Path(args.checkpoint).resolve().name
    if name == "model":
        name = Path(args.checkpoint).resolve().parent.name
    api_key = args.api_key or os.environ.get("MIXMODAL_API_KEY") or None
    retriever = None
    if args.index or (read_retrieval_settings(args.checkpoint) or {}).get("index"):
        from dataclasses import replace

        from mixmodal.retrieval.select import Retriever

        opened = open_retriever(args.checkpoint, args.index, args.encoder, 1, args.device)

        def retriever(prompt, k):
            return Retriever(opened.bank, opened.embedder, replace(opened.config, k=k)).retrieve_documents([prompt])[0]
    app = create_app(scheduler, model_name=name, api_key=api_key, limits=Limits(max_tokens=args.max_tokens),
                     retriever=retriever)
    print(f"mixmodal: serving {args.checkpoint} as {name!r} on http://{args.host}:{args.port} "
          f"({engine.mode} mode{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.documents import Image
    from mixmodal.inference import End, ImageDone, ImageStarted, TextDelta, generate

    current = [None]
    live = len(args.prompt or [""]) * args.num == 1  # stream one sequence as it is written; a batch at the end

    def show(event) -> None:
        if args.quiet:
            return
        if isinstance(event, End) and not live:
            text = " ".join(f"<image {p.size[0]}x{p.size[1]}>" if isinstance(p, Image) else p.text.strip()
                            for p in event.result.document.parts)
            print(f"[{event.index}] {text}")
        if not live:
            return
        if isinstance(event, TextDelta):
            if current[0] != event.index:
                print(f"\n[{event.index}] ", end="")
                current[0] = event.index
            print(event.text, end="", flush=True)
        elif isinstance(event, ImageStarted):
            print(f"\n[{event.index}] <image {event.image} ...", end="", flush=True)
            current[0] = None
        elif isinstance(event, ImageDone):
            print(f"\n[{event.index}] ... image {event.image} done>", end="", flush=True)
            current[0] = None

    out = generate(args.checkpoint, args.prompt or [""], images=args.image, mode=args.mode, cfg=args.cfg,
                   image_cfg=args.image_cfg, seed=args.seed, num=args.num, steps=args.steps,
                   max_new_tokens=args.max_new_tokens, max_images=args.max_images, temperature=args.temperature,
                   overrides=overrides, out=args.out, device=args.device, dtype=args.dtype, on_event=show,
                   retrieve=args.retrieve, index=args.index, encoder=args.encoder, best_of=args.best_of,
                   rerank=args.rerank)
    if live and not args.quiet:
        print()
    for r in out.results:
        print(f"[{r.index}] {r.finish_reason}: {len(r.ids)} positions, {len(r.images)} image(s)")
    files = out.files
    print(f"generated {len(out.results)} document(s) in {out.seconds:.1f}s\n"
          f"  documents: {files.jsonl}\n  images:    {files.out_dir / 'images'} ({len(files.images)} PNG)\n"
          f"  page:      {files.html}")
    return 0


def cmd_chat(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.inference.chat import ChatSession, run_repl
    from mixmodal.inference.checkpoint import load_checkpoint
    from mixmodal.inference.generate import DTYPES, generation_config

    config = generation_config(mode=args.mode, cfg=args.cfg, image_cfg=args.image_cfg, steps=args.steps,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, overrides=overrides)
    engine = load_checkpoint(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype],
                             require_image_tokenizer=config.mode != "text")
    if engine.chat_template is None:
        print(f"note: {args.checkpoint} was never tuned on conversations (no chat_template in its generation.yaml): "
              "it reads the conversation as plain text and images", file=sys.stderr)
    return run_repl(ChatSession(engine, config, seed=args.seed, out=args.out, system=args.system))


def _no_overrides(verb: str, overrides: list[str]) -> None:
    if overrides:
        raise SystemExit(f"mixmodal {verb}: unexpected arguments {' '.join(overrides)} (this verb takes no config overrides)")


# --- index (retrieval memory bank) ------------------------------------------------------------

def cmd_index_build(args: argparse.Namespace, overrides: list[str]) -> int:
    from tqdm import tqdm

    from mixmodal.retrieval import bank as memory_bank

    _no_overrides("index build", overrides)
    embedder = memory_bank.load_document_embedder(args.encoder)
    source = _open(args)
    docs = tqdm(_take(source, args.num), total=args.num, desc="index", unit="doc", disable=args.quiet)
    bank = memory_bank.MemoryBank.build(docs, embedder, args.out, kind=args.kind, batch_size=args.batch_size,
                                        source=args.source, progress=False, nlist=args.nlist, overwrite=args.overwrite)
    for note in bank.notes:
        print(f"note: {note}")
    _report_ingest("indexed", bank, source, f"into a {bank.kind} index")
    return 0


def cmd_index_add(args: argparse.Namespace, overrides: list[str]) -> int:
    from tqdm import tqdm

    from mixmodal.retrieval.bank import MemoryBank

    _no_overrides("index add", overrides)
    bank = MemoryBank.open(args.index)
    embedder = bank.load_embedder(args.encoder)
    source = _open(args)
    docs = tqdm(_take(source, args.num), total=args.num, desc="add", unit="doc", disable=args.quiet)
    bank.add(docs, embedder, batch_size=args.batch_size, source=args.source)
    _report_ingest("added", bank, source, f"({len(bank)} in all)")
    return 0


def _report_ingest(verb: str, bank, source, where: str) -> None:
    stats = bank.last_ingest
    shown = ", ".join(f"{n} {m}" for m, n in stats.modalities.items() if n)
    print(f"{verb} {stats.added} documents ({shown or 'none'}) {where} in {stats.seconds:.1f}s -> {bank.path}; "
          f"skipped {source.log.num_skipped} bad input, {stats.skipped_empty} empty")
    _report_bad_input(source)


def cmd_index_query(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.data.bad_input import BadInputLog
    from mixmodal.data.images import decode_image
    from mixmodal.documents import Document, Image, Text
    from mixmodal.retrieval.bank import MemoryBank
    from mixmodal.retrieval.embed import embed_documents_checked
    from mixmodal.retrieval.select import SelectionConfig, select
    from mixmodal.retrieval.store import document_key, modality

    _no_overrides("index query", overrides)
    bank = MemoryBank.open(args.index)
    embedder = bank.load_embedder(args.encoder)
    if args.text is not None:
        query = Document([Text(args.text)])
    else:
        query = Document([Image(decode_image(None, args.image, log=BadInputLog(strict=True)), origin=args.image)])
    embedding = embed_documents_checked(embedder, [query], dim=bank.dim)  # (1, D)
    if args.select:
        ids = select(bank, embedding, SelectionConfig(k=args.k), [document_key(query)])[0]
        scores = (bank.embeddings(ids) @ embedding[0]).tolist() if ids else []
    else:
        found_scores, found_ids = bank.search(embedding, args.k)
        ids = [int(i) for i in found_ids[0] if i >= 0]
        scores = found_scores[0][: len(ids)].tolist()
    for rank, (i, score) in enumerate(zip(ids, scores), start=1):
        doc = bank.document(i)
        text = " ".join(doc.texts)
        images = [p.origin for p in doc.parts if isinstance(p, Image)]
        kind = modality(bool(text.strip()), bool(images))
        if args.json:
            print(json.dumps({"rank": rank, "score": round(float(score), 6), "id": i, "doc_id": doc.id,
                              "modalities": kind, "text": text, "images": images}, ensure_ascii=False))
        else:
            shown = text if len(text) <= 80 else text[:77] + "..."
            print(f"{rank:>3}  {score:.4f}  #{i:<7} {kind:<10} {shown!r}" + "".join(f"  {p}" for p in images))
    if not ids and not args.json:
        print(f"nothing retrieved from {bank.path} ({len(bank)} documents)")
    return 0


def cmd_index_info(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.retrieval.bank import BankError, MemoryBank, read_bank_json

    _no_overrides("index info", overrides)
    meta = read_bank_json(args.index)
    try:
        MemoryBank.open(args.index)
        problem = None
    except BankError as e:
        problem = str(e)
    encoder = meta["encoder"]
    if args.json:
        print(json.dumps({**meta, "ok": problem is None, "problem": problem}, indent=2))
    else:
        params = ", ".join(f"{k}={v}" for k, v in meta.get("index_params", {}).items())
        print(f"{args.index}: {meta['count']} documents, dim {meta['dim']}, {meta['kind']} index"
              f"{' (' + params + ')' if params else ''}, {meta['metric']}\n"
              f"  modalities: {', '.join(f'{n} {m}' for m, n in meta.get('modalities', {}).items())}\n"
              f"  encoder:    {encoder['path']}{'' if Path(encoder['path']).exists() else ' (missing)'} "
              f"(fingerprint {encoder['fingerprint'][:12]}...)\n"
              f"  sources:    {', '.join(meta.get('sources', [])) or '-'}\n"
              f"  created:    {meta.get('created', '-')}" + (f", updated {meta['updated']}" if "updated" in meta else ""))
        check = "ok: index, embeddings, keys and store agree" if problem is None else f"FAILED: {problem}"
        print(f"  check:      {check}")
    return 0 if problem is None else 1


# --- parser -------------------------------------------------------------------------------

def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="documents JSONL (file or folder), WebDataset shards "
                   "(*.tar, brace pattern or folder), coco:ANNOTATIONS.json?images=DIR, or shapes[:key=value,...]; "
                   "see docs/data.md")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping and counting it")
    p.add_argument("--max-pixels", type=int, default=None, help="images with more pixels are skipped (decompression-bomb guard)")


def build_parser() -> argparse.ArgumentParser:
    from mixmodal import __version__

    parser = argparse.ArgumentParser(
        prog="mixmodal",
        description="Mixed-modal early-fusion models (CM3Leon, Chameleon, Transfusion): data, tokenizers, training, generation.",
        epilog="Run `mixmodal VERB --help` for each verb.",
    )
    parser.add_argument("--version", action="version", version=f"mixmodal {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    data = verbs.add_parser("data", help="write, inspect and summarise datasets", description="Write, inspect and summarise datasets.")
    data_verbs = data.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)

    p = data_verbs.add_parser("shapes", help="write documents from the built-in shapes world",
                              description="Write documents (captions, VQA, edits, stories) from the built-in "
                              "procedural shapes world, as documents JSONL + PNGs or WebDataset shards.",
                              epilog=EPILOG_OVERRIDES + " Fields: see ShapesConfig in docs/shapes.md.")
    p.add_argument("--num", type=int, required=True, help="number of documents")
    p.add_argument("--split", default="train", choices=["train", "heldout", "heldout-combos"],
                   help="train, heldout (unseen scenes) or heldout-combos (unseen shape-colour pairs)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels: 32, 48, 64 or 128 (default 64)")
    p.add_argument("--seed", type=int, default=None, help="seed of the train stream (held-out splits are fixed)")
    p.add_argument("--config", default=None, help="YAML preset for ShapesConfig (e.g. configs/data/shapes-64.yaml)")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "wds"], help="documents JSONL + PNGs, or WebDataset tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per WebDataset shard")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_shapes)

    p = data_verbs.add_parser("show", help="draw a contact sheet of a source's documents",
                              description="Draw a contact sheet: the first N documents of SOURCE, images with their text.")
    _add_source_options(p)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--num", type=int, default=24, help="documents to show")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--thumb", type=int, default=96, help="thumbnail size in pixels")
    p.set_defaults(func=cmd_data_show)

    p = data_verbs.add_parser("stats", help="print statistics of a source",
                              description="Count documents, images, layouts, tasks and text length (tokens with --tokenizer).")
    _add_source_options(p)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, to count text tokens")
    p.add_argument("--num", type=int, default=None, help="look at the first N documents only")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_data_stats)

    tok = verbs.add_parser("tokenizer", help="train and use the byte-level BPE text tokenizer",
                           description="Train and use the byte-level BPE text tokenizer (Hugging Face tokenizers).")
    tok_verbs = tok.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)
    p = tok_verbs.add_parser("train", help="train byte-level BPE on a source's text",
                             description="Train byte-level BPE on the text of SOURCE; writes tokenizer.json with "
                             "mixmodal's special tokens as its first ids, and the resolved config.",
                             epilog=EPILOG_OVERRIDES + " Fields: vocab_size, min_frequency, max_texts.")
    _add_source_options(p)
    p.add_argument("--vocab-size", type=int, default=None, help="total ids, special tokens included (default 4096)")
    p.add_argument("--min-frequency", type=int, default=None, help="minimum count of a merge (default 2)")
    p.add_argument("--max-texts", type=int, default=None, help="train on at most this many text parts")
    p.add_argument("--config", default=None, help="YAML preset for TextTokenizerConfig (e.g. configs/tokenizer/bpe-4k.yaml)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_tokenizer_train)

    p = verbs.add_parser("train", help="train a model from a run config (image tokenizers, early-fusion models)",
                         description="Train the task named by the config's top-level `task:` key (image-tokenizer, "
                         "fusion). "
                         "The resolved config goes to RUN_DIR/config.yaml; metrics to RUN_DIR/metrics.jsonl; "
                         "checkpoints to RUN_DIR/checkpoints/step_NNNNNN/; the final eval to RUN_DIR/eval.json; "
                         "the task's artifacts (e.g. RUN_DIR/tokenizer/) at the end.",
                         epilog="Trailing key=value arguments override fields of the run config, by dotted path "
                         "(e.g. trainer.steps=200 tokenizer.vq.codebook_size=1024 loss.gan.weight=0.1). "
                         "Presets: configs/tokenizers/{vq,vae}-{tiny,shapes-64}.yaml, "
                         "configs/models/{tiny,small,base}-{tokens,latents}.yaml.")
    p.add_argument("config", metavar="CONFIG", help="run config YAML with a top-level `task:` key")
    p.add_argument("--out", default=None, help="run directory (default runs/CONFIG_NAME)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run directory (same as trainer.resume=true)")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("generate", help="write text and images from a trained model (documents, PNGs, an HTML page)",
                         description="Generate from CHECKPOINT (a run directory of `mixmodal train` or its model/ "
                         "folder): KV-cached decoding that switches between text and images, with guidance. Writes "
                         "OUT/documents.jsonl, OUT/images/*.png and a self-contained OUT/index.html.",
                         epilog="Trailing key=value arguments override fields of the generation config, e.g. "
                         "text.top_p=0.9 image.top_k=100 guidance.uncond=mask contrastive.alpha=0.1 sampler=ddpm "
                         "stop=[\".\"] (docs/generation.md).")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for a batch of prompts (default: an empty prompt)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="prompt image, placed before the text (repeatable)")
    p.add_argument("--mode", choices=["text", "image", "interleaved", "free"], default=None,
                   help="what the output may hold (default interleaved)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 1: off)")
    p.add_argument("--image-cfg", type=float, default=None,
                   help="image-conditioning guidance scale: three streams, for editing (InstructPix2Pix)")
    p.add_argument("--seed", type=int, default=0, help="document i of the output (prompts outer, samples inner) draws from seed + i")
    p.add_argument("--num", type=int, default=1, help="samples per prompt")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per image (latent mode; default 50)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="positions to write at most (default 512)")
    p.add_argument("--max-images", type=int, default=None, help="images to write at most (default 1)")
    p.add_argument("--temperature", type=float, default=None, help="for text and image codes (0 = greedy)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="do not stream the text as it is written")
    p.add_argument("--retrieve", type=int, default=0, metavar="K",
                   help="prepend K documents retrieved for each prompt from a memory bank (CM3Leon)")
    p.add_argument("--index", default=None, metavar="INDEX",
                   help="the memory bank for --retrieve (`mixmodal index build`; default: the one the model was trained with)")
    p.add_argument("--encoder", default=None, metavar="DIR",
                   help="dual encoder for --retrieve / --rerank clip (default: the index's)")
    p.add_argument("--best-of", type=int, default=1, metavar="N",
                   help="sample N candidates per output document and keep the best (--rerank)")
    p.add_argument("--rerank", choices=["clip", "oracle"], default="clip",
                   help="how --best-of ranks images: the dual encoder's text-image similarity, or the shapes oracle")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("chat", help="talk to a model in the terminal: text, /image attachments, drawn replies",
                         description="An interactive conversation with CHECKPOINT in its chat template (a model "
                         "fine-tuned on conversations; a base model reads the conversation plainly). Commands: "
                         "/image PATH, /reset, /save [FILE], /help, /quit. Generated images are saved under --out.",
                         epilog="Trailing key=value arguments override fields of the generation config, as for "
                         "`mixmodal generate`.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--mode", choices=["text", "image", "interleaved", "free"], default=None,
                   help="what a reply may hold (default interleaved)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale for drawn images")
    p.add_argument("--image-cfg", type=float, default=None, help="image-conditioning guidance scale (edits)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per image (latent mode)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="positions a reply writes at most")
    p.add_argument("--temperature", type=float, default=None, help="for text and image codes (0 = greedy)")
    p.add_argument("--seed", type=int, default=0, help="reply k draws from seed + k")
    p.add_argument("--system", default="", help="a system message that opens the conversation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--out", default="chat_out", help="where drawn images and /save go (default chat_out)")
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (docs/serve.md)",
                         description="Serve CHECKPOINT over HTTP: POST /v1/chat/completions (interleaved text and "
                         "images, SSE streaming), POST /v1/images/generations, GET /v1/models, /health, /metrics.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (each guidance stream is a row)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting before requests get 429")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $MIXMODAL_API_KEY, else none)")
    p.add_argument("--max-tokens", type=int, default=1024, help="limit on a request's max_tokens")
    p.add_argument("--index", default=None, metavar="INDEX",
                   help="memory bank for requests with `retrieve: k` (default: the one the model was trained with, if any)")
    p.add_argument("--encoder", default=None, metavar="DIR", help="dual encoder for --index (default: the index's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("plot", help="loss curves of one or more runs",
                         description="Plot the train (lines) and eval (dots) losses of RUN_DIRs' metrics.jsonl, "
                         "one panel per loss term, runs overlaid.")
    p.add_argument("runs", metavar="RUN_DIR", nargs="+")
    p.add_argument("--out", required=True, help="output image (.png / .svg / .pdf)")
    p.add_argument("--labels", nargs="+", default=None, help="a legend label per run (default: folder names)")
    p.add_argument("--keys", nargs="+", default=None, help="loss terms to show (default: all found)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_plot)

    p = tok_verbs.add_parser("encode", help="show the ids and tokens of a text", description="Encode TEXT with a trained tokenizer.")
    p.add_argument("tokenizer", metavar="TOKENIZER_DIR")
    p.add_argument("text", metavar="TEXT")
    p.set_defaults(func=cmd_tokenizer_encode)

    image = verbs.add_parser("image", help="encode images to codes / latents with an image tokenizer, and back",
                             description="Encode images with a VQ or VAE image tokenizer directory, and decode back to PNGs.")
    image_verbs = image.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)
    p = image_verbs.add_parser("encode", help="images -> codes (VQ) or latents (VAE) in a .npy file",
                               description="Encode IMAGE files: a VQ tokenizer writes int32 codes [N, h, w], a VAE "
                               "tokenizer float32 latents [N, C, h, w] (the posterior mean, unscaled).")
    p.add_argument("tokenizer", metavar="TOKENIZER_DIR", help="folder with config.yaml and model.safetensors")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (any format Pillow reads; converted to RGB)")
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--resize", action="store_true",
                   help="centre-crop and resize (bicubic) images that are not at the trained resolution, instead of failing")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-pixels", type=int, default=None, help="images with more pixels are refused (decompression-bomb guard)")
    p.set_defaults(func=cmd_image_encode)

    p = image_verbs.add_parser("decode", help="codes / latents in a .npy file -> PNGs",
                               description="Decode a .npy of int codes [N, h, w] (VQ) or float latents [N, C, h, w] "
                               "(VAE, unscaled) into OUT/00000.png, 00001.png, ...")
    p.add_argument("tokenizer", metavar="TOKENIZER_DIR", help="folder with config.yaml and model.safetensors")
    p.add_argument("array", metavar="FILE.npy", help="what `mixmodal image encode` wrote")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_image_decode)

    p = image_verbs.add_parser("eval", help="measure reconstructions: PSNR, SSIM, codebook usage / KL, the shapes oracle",
                               description="Reconstruct the first --num images of SOURCE with the tokenizer and report "
                               "PSNR, SSIM, codebook usage and perplexity (VQ) or mean KL (VAE), and, on shapes "
                               "sources, the oracle's scene recovery on the reconstructions.")
    p.add_argument("tokenizer", metavar="TOKENIZER_DIR")
    p.add_argument("--source", default="shapes:split=heldout", help="images to reconstruct (default: held-out shapes)")
    p.add_argument("--num", type=int, default=1000, help="number of images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_image_eval)

    p = verbs.add_parser("eval", help="evaluate a trained model: text->image oracle accuracy, FID, CLIP score, "
                         "captioning, VQA, perplexity, training FLOPs -> metrics.json + report",
                         description="Run an evaluation suite on a model folder (or its run directory) and write "
                         "OUT/metrics.json, OUT/report.md and OUT/report.html. key=value overrides set the suite's "
                         "fields (num_prompts=200 cfg=3.0 max_objects=2 splits=[heldout] ...; docs/eval.md).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run directory or its model/ folder")
    p.add_argument("--suite", default="shapes",
                   help="shapes (default): text-to-image, captions, VQA, FID; shapes-chat: instruction following in "
                   "conversation (edits, VQA, drawing, multi-turn consistency; docs/chat.md)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=None, help="a YAML file of suite fields (overrides still apply on top)")
    p.add_argument("--quick", action="store_true", help="32 prompts per task instead of 200, 8 x 2 images per GenEval "
                   "category (a smoke test; noisy numbers)")
    p.add_argument("--sweep", action="store_true", help="instead of the suite: GenEval-form accuracy on the validation "
                   "prompts for a grid of sampling settings (CFG scale, temperature / top-k, CD-K; denoising steps) "
                   "-> OUT/sweep.md; the defaults the suite uses were chosen this way (docs/eval.md)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth) for comparable FID; "
                   "without it FID uses mixmodal's shapes feature net (trained once, cached), labelled not comparable")
    p.add_argument("--feature-net", default=None, metavar="DIR", help="a feature net folder for FID (default: the cached one)")
    p.add_argument("--encoder", default=None, metavar="DIR", help="a dual encoder for the CLIP score (default: none)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    convert = verbs.add_parser("convert", help="convert public checkpoints into mixmodal directories, and back",
                               description="Convert public checkpoints into mixmodal directories (config.yaml + "
                               "model.safetensors), and mixmodal models into transformers folders. See "
                               "docs/image_tokenizers.md and docs/interop.md.")
    convert_verbs = convert.add_subparsers(dest="subverb", metavar="KIND", required=True)
    p = convert_verbs.add_parser("diffusers-vae", help="a diffusers AutoencoderKL folder -> a VAE tokenizer",
                                 description="Convert a diffusers AutoencoderKL folder (config.json + "
                                 "diffusion_pytorch_model.safetensors, e.g. a pipeline's vae/) into a VAE tokenizer.")
    p.add_argument("src", metavar="SRC", help="AutoencoderKL folder")
    p.add_argument("out", metavar="OUT", help="output tokenizer folder")
    p.set_defaults(func=cmd_convert_diffusers_vae)
    p = convert_verbs.add_parser("chameleon-vqgan", help="Chameleon's VQGAN (transformers or taming layout) -> a VQ tokenizer",
                                 description="Convert Chameleon's image tokenizer into a VQ tokenizer: a transformers "
                                 "ChameleonVQVAE folder (config.json + model.safetensors; encoder only, so decode is "
                                 "unavailable) or Meta's taming-layout vqgan.ckpt with its vqgan.yaml (encoder and "
                                 "decoder). The .ckpt is read with torch.load(weights_only=True): no code is unpickled. "
                                 "OUT may be a converted Chameleon's image_tokenizer/ (MODEL/image_tokenizer): this "
                                 "adds the decoder, after checking that the encoder is the one already there.")
    p.add_argument("src", metavar="SRC", help="ChameleonVQVAE folder or .safetensors, or a taming vqgan.ckpt (or the "
                   "folder holding vqgan.ckpt)")
    p.add_argument("out", metavar="OUT", help="output tokenizer folder")
    p.add_argument("--config", default=None, help="vqgan.yaml for a .ckpt (default: vqgan.yaml or the .ckpt's name "
                   "with .yaml next to it); config.json for a lone .safetensors")
    p.set_defaults(func=cmd_convert_chameleon_vqgan)
    p = convert_verbs.add_parser("hf-chameleon", help="a transformers Chameleon folder -> a mixmodal token-mode model",
                                 description="Convert a transformers ChameleonForConditionalGeneration folder (config.json "
                                 "+ model.safetensors or a sharded index; safetensors only, nothing is unpickled) into a "
                                 "model directory: config.yaml, model.safetensors, vocab_map.json (Chameleon id -> "
                                 "mixmodal id: Chameleon's special tokens, found by name, move to mixmodal's special "
                                 "slots and image tokens after the text ids), hf_config.json, text_tokenizer/ (the "
                                 "folder's tokenizer.json, which `mixmodal generate` drives through vocab_map.json), "
                                 "generation.yaml, and image_tokenizer/ when the folder holds the VQGAN (encoder only; "
                                 "--vqgan adds Meta's decoder). See docs/interop.md.")
    p.add_argument("src", metavar="SRC", help="transformers Chameleon folder")
    p.add_argument("out", metavar="OUT", help="output model directory")
    p.add_argument("--image-generation", action="store_true",
                   help="let the converted model start images (generation.yaml image_generation: true): for weights "
                   "trained to draw, e.g. Anole. Off by default: base Chameleon, as Meta releases it, writes text only")
    p.add_argument("--vqgan", default=None, metavar="CKPT",
                   help="Meta's vqgan.ckpt (Chameleon's tokenizer/ folder, also in Anole's), or the folder holding it: "
                   "image_tokenizer/ gets its encoder and decoder, so generated images decode (transformers ships no "
                   "decoder); its encoder must equal the folder's model.vqmodel")
    p.add_argument("--vqgan-config", default=None, metavar="YAML",
                   help="the taming config of --vqgan (default: vqgan.yaml beside it)")
    p.set_defaults(func=cmd_convert_hf_chameleon)
    p = convert_verbs.add_parser("to-hf-chameleon", help="a mixmodal token-mode model -> a transformers Chameleon folder",
                                 description="Write a mixmodal token-mode model directory as a folder that "
                                 "transformers' ChameleonForConditionalGeneration.from_pretrained loads (config.json + "
                                 "model.safetensors). A converted Chameleon goes back to Chameleon's ids and config "
                                 "(vocab_map.json, hf_config.json); a model trained in mixmodal keeps its ids. Without "
                                 "image_tokenizer/ the VQGAN is left to transformers' random init (it warns about the "
                                 "missing model.vqmodel keys). See docs/interop.md.")
    p.add_argument("src", metavar="SRC", help="mixmodal model directory (config.yaml + model.safetensors)")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.set_defaults(func=cmd_convert_to_hf_chameleon)
    p = convert_verbs.add_parser("merge-lora", help="a LoRA run's model folder -> a plain model folder, adapter merged",
                                 description="Merge the LoRA adapter of a model folder (adapter.safetensors + "
                                 "adapter_config.yaml beside model.safetensors, written by a run with `lora:`) into "
                                 "its weights, W + alpha / rank * B A, and write a plain model folder: "
                                 "model.safetensors (the base's dtype) and every other file copied (tokenizers, "
                                 "generation.yaml, vocab_map.json, ...). Readers merge on load anyway (generate, "
                                 "serve, eval, init_from, to-hf-chameleon); this writes the merged weights once. "
                                 "See docs/interop.md.")
    p.add_argument("src", metavar="SRC", help="model folder with an adapter, or a run directory (its model/)")
    p.add_argument("out", metavar="OUT", help="output model folder")
    p.set_defaults(func=cmd_convert_merge_lora)
    p = convert_verbs.add_parser("hf-clip", help="a transformers CLIP folder -> a dual encoder for retrieval",
                                 description="Convert a transformers CLIPModel folder (config.json + model.safetensors "
                                 "or a sharded index; safetensors only, nothing is unpickled; tokenizer.json, written "
                                 "by CLIPTokenizerFast.save_pretrained; preprocessor_config.json for the image mean and "
                                 "std, else OpenAI CLIP's) into a dual-encoder directory (config.yaml, "
                                 "model.safetensors, tokenizer.json) that retrieval's DocumentEmbedder loads.")
    p.add_argument("src", metavar="SRC", help="transformers CLIP folder")
    p.add_argument("out", metavar="OUT", help="output encoder directory")
    p.set_defaults(func=cmd_convert_hf_clip)

    index = verbs.add_parser("index", help="build and query a retrieval memory bank (FAISS index + documents)",
                             description="Build, query and extend a retrieval memory bank: the documents of a source "
                             "embedded by a dual encoder (the mean of text and image embeddings, CM3Leon §2.1) in a "
                             "FAISS inner-product index, with the documents stored beside it.")
    index_verbs = index.add_subparsers(dest="subverb", metavar="SUBVERB", required=True)
    p = index_verbs.add_parser("build", help="embed a source's documents into a new index",
                               description="Embed the documents of SOURCE with the dual encoder and write an index "
                               "folder (bank.json, index.faiss, embeddings.npy, keys.npy, store/). The folder is "
                               "written beside OUT and renamed into place when complete; an existing index at OUT is "
                               "replaced.")
    _add_source_options(p)
    p.add_argument("--encoder", required=True, help="dual-encoder directory (`mixmodal train` dual-encoder task, "
                   "or `mixmodal convert hf-clip`)")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--kind", default="flat", choices=["flat", "ivf", "hnsw"],
                   help="flat: exact (up to ~1M documents); ivf: inverted lists (millions); "
                   "hnsw: a graph (fast, more memory)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4*sqrt(N), at most N/39)")
    p.add_argument("--num", type=int, default=None, help="index the first N documents only")
    p.add_argument("--batch-size", type=int, default=256, help="documents per encoder forward")
    p.add_argument("--overwrite", action="store_true", help="replace OUT even when it is a folder that is not an index")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index_build)

    p = index_verbs.add_parser("query", help="the documents of an index nearest to a text or an image",
                               description="Embed a text or an image with the index's encoder and print the nearest "
                               "documents: rank, score (cosine), store id, modalities, text and image paths. "
                               "--select applies CM3Leon's selection rules (modality, diversity) instead of plain "
                               "ranking.")
    p.add_argument("index", metavar="INDEX", help="index folder (`mixmodal index build`)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", default=None, help="query text")
    query.add_argument("--image", default=None, help="query image file")
    p.add_argument("--k", type=int, default=5, help="documents to show")
    p.add_argument("--encoder", default=None, help="dual-encoder directory (default: the one bank.json records; "
                   "its fingerprint must match)")
    p.add_argument("--select", action="store_true", help="apply the selection rules (multimodal first, near-copies "
                   "and near-duplicates > 0.9 skipped)")
    p.add_argument("--json", action="store_true", help="print one JSON object per result")
    p.set_defaults(func=cmd_index_query)

    p = index_verbs.add_parser("add", help="append a source's documents to an index",
                               description="Embed the documents of SOURCE with the index's encoder and append them "
                               "(no rebuild; an IVF index keeps its trained lists).")
    p.add_argument("index", metavar="INDEX", help="index folder (`mixmodal index build`)")
    _add_source_options(p)
    p.add_argument("--num", type=int, default=None, help="add the first N documents only")
    p.add_argument("--encoder", default=None, help="dual-encoder directory (default: the one bank.json records; "
                   "its fingerprint must match)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per encoder forward")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_index_add)

    p = index_verbs.add_parser("info", help="summarise an index and check that its files agree",
                               description="Print bank.json (count, dim, kind, encoder, sources, modalities) and "
                               "check that the index, embeddings, keys and store agree; exit 1 when they do not.")
    p.add_argument("index", metavar="INDEX", help="index folder")
    p.add_argument("--json", action="store_true", help="print bank.json with ok / problem as JSON")
    p.set_defaults(func=cmd_index_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from mixmodal.config import ConfigError
    from mixmodal.data.bad_input import BadInputError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if "=" in r and not r.startswith("-")]
    unknown = [r for r in rest if r not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    func: Callable[[argparse.Namespace, list[str]], int] = args.func
    try:
        return func(args, overrides)
    except (ConfigError, BadInputError, FileNotFoundError, ValueError) as e:
        print(f"mixmodal {args.verb} {getattr(args, 'subverb', '') or ''}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
