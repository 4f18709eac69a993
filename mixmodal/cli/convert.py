"""`mixmodal convert KIND SRC OUT`: public checkpoints into mixmodal directories, and mixmodal models back
into transformers folders (docs/image_tokenizers.md, docs/interop.md)."""

from __future__ import annotations

import argparse

from mixmodal.cli.common import no_overrides


def register(verbs: argparse._SubParsersAction) -> None:
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


def cmd_convert_diffusers_vae(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.interop.diffusers_vae import convert_diffusers_vae

    no_overrides("convert diffusers-vae", overrides)
    model, notes = convert_diffusers_vae(args.src, args.out)
    _report_conversion(model, notes, args.out)
    return 0


def cmd_convert_chameleon_vqgan(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.interop.chameleon_vqgan import convert_chameleon_vqgan

    no_overrides("convert chameleon-vqgan", overrides)
    model, notes = convert_chameleon_vqgan(args.src, args.out, config=args.config)
    _report_conversion(model, notes, args.out)
    return 0


def cmd_convert_hf_chameleon(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.interop.hf_chameleon import convert_hf_chameleon

    no_overrides("convert hf-chameleon", overrides)
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
    from mixmodal.interop.hf_chameleon_export import convert_to_hf_chameleon

    no_overrides("convert to-hf-chameleon", overrides)
    hf_config, notes = convert_to_hf_chameleon(args.src, args.out)
    print(f"wrote transformers ChameleonForConditionalGeneration ({hf_config['num_hidden_layers']} layers, "
          f"vocab_size {hf_config['vocab_size']}) -> {args.out}")
    for note in notes:
        print(f"note: {note}")
    return 0


def cmd_convert_merge_lora(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.model.lora import merge_lora_folder

    no_overrides("convert merge-lora", overrides)
    out, config = merge_lora_folder(args.src, args.out)
    print(f"merged the LoRA adapter (rank {config.rank}, alpha {config.alpha:g}, {', '.join(config.targets)}) into the "
          f"weights -> {out} (a plain model folder; every other file copied)")
    return 0


def cmd_convert_hf_clip(args: argparse.Namespace, overrides: list[str]) -> int:
    from mixmodal.interop.hf_clip import convert_hf_clip

    no_overrides("convert hf-clip", overrides)
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
