"""A converted Chameleon reads and writes images as Meta's reference and transformers do.

Tiny random `ChameleonForConditionalGeneration`s (tests/test_chameleon_adapter.py: a tokenizer in
Chameleon's layout, a 16 px VQGAN with 64 codes on an 8x8 grid) and a Meta-layout vqgan.ckpt
made here: the transformers model's encoder tensors plus a random taming decoder. Everything
the tests compare against is computed here, independently of mixmodal:

- Meta's preprocessing (`ImageTokenizer._whiten_transparency` + `_vqgan_input_from`) written
  out, fed to transformers' `ChameleonVQVAE`;
- transformers' `generate` for text, with the prompt laid out by transformers' `ChameleonProcessor`;
- image codes by a plain loop over transformers' raw logits (`lm_head(model(...))`, without the
  forward's image-column mask): only image ids allowed (Anole's image mask), greedy, exactly N
  codes then <eoss>; CFG by Meta's formulas on those logits (`InBatchCFGLogitsProcessor`,
  `InBatchInstructCFGLogitsProcessor`, with Meta's three streams);
- decoded pixels by the functional taming decoder of tests/test_interop_chameleon_vqgan.py and
  Meta's `_pil_from_chw_tensor`."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from mixmodal.cli import main
from mixmodal.documents import Image as DocImage
from mixmodal.inference.config import GenerationConfig, GuidanceConfig, SamplingParams
from mixmodal.inference.engine import Engine
from mixmodal.inference.prompt import PromptError, encode_prompt, to_document
from mixmodal.interop.common import ConversionError
from mixmodal.interop.hf_chameleon import VocabMap, convert_hf_chameleon, image_code_of
from mixmodal.interop.hf_chameleon_export import convert_to_hf_chameleon
from mixmodal.tokenizers.pixels import images_to_tensor
from test_chameleon_adapter import chameleon_tokenizer, hf_chameleon, never_sample_by_meta
from test_interop_chameleon_vqgan import DD, taming_decode, taming_state_dict

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

GRID = 8  # 16 px / 2
N = GRID * GRID
GREEDY_TEXT = GenerationConfig(mode="text", max_new_tokens=16, text=SamplingParams(temperature=0))


def greedy_image(**guidance) -> GenerationConfig:
    return GenerationConfig(mode="image", max_new_tokens=N + 2, image=SamplingParams(temperature=0),
                            guidance=GuidanceConfig(**guidance))


# --- references, written from Meta's and transformers' code ----------------------------------

def meta_vqgan_input(image: PIL.Image.Image, target: int = 16) -> torch.Tensor:
    """facebookresearch/chameleon inference/image_tokenizer.py: _whiten_transparency, _vqgan_input_from."""
    if image.mode != "RGB":
        vals_rgba = np.array(image.convert("RGBA"))
        if not (vals_rgba[:, :, 3] < 255).any():
            image = image.convert("RGB")
        else:
            alpha = vals_rgba[:, :, 3] / 255.0
            vals_rgb = (1 - alpha[:, :, np.newaxis]) * 255 + alpha[:, :, np.newaxis] * vals_rgba[:, :, :3]
            image = PIL.Image.fromarray(vals_rgb.astype("uint8"), "RGB")
    s = min(image.size)
    scale = target / s
    image = image.resize((round(scale * image.size[0]), round(scale * image.size[1])), PIL.Image.LANCZOS)
    x0, y0 = (image.width - target) // 2, (image.height - target) // 2
    image = image.crop((x0, y0, x0 + target, y0 + target))
    np_img = np.array(image) / 255.0
    np_img = np_img * 2 - 1
    return torch.from_numpy(np_img).permute(2, 0, 1).float().unsqueeze(0)


def meta_pil(chw: torch.Tensor) -> np.ndarray:
    """Meta's _pil_from_chw_tensor, as an HWC uint8 array."""
    normalized = (torch.clamp(chw.detach().cpu(), -1.0, 1.0) + 1.0) / 2.0
    return (normalized.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def prompt_images() -> list[PIL.Image.Image]:
    """Non-square images of several modes: RGBA with partial transparency, RGB, greyscale, and an
    RGBA that is fully opaque (Meta converts it without blending)."""
    rng = np.random.RandomState(0)
    rgba = rng.randint(0, 256, (23, 37, 4), dtype=np.uint8)
    rgba[:, :, 3] = np.where(rng.rand(23, 37) < 0.5, 255, rgba[:, :, 3])
    opaque = rng.randint(0, 256, (40, 16, 4), dtype=np.uint8)
    opaque[:, :, 3] = 255
    return [PIL.Image.fromarray(rgba, "RGBA"), PIL.Image.fromarray(rng.randint(0, 256, (30, 19, 3), dtype=np.uint8)),
            PIL.Image.fromarray(rng.randint(0, 256, (21, 21), dtype=np.uint8), "L"),
            PIL.Image.fromarray(opaque, "RGBA")]


def raw_logits(hf, ids: list[list[int]]) -> torch.Tensor:
    """transformers' logits of the last position of each row (equal lengths), every column
    (ChameleonForConditionalGeneration.forward would set the image columns to the minimum)."""
    with torch.no_grad():
        return hf.lm_head(hf.model(input_ids=torch.tensor(ids)).last_hidden_state[:, -1]).float()


def reference_image_codes(hf, streams: list[list[int]], image_ids: list[int], mix) -> list[int]:
    """Meta's ImageDecoder, greedy: every stream gets the chosen id; logits mixed by `mix`, then only
    image ids allowed (AllowOnlyTokensLogitsProcessor), argmax; exactly N codes, then <eoss> (not sampled)."""
    streams = [list(s) for s in streams]
    allowed = torch.full((hf.config.vocab_size,), float("-inf"))
    allowed[image_ids] = 0.0
    out = []
    for _ in range(N):
        logits = [raw_logits(hf, [s])[0] for s in streams]
        token = int((mix(*logits) + allowed).argmax())
        out.append(token)
        for s in streams:
            s.append(token)
    return out


def meta_taming_ckpt(folder, hf, decoder_seed: int = 0, encoder=None) -> str:
    """Meta's vqgan.ckpt + vqgan.yaml for the transformers model's VQGAN: its encoder, quant convs and
    codebook (taming's names are transformers'), and a random decoder."""
    sd = {k: v.clone() for k, v in (encoder or hf.model.vqmodel.state_dict()).items()}
    sd.update({k: v for k, v in taming_state_dict(decoder_seed).items() if k.startswith(("decoder.", "loss."))})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "global_step": 10, "state_dict": sd}, folder / "vqgan.ckpt")
    vq = hf.config.vq_config
    (folder / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": vq.embed_dim, "n_embed": vq.num_embeddings, "ddconfig": DD, "lossconfig": {"target": "x"}}}}))
    return str(folder / "vqgan.ckpt")


def first_image(result) -> np.ndarray:
    return np.asarray(next(p.image for p in result.document.parts if isinstance(p, DocImage)))


class World:
    def __init__(self, root):
        torch.set_num_threads(1)
        self.root = root
        self.tok = chameleon_tokenizer()
        self.hf = hf_chameleon(self.tok)
        self.hf.save_pretrained(root / "hf")
        self.tok.save(str(root / "hf" / "tokenizer.json"))
        self.ckpt = meta_taming_ckpt(root / "meta" / "tokenizer", self.hf)
        self.taming = torch.load(self.ckpt, weights_only=True)["state_dict"]
        self.base = root / "chameleon"  # transformers alone: encoder-only VQGAN, image_generation false
        _, self.base_notes = convert_hf_chameleon(root / "hf", self.base)
        self.anole = root / "anole"  # drawing weights with Meta's VQGAN attached
        _, self.anole_notes = convert_hf_chameleon(root / "hf", self.anole, image_generation=True, vqgan=self.ckpt)
        vocab_map = VocabMap.read(self.anole / "vocab_map.json")
        self.to_ours = vocab_map.hf_to_mixmodal
        names = self.hf.config.vocabulary_map
        self.image_ids = sorted(i for n, i in names.items() if image_code_of(n) is not None)
        self.code_of = {i: image_code_of(n) for n, i in names.items() if image_code_of(n) is not None}
        self.bos, self.boi, self.eoi = names["<s>"], names["<racm3:break>"], names["<eoss>"]

    def text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def image_ids_of(self, image: PIL.Image.Image) -> list[int]:
        """transformers' image tokens (Chameleon ids) for Meta's VQGAN input."""
        with torch.no_grad():
            return self.hf.model.get_image_tokens(meta_vqgan_input(image))[0].tolist()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("chameleon-images"))


# --- image in ----------------------------------------------------------------------------------

def test_prompt_images_encode_as_metas_preprocessing_then_transformers_vqgan(world):
    images = prompt_images()
    for folder in (world.base, world.anole):  # transformers' encoder alone, and Meta's whole VQGAN
        engine = Engine.from_pretrained(folder)
        assert engine.image_preprocessing == "chameleon"
        for image in images:
            doc = to_document(["a picture:", image], engine.image_preprocessing)
            encoded = encode_prompt(doc, engine.text_tokenizer, engine.image_tokenizer, engine.vocab, engine.mode,
                                    None, engine.image_preprocessing)
            ours = [s.ids for s in encoded.segments if s.kind == "image"][0]
            expected = world.image_ids_of(image)
            assert len(ours) == N and ours == [world.to_ours[i] for i in expected], (folder.name, image.mode)
            assert len(set(expected)) > 4
    # the pipeline matters: mixmodal's own (bicubic, crop first; alpha dropped) feeds the VQGAN other pixels
    rgba = images[0]
    assert not torch.equal(images_to_tensor([rgba], 16), meta_vqgan_input(rgba))
    assert yaml.safe_load((world.base / "generation.yaml").read_text())["image_preprocessing"] == "chameleon"


def test_greedy_text_from_text_and_image_prompts_matches_transformers_generate(world):
    """transformers lays the prompt out with its processor (<s> text <racm3:break> <image>x64 <eoss> text,
    return_for_text_completion: no <reserved08706> appended) and puts the VQGAN's ids in place of the
    <image> placeholders; its pixel_values here are Meta's preprocessing (transformers' own image
    processor scales by 0.0078, giving [-1, 0.99] and possibly other codes)."""
    tok, hf = world.tok, world.hf
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>", sep_token="<reserved08706>")
    processor = transformers.ChameleonProcessor(
        transformers.ChameleonImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        fast, image_seq_length=N)
    suppress = never_sample_by_meta(tok, hf.config.vocab_size) + [world.boi]  # base Chameleon: no images
    eos = [tok.token_to_id("</s>"), tok.token_to_id("<reserved08706>")]
    images = prompt_images()
    prompts = [["the cat", images[0], "sat on"], [images[1], "a red circle and"], ["two", images[2], images[3], "the"]]
    engine = Engine.from_pretrained(world.base)
    results = engine.generate(prompts, GREEDY_TEXT)  # one batch
    lengths = []
    for prompt, result in zip(prompts, results):
        text = "".join(p if isinstance(p, str) else "<image>" for p in prompt)
        pil = [p for p in prompt if not isinstance(p, str)]
        inputs = processor(text=text, images=pil, return_for_text_completion=True, return_tensors="pt")
        ids = inputs["input_ids"]
        assert ids[0, 0] == world.bos and (ids == world.boi).sum() == len(pil)
        pixel_values = torch.cat([meta_vqgan_input(p) for p in pil])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=inputs["attention_mask"], pixel_values=pixel_values,
                              max_new_tokens=16, do_sample=False, suppress_tokens=suppress, eos_token_id=eos,
                              pad_token_id=tok.token_to_id("<pad>"))
        expected = out[0, ids.shape[1]:].tolist()
        assert result.ids == [world.to_ours[i] for i in expected], text
        lengths.append(len(expected))
    assert max(lengths) > 5, lengths


# --- image out ---------------------------------------------------------------------------------

def test_greedy_image_codes_match_a_reference_loop_and_decode_as_the_reference(world):
    engine = Engine.from_pretrained(world.anole)
    prompt = "a red circle"
    result = engine.generate(prompt, greedy_image())[0]
    cond = [world.bos, *world.text(prompt), world.boi]
    expected = reference_image_codes(world.hf, [cond], world.image_ids, lambda c: c)
    v = engine.vocab
    assert result.ids[:N + 2] == [v.boi, *(world.to_ours[i] for i in expected), v.eoi]
    assert result.ids[N + 2:] == [] and result.finish_reason == "length"
    codes = torch.tensor([world.code_of[i] for i in expected]).view(1, GRID, GRID)
    assert torch.equal(result.images[0], codes[0]) and len(codes.unique()) > 4
    # pixels: the taming decoder on Meta's weights, then Meta's uint8 conversion
    reference = taming_decode(codes, world.taming)[0]
    with torch.no_grad():
        ours = engine.image_tokenizer.decode(codes)[0]
    assert (ours - reference).abs().max() <= 1e-5
    pil = first_image(result)
    assert np.array_equal(np.asarray(pil), meta_pil(ours))
    assert np.abs(np.asarray(pil).astype(int) - meta_pil(reference).astype(int)).max() <= 1  # float noise at most


def test_cfg_codes_follow_metas_formulas_on_transformers_logits(world):
    engine = Engine.from_pretrained(world.anole)
    v = engine.vocab
    # two streams: Meta's InBatchCFG, uncond <s> <racm3:break>
    prompt = "two blue squares"
    result = engine.generate(prompt, greedy_image(scale=3.0))[0]
    cond = [world.bos, *world.text(prompt), world.boi]
    plain = reference_image_codes(world.hf, [cond], world.image_ids, lambda c: c)
    guided = reference_image_codes(world.hf, [cond, [world.bos, world.boi]], world.image_ids,
                                   lambda c, u: u + 3.0 * (c - u))
    assert result.ids[1:N + 1] == [world.to_ours[i] for i in guided] and guided != plain
    # three streams: Meta's InBatchInstructCFG; the image stream is the prompt filtered to
    # {<s>, image ids, <racm3:break>, <eoss>}, the unconditional one <s> <racm3:break>
    image = prompt_images()[1]
    result = engine.generate([["the cat", image, "in red"]], greedy_image(scale=3.0, image_scale=1.2))[0]
    cond = [world.bos, *world.text("the cat"), world.boi, *world.image_ids_of(image), world.eoi,
            *world.text("in red"), world.boi]
    keep = {world.bos, world.boi, world.eoi, *world.image_ids}
    image_only = [i for i in cond if i in keep]
    assert image_only == [world.bos, world.boi, *world.image_ids_of(image), world.eoi, world.boi]
    instruct = reference_image_codes(world.hf, [cond, image_only, [world.bos, world.boi]], world.image_ids,
                                     lambda c, i, u: u + 1.2 * (i - u) + 3.0 * (c - i))
    assert result.ids[:N + 2] == [v.boi, *(world.to_ours[i] for i in instruct), v.eoi]
    two = reference_image_codes(world.hf, [cond, [world.bos, world.boi]], world.image_ids,
                                lambda c, u: u + 3.0 * (c - u))
    assert instruct != two  # the image stream counts
    with pytest.raises(PromptError, match="guidance.uncond=empty"):  # <mask:0> is an untrained filler here
        engine.generate(prompt, GenerationConfig(mode="image", guidance=GuidanceConfig(scale=3.0, uncond="mask")))


# --- the decoder: attaching it, and the error without it -------------------------------------

def test_encoder_only_folder_refuses_image_generation_until_the_decoder_is_attached(world, tmp_path, capsys):
    folder = tmp_path / "anole-hf-only"
    shutil.copytree(world.base, folder)
    settings = yaml.safe_load((folder / "generation.yaml").read_text())
    (folder / "generation.yaml").write_text(yaml.safe_dump({**settings, "image_generation": True}))
    assert any("encoder only" in n and "--vqgan" in n for n in world.base_notes)
    engine = Engine.from_pretrained(folder)
    for mode in ("image", "interleaved"):
        with pytest.raises(PromptError, match=rf"{folder / 'image_tokenizer'} is encoder only.*mixmodal convert "
                                              r"chameleon-vqgan vqgan.ckpt .*--vqgan"):
            engine.generate("the cat", GenerationConfig(mode=mode))
    assert engine.generate(["the cat", prompt_images()[0]], GREEDY_TEXT)[0].ids  # image in still works
    assert main(["generate", str(folder), "--prompt", "the cat", "--mode", "image", "--out", str(tmp_path / "x")]) == 2
    assert "is encoder only" in capsys.readouterr().err

    # a VQGAN whose encoder is not the model's is refused, by both routes, before anything is written
    other = meta_taming_ckpt(tmp_path / "other", world.hf, encoder=taming_state_dict(5) | {
        "quantize.embedding.weight": torch.randn(64, 8), "quant_conv.weight": torch.randn(8, 8, 1, 1),
        "quant_conv.bias": torch.randn(8), "post_quant_conv.weight": torch.randn(8, 8, 1, 1),
        "post_quant_conv.bias": torch.randn(8)})
    before = (folder / "image_tokenizer" / "model.safetensors").read_bytes()
    assert main(["convert", "chameleon-vqgan", other, str(folder / "image_tokenizer")]) == 2
    assert "encoder is not the one in" in capsys.readouterr().err
    assert (folder / "image_tokenizer" / "model.safetensors").read_bytes() == before
    with pytest.raises(ConversionError, match=r"is not the VQGAN of .*model.vqmodel.*encoder\..* differs"):
        convert_hf_chameleon(world.root / "hf", tmp_path / "no", vqgan=other)
    assert not (tmp_path / "no").exists()

    # attached: the same images as the folder converted with --vqgan
    assert main(["convert", "chameleon-vqgan", str(world.root / "meta" / "tokenizer"),  # the folder holding vqgan.ckpt
                 str(folder / "image_tokenizer")]) == 0
    assert "its encoder equals the one" in capsys.readouterr().out
    attached = Engine.from_pretrained(folder).generate("a red circle", greedy_image())[0]
    reference = Engine.from_pretrained(world.anole).generate("a red circle", greedy_image())[0]
    assert attached.ids == reference.ids
    assert np.array_equal(first_image(attached), first_image(reference))


def test_generate_cli_writes_text_and_decoded_images(world, tmp_path):
    """`mixmodal generate --mode interleaved` on a converted folder writes text and a decoded PNG. The
    model's <racm3:break> row is raised so that greedy text starts an image right after the prompt."""
    hf = copy.deepcopy(world.hf)
    with torch.no_grad():
        h = hf.model(input_ids=torch.tensor([[world.bos, *world.text("the cat")]])).last_hidden_state[0, -1]
        top = float(hf.lm_head(h).max())
        hf.lm_head.weight[world.boi] += (top + 10 - float(hf.lm_head.weight[world.boi] @ h)) * h / h.dot(h)
    hf.save_pretrained(tmp_path / "hf")
    world.tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    convert_hf_chameleon(tmp_path / "hf", tmp_path / "anole", image_generation=True, vqgan=world.ckpt)
    out = tmp_path / "gen"
    assert main(["generate", str(tmp_path / "anole"), "--prompt", "the cat", "--mode", "interleaved",
                 "--max-new-tokens", str(N + 12), "--seed", "0", "--out", str(out), "text.temperature=0"]) == 0
    record = json.loads((out / "documents.jsonl").read_text().splitlines()[0])
    assert [p["type"] for p in record["parts"]] == ["image", "text"] and record["parts"][1]["text"], record
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 1
    config = GenerationConfig(mode="interleaved", max_new_tokens=N + 12, text=SamplingParams(temperature=0))
    result = Engine.from_pretrained(tmp_path / "anole").generate("the cat", config, seed=0)[0]
    with torch.no_grad():
        expected = meta_pil(taming_decode(result.images[0][None], world.taming)[0])
    written = np.asarray(PIL.Image.open(pngs[0]).convert("RGB"))
    assert np.array_equal(written, first_image(result))
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1


def test_converted_folder_goes_back_to_transformers_bitwise_with_the_attached_vqgan(world, tmp_path):
    assert any("encoder and decoder (its encoder equals the folder's model.vqmodel)" in n for n in world.anole_notes)
    _, notes = convert_to_hf_chameleon(world.anole, tmp_path / "back")
    assert any("its decoder is not written" in n for n in notes)
    back, info = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "back",
                                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    source, result = world.hf.state_dict(), back.state_dict()
    assert source.keys() == result.keys() and all(torch.equal(source[k], result[k]) for k in source)


def test_the_pixel_convention_is_a_setting_of_the_folder(world, tmp_path):
    """generation.yaml image_preprocessing picks the pipeline; absent (every native model) is mixmodal's."""
    from mixmodal.inference.checkpoint import CheckpointError

    folder = tmp_path / "m"
    shutil.copytree(world.base, folder)
    settings = yaml.safe_load((folder / "generation.yaml").read_text())
    image = prompt_images()[0]
    for value in ("mixmodal", None):
        written = {k: v for k, v in settings.items() if k != "image_preprocessing"}
        (folder / "generation.yaml").write_text(yaml.safe_dump(written | ({"image_preprocessing": value} if value else {})))
        engine = Engine.from_pretrained(folder)
        assert engine.image_preprocessing == "mixmodal"
        doc = to_document(["x", image], engine.image_preprocessing)
        assert np.array_equal(np.asarray(doc.parts[1].image), np.asarray(image.convert("RGB")))  # alpha dropped, as before
        encoded = encode_prompt(doc, engine.text_tokenizer, engine.image_tokenizer, engine.vocab, engine.mode)
        with torch.no_grad():
            native = engine.image_tokenizer.encode(images_to_tensor([image], 16)).flatten()
        assert encoded.segments[1].ids == engine.vocab.image_code_to_id(native).tolist()
    (folder / "generation.yaml").write_text(yaml.safe_dump(settings | {"image_preprocessing": "meta"}))
    with pytest.raises(CheckpointError, match=r"generation.yaml: image_preprocessing must be one of mixmodal, chameleon"):
        Engine.from_pretrained(folder)
