"""transformers' Chameleon (`ChameleonForConditionalGeneration`) <-> a mixmodal token-mode model directory.

    convert_hf_chameleon(SRC, OUT)     config.json + *.safetensors (one file or a sharded index)
                                       [+ tokenizer.json, or Meta's text_tokenizer.json]
                                       -> OUT/config.yaml, model.safetensors, vocab_map.json,
                                          hf_config.json, generation.yaml, text_tokenizer/
                                          (the source's tokenizer), image_tokenizer/ (when SRC
                                          holds the VQGAN), and last manifest.json (weights.py)
    convert_to_hf_chameleon(SRC, OUT)  a mixmodal token-mode model directory
                                       -> OUT/config.json + model.safetensors (+ tokenizer.json),
                                          which `ChameleonForConditionalGeneration.from_pretrained(OUT)` loads

This module holds the first direction and what both share (the vocabulary layout, the
transformers -> mixmodal renaming, the config reader, the weight check); the second,
`convert_to_hf_chameleon` and its config/tensor/VQGAN writers, lives in
interop/hf_chameleon_export.py, which imports from here.

The backbone mirrors transformers' module names (model/transformer.py), and transformers'
q/k weights are already permuted for its rotate-half RoPE, which ours uses too, so every
layer tensor is a renaming (`model.layers.i.*` <-> `transformer.layers.i.*`) copied bit
for bit in its stored dtype. Only the vocabulary moves (embed_tokens and lm_head rows are
permuted, which keeps every logit exact):

- Special tokens: Chameleon's <pad>, <s>, </s>, <racm3:break>, <eoss> (end of image) and
  <reserved08706> (end of turn), found BY NAME in the source's tokenizer (else config's
  vocabulary_map; never from the stale *_token_id fields), go to mixmodal's slots <pad> 0,
  <bos> 1, <eos> 2, <boi> 3, <eoi> 4 and <|end|> 17; the other 12 slots get unused
  <reservedNNNNN> tokens (interop/chameleon_tokenizer.py has the table and the rules).
  The remaining non-image ids follow in Chameleon's order. A vocabulary without those
  names (a model exported from mixmodal) keeps every text id in order, and cannot be
  driven through mixmodal's special ids.
- Image tokens: the vocabulary entries named "IMGIMG..." (their letters A-J spell the VQGAN
  code in decimal, and a last letter is dropped; transformers' `ChameleonImageVocabularyMapping.bpe2img`),
  scattered through the id space. mixmodal's `Vocab` puts code c at text_size + c, and
  text_size = vocab_size - (number of image tokens). `Vocab` pads its size to a multiple of
  64; the extra rows are zeros.
- vocab_map.json records the permutation (`hf_to_mixmodal[hf_id] = mixmodal_id`), the name in
  each special slot, and never_sample: the ids that are not text by Meta's rule (a name
  starting with "<", or no name), which the engine masks. The inverse conversion reads it back.

Generation: OUT/text_tokenizer/tokenizer.json is the source's own tokenizer, which
`Engine.from_pretrained(OUT)` wraps in `ChameleonTokenizer` (ids through vocab_map.json);
the engine stops on </s> and <reserved08706>. OUT/generation.yaml holds max_length
(max_position_embeddings) and image_generation: false unless asked (base Chameleon, as Meta
releases it, does not draw; Anole-derived weights do). tests/test_chameleon_adapter.py:
greedy text equals transformers' `generate` token for token.

The VQGAN (`model.vqmodel.*`), when present, goes through interop/chameleon_vqgan.py into
OUT/image_tokenizer/ (encoder only: transformers ships no decoder), and the inverse
writes it back from there (its encoder; a decoder has no transformers counterpart). With
`vqgan=` (CLI `--vqgan`), Meta's vqgan.ckpt (+ vqgan.yaml) becomes OUT/image_tokenizer/
instead, encoder and decoder, after checking that its config and encoder are the folder's
`model.vqmodel` (equal once cast to the folder's dtype): generated codes then decode to
pixels. generation.yaml's `image_preprocessing: chameleon` makes prompt images go through
Meta's pipeline (tokenizers/pixels.py), and decoded images come back as Meta's do. A model directory without image_tokenizer/ (a model trained in
mixmodal) is written without VQGAN weights: transformers then initialises `model.vqmodel`
at random and warns about its missing keys; the language model is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mixmodal.interop.chameleon_tokenizer import (CHAMELEON_SPECIALS, SOURCE_TOKENIZER_FILES, SpecialLayout,
                                                  read_source_tokenizer, special_layout)
from mixmodal.interop.chameleon_vqgan import (first_difference, read_taming_vqgan, taming_to_mixmodal,
                                              vq_config_from_transformers)
from mixmodal.interop.common import ConversionError, finish_conversion, read_hf_state, read_json
from mixmodal.interop.vocab_map import VOCAB_MAP_FORMAT, VocabMap
from mixmodal.model.bundle import (GENERATION_FILE, HF_CONFIG_FILE, IMAGE_TOKENIZER_DIR, TEXT_TOKENIZER_DIR,
                                   VOCAB_MAP_FILE, write_generation_settings)
from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.io import CONFIG_FILE, ModelDirError, check_model_state, write_model_dir
from mixmodal.model.transformer import TransformerConfig
from mixmodal.tokenizers.text import TOKENIZER_FILE
from mixmodal.tokenizers.vq import VQTokenizer
from mixmodal.vocab import NUM_SPECIAL, SPECIAL_TOKENS, Vocab
from mixmodal.weights import write_manifest

IMAGE_TOKEN_PREFIX = "IMGIMG"
_VQ_PREFIX = "model.vqmodel."
_VQ_DEFAULTS = {"resolution": 512, "channel_multiplier": [1, 1, 2, 2, 4]}  # ChameleonVQVAEConfig's defaults


# --- the vocabulary -------------------------------------------------------------------------

def image_token_name(code: int) -> str:
    """Chameleon's vocabulary name of VQGAN code `code`: "IMGIMG" + its digits as letters A-J + "Z"."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_code_of(name: str) -> int | None:
    """The VQGAN code of an "IMGIMG..." name (transformers' remap: letters A-J are digits, the last
    character is dropped); None for any other name."""
    if not name.startswith(IMAGE_TOKEN_PREFIX):
        return None
    digits = "".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in name[len(IMAGE_TOKEN_PREFIX):-1])
    return int(digits) if digits.isdigit() else -1


def vocab_map_from_hf(config: dict, origin: str, specials: SpecialLayout | None = None) -> VocabMap:
    """The permutation named by a Chameleon config's vocabulary_map (its "IMGIMG" entries); with
    `specials` (chameleon_tokenizer.special_layout), Chameleon's special tokens go to mixmodal's slots."""
    names = config.get("vocabulary_map")
    vocab_size = config.get("vocab_size", 65536)
    if not isinstance(names, dict) or not names:
        raise ConversionError(f"{origin}: vocabulary_map is missing; a Chameleon config names its image tokens there")
    id_of_code: dict[int, int] = {}
    for name, hf_id in names.items():
        code = image_code_of(name)
        if code is None:
            continue
        if code < 0 or not isinstance(hf_id, int) or not 0 <= hf_id < vocab_size:
            raise ConversionError(f"{origin}: vocabulary_map[{name!r}] = {hf_id!r} is not an image code with an id "
                                  f"below vocab_size={vocab_size}")
        if code in id_of_code:
            raise ConversionError(f"{origin}: vocabulary_map names image code {code} twice")
        id_of_code[code] = hf_id
    num_codes = len(id_of_code)
    if not num_codes:
        raise ConversionError(f"{origin}: vocabulary_map has no {IMAGE_TOKEN_PREFIX}* entries (image tokens)")
    if sorted(id_of_code) != list(range(num_codes)):
        missing = sorted(set(range(num_codes)) - set(id_of_code))[:10]
        raise ConversionError(f"{origin}: the {num_codes} image tokens of vocabulary_map do not cover codes "
                              f"0..{num_codes - 1} (missing e.g. {missing})")
    if len(set(id_of_code.values())) != num_codes:
        raise ConversionError(f"{origin}: vocabulary_map gives two image codes the same id")
    if vocab_size - num_codes <= NUM_SPECIAL:
        raise ConversionError(f"{origin}: vocab_size={vocab_size} leaves {vocab_size - num_codes} text ids beside "
                              f"{num_codes} image tokens; mixmodal needs more than {NUM_SPECIAL}")
    image_ids = [id_of_code[c] for c in range(num_codes)]
    if specials is None:
        return VocabMap.from_image_ids(vocab_size, image_ids)
    if set(specials.hf_ids) & set(image_ids):
        raise ConversionError(f"{origin}: vocabulary_map gives a special token ({', '.join(specials.names.values())}) "
                              "the id of an image token")
    ours = VocabMap.from_image_ids(vocab_size, image_ids, specials.hf_ids)
    image = set(image_ids)
    never = sorted(ours.hf_to_mixmodal[i] for i in specials.not_text if i not in image)
    return replace(ours, special_tokens=dict(specials.names), never_sample=tuple(never))


def native_vocab_map(config: ModelConfig) -> VocabMap:
    """The identity layout of a model trained in mixmodal: Chameleon id = mixmodal id (padding dropped)."""
    vocab = config.vocab
    return VocabMap(tuple(range(vocab.text_size + vocab.num_image_codes)), vocab.text_size, vocab.num_image_codes)


def native_vocabulary_map(vocab: Vocab) -> dict[str, int]:
    """A Chameleon `vocabulary_map` for mixmodal's layout: the special tokens and the image tokens
    (ordinary text tokens have no names without a tokenizer; transformers needs only the image ones)."""
    names = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    names.update({image_token_name(c): vocab.image_code_to_id(c) for c in range(vocab.num_image_codes)})
    return names


# --- configs --------------------------------------------------------------------------------

def model_config_from_hf(config: dict, origin: str, vocab_map: VocabMap) -> ModelConfig:
    """A Chameleon config.json dict -> ModelConfig; what mixmodal does not implement is refused by name."""
    get = config.get
    hidden, heads = get("hidden_size", 4096), get("num_attention_heads", 32)
    kv_heads = get("num_key_value_heads") or heads
    if get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{origin}: hidden_act={get('hidden_act')!r}; mixmodal's MLP is SwiGLU (silu)")
    if hidden % heads:
        raise ConversionError(f"{origin}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    if get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"{origin}: head_dim={get('head_dim')} differs from hidden_size / num_attention_heads "
                              f"= {hidden // heads}; mixmodal derives head_dim from them")
    if heads % kv_heads:
        raise ConversionError(f"{origin}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    vq = {**_VQ_DEFAULTS, **(get("vq_config") or {})}
    downsample = 2 ** (len(vq["channel_multiplier"]) - 1)
    if vq["resolution"] % downsample:
        raise ConversionError(f"{origin}: vq_config.resolution={vq['resolution']} is not divisible by the VQGAN's "
                              f"downsampling {downsample} (2 ** (len(channel_multiplier) - 1))")
    try:
        transformer = TransformerConfig(
            dim=hidden, num_layers=get("num_hidden_layers", 32), num_heads=heads, num_kv_heads=kv_heads,
            ffn_dim=get("intermediate_size", 11008), norm_eps=float(get("rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(config, origin), qk_norm=True, swin_norm=bool(get("swin_norm", False)),
            attention_bias=bool(get("attention_bias", False)), mlp_bias=bool(get("mlp_bias", False)),
            attention_dropout=float(get("attention_dropout") or 0.0), init_std=float(get("initializer_range", 0.02)))
        image = ImageConfig(mode="tokens", num_codes=vocab_map.num_image_codes, grid_size=vq["resolution"] // downsample)
    except ValueError as e:
        raise ConversionError(f"{origin}: {e}") from None
    return ModelConfig(text_vocab_size=vocab_map.text_size, transformer=transformer, image=image,
                       tie_embeddings=bool(get("tie_word_embeddings", False)))


def _rope_theta(config: dict, origin: str) -> float:
    """transformers 5 writes rope_parameters {rope_type, rope_theta}; 4.x wrote rope_theta and rope_scaling."""
    params = config.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"{origin}: rope_parameters.rope_type={rope_type!r} is not implemented in mixmodal "
                              "(plain RoPE only: rope_type 'default')")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"{origin}: rope_parameters.partial_rotary_factor={params['partial_rotary_factor']} "
                              "is not implemented in mixmodal (RoPE on the whole head)")
    scaling = config.get("rope_scaling")
    if scaling:
        raise ConversionError(f"{origin}: rope_scaling={scaling} is not implemented in mixmodal (plain RoPE only)")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


# --- tensors --------------------------------------------------------------------------------

def hf_name_to_mixmodal(name: str) -> str | None:
    if name == "lm_head.weight":
        return name
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight"
    if name.startswith("model.layers.") or name == "model.norm.weight":
        return "transformer." + name[len("model."):]
    return None


_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")


def hf_state_to_mixmodal(state: dict[str, torch.Tensor], vocab_map: VocabMap) -> dict[str, torch.Tensor]:
    """Rename the language-model tensors and move the vocabulary rows; unknown names raise."""
    out, unknown = {}, []
    padded = vocab_map.vocab.size
    for name, tensor in state.items():
        new = hf_name_to_mixmodal(name)
        if new is None:
            unknown.append(name)
        elif new in _VOCAB_ROWS:
            if tensor.shape[0] != vocab_map.hf_vocab_size:
                raise ConversionError(f"{name} has {tensor.shape[0]} rows, config.json says vocab_size="
                                      f"{vocab_map.hf_vocab_size}")
            rows = tensor.new_zeros(padded, *tensor.shape[1:])
            rows[vocab_map.index()] = tensor
            out[new] = rows
        else:
            out[new] = tensor
    if unknown:
        raise ConversionError(f"tensors with no mixmodal counterpart ({len(unknown)}): {', '.join(unknown[:12])}"
                              + (" ..." if len(unknown) > 12 else ""))
    return out


def _check(config: ModelConfig, state: dict[str, torch.Tensor], origin: str) -> None:
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        model = FusionModel(config)
    try:
        check_model_state(model, state, origin, hint="are the config and these weights one checkpoint? re-download "
                                                     "or re-save the source folder")
    except ModelDirError as e:
        raise ConversionError(str(e)) from None


# --- reading --------------------------------------------------------------------------------

def convert_hf_chameleon(src: str | os.PathLike, out: str | os.PathLike, *, image_generation: bool = False,
                         vqgan: str | os.PathLike | None = None,
                         vqgan_config: str | os.PathLike | None = None) -> tuple[ModelConfig, list[str]]:
    """Convert a transformers ChameleonForConditionalGeneration folder into a model directory `out`.

    image_generation: written to OUT/generation.yaml; False (base Chameleon, as Meta releases
    it) keeps the engine from starting images, True is for weights trained to draw (Anole).
    vqgan: Meta's vqgan.ckpt (or the folder holding it; its config is `vqgan_config`, else the
    vqgan.yaml beside it): OUT/image_tokenizer/ gets its encoder and decoder, so generated images
    decode; it must be the VQGAN of `src` (checked before anything is written).
    Returns the model's config and notes for the user."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory: pass a transformers Chameleon folder "
                              "(config.json + model.safetensors or a sharded index)")
    origin = str(src / "config.json")
    hint = (" (this is a mixmodal model directory: `mixmodal convert to-hf-chameleon` writes it for transformers)"
            if (src / CONFIG_FILE).is_file() else "")
    hf_config = read_json(src / "config.json", "a transformers Chameleon folder holds config.json" + hint)
    if hf_config.get("model_type") != "chameleon":
        raise ConversionError(f"{origin}: not a Chameleon config (model_type={hf_config.get('model_type')!r}, "
                              "expected 'chameleon')")
    try:
        source_tokenizer = read_source_tokenizer(src)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    names, names_from = _source_names(hf_config, source_tokenizer, origin)
    layout = special_layout(names, hf_config.get("vocab_size", 65536))
    vocab_map = vocab_map_from_hf(hf_config, origin, layout if isinstance(layout, SpecialLayout) else None)
    config = model_config_from_hf(hf_config, origin, vocab_map)
    state = read_hf_state(src, "ChameleonForConditionalGeneration")
    vq_state = {k[len(_VQ_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(_VQ_PREFIX)]}
    meta_vqgan = _read_meta_vqgan(hf_config, vq_state, vqgan, vqgan_config, config, src) if vqgan is not None else None
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    ours = hf_state_to_mixmodal(state, vocab_map)
    _check(config, ours, f"{src} (weights)")
    notes = []
    write_model_dir(config, ours, out, metadata={"source": "transformers ChameleonForConditionalGeneration"},
                    manifest=False)  # written last, below, once the folder is complete
    (out / VOCAB_MAP_FILE).write_text(json.dumps(vocab_map.to_dict()), encoding="utf-8")
    (out / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    vocab = vocab_map.vocab
    if vocab.size > vocab_map.hf_vocab_size:
        notes.append(f"the vocabulary is padded from {vocab_map.hf_vocab_size} to {vocab.size} rows (a multiple of "
                     f"{vocab.pad_to_multiple}); the extra embedding and lm_head rows are zeros")
    notes.append(f"ids are permuted: {vocab_map.num_image_codes} image tokens moved to ids {vocab.text_size}.."
                 f"{vocab.text_size + vocab_map.num_image_codes - 1} (see {VOCAB_MAP_FILE})")
    notes.extend(_convert_vqgan(hf_config, vq_state, src, out / IMAGE_TOKENIZER_DIR, vocab_map.num_image_codes,
                                meta_vqgan))
    notes.extend(_write_text_side(out, vocab_map, layout, names_from, source_tokenizer, hf_config, image_generation))
    write_manifest(out, remake=f"re-run `mixmodal convert hf-chameleon {src} {out}` (with the options used before)")
    return config, notes


def _source_names(hf_config: dict, source, origin: str) -> tuple[dict[str, int], str]:
    """name -> Chameleon id, and where it came from: the source's tokenizer when it has one (checked
    against vocabulary_map on the special and image tokens), else config.json's vocabulary_map."""
    vocabulary_map = hf_config.get("vocabulary_map") or {}
    if source is None:
        return dict(vocabulary_map), f"{origin} (vocabulary_map)"
    tokenizer, path = source
    names = tokenizer.get_vocab(with_added_tokens=True)
    for name in [*CHAMELEON_SPECIALS.values(), *(n for n in vocabulary_map if image_code_of(n) is not None)]:
        if name in names and name in vocabulary_map and names[name] != vocabulary_map[name]:
            raise ConversionError(f"{path} gives {name!r} id {names[name]} but {origin}'s vocabulary_map gives "
                                  f"{vocabulary_map[name]}: the tokenizer is not this checkpoint's; replace or "
                                  "remove it")
    if len(names) > hf_config.get("vocab_size", 65536):
        raise ConversionError(f"{path} has {len(names)} tokens, more than {origin}'s vocab_size="
                              f"{hf_config.get('vocab_size', 65536)}: the tokenizer is not this checkpoint's")
    return names, str(path)


def _write_text_side(out: Path, vocab_map: VocabMap, layout, names_from: str, source, hf_config: dict,
                     image_generation: bool) -> list[str]:
    """OUT/generation.yaml, OUT/text_tokenizer/tokenizer.json (the source's, copied), and what they mean."""
    write_generation_settings(out, max_length=hf_config.get("max_position_embeddings"), diffusion=None,
                              image_generation=image_generation,
                              chat_template=None if isinstance(layout, str) else "chameleon",
                              image_preprocessing="chameleon")
    notes = [f"{GENERATION_FILE}: image_generation: {str(image_generation).lower()}"
             + ("" if image_generation else " (base Chameleon, as Meta releases it, does not draw; for weights "
                "trained to, e.g. Anole, convert with --image-generation or set it true)")]
    if isinstance(layout, str):
        return notes + [f"{layout} ({names_from}): Chameleon's special tokens were not mapped, so the model converts "
                        "but cannot generate through mixmodal (text ids keep their order)"]
    mapped = ", ".join(f"{chameleon} -> {ours} {slot}" for slot, (ours, chameleon) in enumerate(layout.names.items())
                       if ours in CHAMELEON_SPECIALS)
    fillers = [chameleon for ours, chameleon in layout.names.items() if ours not in CHAMELEON_SPECIALS]
    notes.append(f"special tokens by name from {names_from}: {mapped}; mixmodal's {len(fillers)} other special slots "
                 f"hold unused {fillers[0]}..{fillers[-1]}; {len(vocab_map.never_sample)} ids are never sampled "
                 f"({VOCAB_MAP_FILE}: never_sample)")
    target = out / TEXT_TOKENIZER_DIR / TOKENIZER_FILE
    if source is None:
        return notes + [f"the source folder has no {' or '.join(SOURCE_TOKENIZER_FILES)}: copy Chameleon's tokenizer "
                        f"to {target} before generating"]
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source[1], target)
    return notes + [f"the text tokenizer {source[1]} went to {target}"]


_ATTACH_HINT = ("to decode generated images, add the decoder from Meta's vqgan.ckpt (+ vqgan.yaml; Chameleon's "
                "tokenizer/ folder, also in Anole's): reconvert with --vqgan vqgan.ckpt, or run `mixmodal convert "
                "chameleon-vqgan vqgan.ckpt {out}`")


def _read_meta_vqgan(hf_config: dict, vq_state: dict, path, config_path, model_config: ModelConfig, src: Path):
    """Meta's vqgan.ckpt, checked against the folder: (VQConfig, taming state, .ckpt path)."""
    vq_config, taming, ckpt = read_taming_vqgan(path, config_path)
    image = model_config.image
    if (vq_config.codebook_size, vq_config.grid_size) != (image.num_codes, image.grid_size):
        raise ConversionError(f"{ckpt} has {vq_config.codebook_size} codes on a {vq_config.grid_size}x"
                              f"{vq_config.grid_size} grid but {src / 'config.json'} has {image.num_codes} image tokens "
                              f"on a {image.grid_size}x{image.grid_size} grid: it is not this model's VQGAN")
    if vq_state:
        theirs = asdict(vq_config_from_transformers(hf_config, str(src / "config.json"), encoder_only=False))
        differ = [f"{k}: {theirs[k]} vs {v}" for k, v in asdict(vq_config).items() if theirs[k] != v]
        if differ:
            raise ConversionError(f"{ckpt}'s config disagrees with {src / 'config.json'} vq_config ({'; '.join(differ)}): "
                                  "pass the vqgan.ckpt and vqgan.yaml released with these weights")
        why = first_difference(vq_state, taming)
        if why is not None:
            raise ConversionError(f"{ckpt} is not the VQGAN of {src} (model.vqmodel.*): {why}. Pass the vqgan.ckpt "
                                  "released with these weights (Meta's tokenizer/vqgan.ckpt for Chameleon and Anole)")
    return vq_config, taming, ckpt


def _convert_vqgan(hf_config: dict, vq_state: dict, src: Path, out: Path, num_image_codes: int,
                   meta_vqgan=None) -> list[str]:
    if meta_vqgan is not None:
        vq_config, taming, ckpt = meta_vqgan
        finish_conversion(VQTokenizer(vq_config), taming_to_mixmodal(taming, len(vq_config.channel_multipliers)),
                          ckpt, out, remake=f"re-run `mixmodal convert hf-chameleon {src} {out.parent}` (with "
                                            "the options used before)")
        same = " (its encoder equals the folder's model.vqmodel)" if vq_state else ""
        return [f"the VQGAN of {ckpt} went to {out}: encoder and decoder{same}, so generated images decode"]
    if not vq_state:
        return ["the checkpoint holds no VQGAN (model.vqmodel.*): no image_tokenizer/ was written; "
                + _ATTACH_HINT.format(out=out)]
    try:
        vq_config = vq_config_from_transformers(hf_config, str(src / "config.json"), encoder_only=True)
        mapped = taming_to_mixmodal({k: v.float() for k, v in vq_state.items()}, len(vq_config.channel_multipliers))
        finish_conversion(VQTokenizer(vq_config), mapped, src, out,
                          remake=f"re-run `mixmodal convert hf-chameleon {src} {out.parent}`")
    except ConversionError as e:
        return [f"the VQGAN was not converted ({e}); no {IMAGE_TOKENIZER_DIR}/ was written"]
    notes = [f"the VQGAN went to {out} (encoder only: transformers ships no decoder; prompt images encode, generated "
             f"images cannot decode): " + _ATTACH_HINT.format(out=out)]
    if vq_config.codebook_size != num_image_codes:
        notes.append(f"the VQGAN has {vq_config.codebook_size} codes but the vocabulary {num_image_codes} image tokens")
    return notes


__all__ = ["VOCAB_MAP_FORMAT", "VocabMap", "convert_hf_chameleon", "hf_state_to_mixmodal", "image_code_of",
           "image_token_name", "model_config_from_hf", "native_vocab_map", "vocab_map_from_hf"]
