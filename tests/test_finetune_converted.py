"""`mixmodal train` with `init_from:` a converted Chameleon, full or LoRA, end to end.

A tiny random `ChameleonForConditionalGeneration` with a tokenizer in Chameleon's layout
(tests/test_chameleon_adapter.py) and Meta's VQGAN attached (tests/test_chameleon_images.py:
16 px, 64 codes, encoder = transformers' model.vqmodel, a random taming decoder), converted with
`--image-generation --vqgan`, is fine-tuned for a few steps on a small documents JSONL (captioned
images of odd sizes, text, a conversation). What is checked against references computed here,
independently of mixmodal's training code:

- the training rows: text through Chameleon's own tokenizer (ids mapped by vocab_map.json), images
  prepared by Meta's pipeline and encoded by transformers' VQGAN, the conversation in Chameleon's
  template (no role tokens, turns closed by <reserved08706>); no target is an id the engine never
  samples, but the <eoss> the engine writes itself after an image;
- RUN/model is a converted-style folder: Engine.from_pretrained loads it with the adapter and
  generates text and decoded images; `to-hf-chameleon` writes a folder whose transformers logits
  equal the fine-tuned model's;
- a resumed run is bitwise the straight run (full and LoRA);
- LoRA trains the adapters only (the base weights bitwise as converted), saves them apart, and the
  merged weights (`convert merge-lora`, on-load merging) give the unmerged forward to 1e-5;
- bad LoRA settings fail with one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mixmodal.cli import main
from mixmodal.documents import Document, Image, Text, write_jsonl
from mixmodal.inference.config import GenerationConfig, SamplingParams
from mixmodal.inference.engine import Engine
from mixmodal.interop.chameleon_tokenizer import ChameleonTokenizer
from mixmodal.interop.hf_chameleon import VocabMap, convert_hf_chameleon
from mixmodal.interop.hf_chameleon_export import convert_to_hf_chameleon
from mixmodal.model.io import load_model_dir
from mixmodal.model.lora import ADAPTER_CONFIG_FILE, ADAPTER_FILE, LoRALinear, load_unmerged, merge_lora
from mixmodal.train import checkpoint as ckpt
from mixmodal.train.fusion import build_task
from mixmodal.train.run import load_run_config, train
from test_chameleon_adapter import TEXTS, chameleon_tokenizer, hf_chameleon
from test_chameleon_images import meta_taming_ckpt, meta_vqgan_input, raw_logits

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

IGNORE = -100
LORA = ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.1"]


def documents() -> list[Document]:
    """Captioned images of odd sizes (caption first), plain text, and one conversation."""
    rng = np.random.RandomState(0)
    docs = []
    for i in range(6):
        h, w = int(rng.randint(14, 40)), int(rng.randint(14, 40))
        image = PIL.Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
        docs.append(Document([Text(TEXTS[i]), Image(image)], id=f"captioned-{i}"))
    docs.append(Document([Text(TEXTS[3] + " " + TEXTS[4])], id="text"))
    chat_image = PIL.Image.fromarray(rng.randint(0, 256, (20, 30, 3), dtype=np.uint8))
    docs.append(Document([Text("what is this?"), Image(chat_image), Text("a red circle")],
                         {"turns": [["user", 2], ["assistant", 1]]}, id="chat"))
    return docs


class World:
    def __init__(self, root: Path) -> None:
        torch.set_num_threads(1)
        self.root = root
        self.tok = chameleon_tokenizer()
        self.hf = hf_chameleon(self.tok)
        self.hf.save_pretrained(root / "hf")
        self.tok.save(str(root / "hf" / "tokenizer.json"))
        ckpt_path = meta_taming_ckpt(root / "meta" / "tokenizer", self.hf)
        self.converted = root / "anole"
        convert_hf_chameleon(root / "hf", self.converted, image_generation=True, vqgan=ckpt_path)
        self.vocab_map = VocabMap.read(self.converted / "vocab_map.json")
        self.to_ours = list(self.vocab_map.hf_to_mixmodal)
        self.docs = documents()
        write_jsonl(self.docs, root / "data" / "docs.jsonl")
        self.config_file = root / "finetune.yaml"
        self.config_file.write_text(yaml.safe_dump({
            "task": "fusion", "init_from": str(self.converted),
            "data": {"source": str(root / "data" / "docs.jsonl"), "eval_source": str(root / "data" / "docs.jsonl"),
                     "pipeline": {"seq_len": 128, "caption_first_prob": 1.0}, "eval_batches": 1},
            "trainer": {"steps": 6, "batch_size": 2, "lr": 1.0e-2, "warmup_steps": 2, "precision": "fp32",
                        "device": "cpu", "log_every": 2, "save_every": 3, "progress": False}}))
        self.full = root / "full"  # the straight full fine-tuning run, shared by the tests
        train(self.config(), self.full)
        self.lora = root / "lora"
        train(self.config(*LORA), self.lora)

    def config(self, *overrides: str):
        return load_run_config(self.config_file, list(overrides))

    def ours(self, hf_ids: list[int]) -> list[int]:
        return [self.to_ours[i] for i in hf_ids]

    def text(self, text: str) -> list[int]:
        return self.ours(self.tok.encode(text, add_special_tokens=False).ids)

    def image(self, image: PIL.Image.Image) -> list[int]:
        """Meta's preprocessing written out, transformers' VQGAN, Chameleon's image ids mapped."""
        with torch.no_grad():
            return self.ours(self.hf.model.get_image_tokens(meta_vqgan_input(image))[0].tolist())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("finetune-chameleon"))


def weights(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    path = ckpt.latest_checkpoint(run) if step is None else ckpt.checkpoint_dir(run, step)
    return load_file(str(path / "model.safetensors"))


def task_of(run: Path):
    """The task as the run built it (its saved, prepared config), set up on the CPU."""
    task = build_task(load_run_config(run / "config.yaml"))
    task.setup(torch.device("cpu"))
    return task


# --- (a) a full fine-tuning run ------------------------------------------------------------------

def test_training_encodes_as_chameleon_and_never_targets_unsampled_ids(world):
    task = task_of(world.full)
    assert isinstance(task.text_tokenizer, ChameleonTokenizer)
    assert task.image_preprocessing == "chameleon" and task.chat_template == "chameleon"
    v = task.vocab
    batches = task._batches(str(world.root / "data" / "docs.jsonl"), 2, False, 0, 1)
    encoded = batches.encoder.encode(list(enumerate(world.docs)))
    for doc, enc in zip(world.docs[:6], encoded):  # caption, then the image, as Meta lays it out
        text, image = doc.parts
        assert [i for s in enc.segments for i in s.ids] == world.text(text.text) + world.image(image.image)
    chat = [i for s in encoded[-1].segments for i in s.ids]
    user_text, chat_image, reply = world.docs[-1].parts
    expected = world.text(user_text.text) + world.image(chat_image.image) + [v.end_of_turn] \
        + world.text(reply.text) + [v.end_of_turn]
    assert chat == expected  # Chameleon's template: no role tokens, <reserved08706> closes each turn
    assert world.tok.id_to_token(world.vocab_map.hf_to_mixmodal.index(v.end_of_turn)) == "<reserved08706>"

    never = set(world.vocab_map.never_sample)
    seen_targets, rows = set(), 0
    for batch in batches:
        rows += batch["input_ids"].shape[0]
        labels = batch["labels"][batch["labels"] != IGNORE]
        seen_targets |= set(labels.tolist())
        assert not set(batch["input_ids"].flatten().tolist()) & {v.user, v.assistant, v.system}
    assert rows >= 4 and seen_targets & set(range(v.image_code_ids.start, v.image_code_ids.stop))
    assert seen_targets & never == {v.eoi}  # the engine writes <eoss> itself after an image
    assert {v.eos, v.boi, v.end_of_turn} <= seen_targets


def test_the_finetuned_folder_generates_and_converts_back(world, tmp_path):
    model_dir = world.full / "model"
    before, after = load_file(str(world.converted / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    for name in ("vocab_map.json", "hf_config.json", "text_tokenizer/tokenizer.json"):
        assert (model_dir / name).read_bytes() == (world.converted / name).read_bytes(), name
    generation = yaml.safe_load((model_dir / "generation.yaml").read_text())
    original = yaml.safe_load((world.converted / "generation.yaml").read_text())
    assert generation["image_generation"] is True and generation["image_preprocessing"] == "chameleon"
    assert generation["chat_template"] == "chameleon" and generation["max_length"] == original["max_length"]
    assert not (model_dir / ADAPTER_FILE).exists()

    engine = Engine.from_pretrained(world.full)  # the run directory: its model/
    assert isinstance(engine.text_tokenizer, ChameleonTokenizer) and engine.image_preprocessing == "chameleon"
    never = set(world.vocab_map.never_sample)
    text = engine.generate("the cat sat on", GenerationConfig(mode="text", max_new_tokens=12,
                                                              text=SamplingParams(temperature=1.0)), seed=3)[0]
    assert text.ids and not set(text.ids) & never
    drawn = engine.generate("a red circle", GenerationConfig(mode="image", max_new_tokens=80,
                                                             image=SamplingParams(temperature=0)))[0]
    pixels = [p.image for p in drawn.document.parts if isinstance(p, Image)]
    assert len(pixels) == 1 and pixels[0].size == (16, 16)
    assert main(["generate", str(world.full), "--prompt", "the cat", "--mode", "text", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "documents.jsonl").is_file()

    hf_config, _ = convert_to_hf_chameleon(model_dir, tmp_path / "hf")
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = [world.tok.token_to_id("<s>")] + world.tok.encode("two small dogs", add_special_tokens=False).ids
    ours = load_model_dir(model_dir)
    with torch.no_grad():
        mine = ours(torch.tensor([world.ours(ids)])).logits[0, -1, world.to_ours]  # Chameleon's column order
    torch.testing.assert_close(mine, raw_logits(hf, [ids])[0], rtol=1e-4, atol=1e-4)


# --- (b) exact resume ------------------------------------------------------------------------------

def test_a_resumed_finetuning_run_is_bitwise_the_straight_run(world, tmp_path):
    train(world.config("trainer.steps=3"), tmp_path / "resumed")
    train(world.config("trainer.resume=true"), tmp_path / "resumed")
    a, b = weights(world.full), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- (c) LoRA trains only its adapters ---------------------------------------------------------------

def test_lora_changes_only_the_adapters_and_saves_them_apart(world, tmp_path):
    base = load_file(str(world.converted / "model.safetensors"))
    saved = load_file(str(world.lora / "model" / "model.safetensors"))
    assert saved.keys() == base.keys() and all(torch.equal(saved[k], base[k]) for k in base)  # bitwise, as converted
    adapter = load_file(str(world.lora / "model" / ADAPTER_FILE))
    config = yaml.safe_load((world.lora / "model" / ADAPTER_CONFIG_FILE).read_text())
    assert config["rank"] == 4 and config["alpha"] == 8 and len(config["targets"]) == 7
    assert len(adapter) == 2 * 7 * 2  # A and B, seven projections, two layers
    assert all(k.endswith((".lora_A", ".lora_B")) for k in adapter)
    assert all(adapter[k].abs().max() > 0 for k in adapter if k.endswith("lora_B"))  # B starts at zero: it trained
    first, last = weights(world.lora, 3), weights(world.lora, 6)
    for key in base:  # every base tensor of every checkpoint is the converted one
        assert torch.equal(first[f"model.{key}"], base[key]) and torch.equal(last[f"model.{key}"], base[key]), key
    assert all(not torch.equal(first[f"model.{k}"], last[f"model.{k}"]) for k in adapter)
    optimizer = torch.load(ckpt.latest_checkpoint(world.lora) / "optimizer.pt", weights_only=True)["model"]
    assert len(optimizer["state"]) == len(adapter)  # the optimizer holds the adapters only
    # exact resume, with the adapters' dropout drawing from the saved random streams
    train(world.config(*LORA, "trainer.steps=3"), tmp_path / "resumed")
    train(world.config(*LORA, "trainer.resume=true"), tmp_path / "resumed")
    a, b = weights(world.lora), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- (d) merged = unmerged ---------------------------------------------------------------------------

def test_merged_weights_give_the_unmerged_forward(world, tmp_path, capsys):
    unmerged = load_unmerged(world.lora / "model")
    assert sum(isinstance(m, LoRALinear) for m in unmerged.modules()) == 14
    assert main(["convert", "merge-lora", str(world.lora), str(tmp_path / "merged")]) == 0
    assert "merged the LoRA adapter" in capsys.readouterr().out
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / ADAPTER_FILE).exists() and not (merged_dir / ADAPTER_CONFIG_FILE).exists()
    for name in ("vocab_map.json", "hf_config.json", "generation.yaml", "text_tokenizer/tokenizer.json"):
        assert (merged_dir / name).read_bytes() == (world.lora / "model" / name).read_bytes(), name
    merged = load_model_dir(merged_dir)
    on_load = Engine.from_pretrained(world.lora).model  # readers merge the adapter as they load the folder
    in_place = merge_lora(load_unmerged(world.lora / "model"))
    assert not any(isinstance(m, LoRALinear) for m in in_place.modules())
    ids = torch.tensor([[1] + world.text("a red circle and a blue square") + [3] + list(range(400, 420))])
    with torch.no_grad():
        reference = unmerged(ids)
        base = load_model_dir(world.converted)(ids).hidden_states
        assert (reference.hidden_states - base).abs().max() > 1e-2  # the adapters do change the forward
        scale = reference.logits.abs().max()  # (this model's logits are large: lm_head x 20, test_chameleon_adapter)
        for model in (merged, on_load, in_place):
            out = model(ids)  # the last hidden states to 1e-5, the logits to 1e-5 of their largest
            torch.testing.assert_close(out.hidden_states, reference.hidden_states, rtol=0, atol=1e-5)
            assert (out.logits - reference.logits).abs().max() <= 1e-5 * scale
    convert_to_hf_chameleon(world.lora / "model", tmp_path / "hf-lora")  # to-hf merges too
    convert_to_hf_chameleon(merged_dir, tmp_path / "hf-merged")
    a, b = load_file(str(tmp_path / "hf-lora" / "model.safetensors")), load_file(str(tmp_path / "hf-merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- (e) bad settings: one line naming the field ----------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (["lora.rank=0"], "lora.rank"),
    (["lora.targets=[q_proj,attn_proj]"], "lora.targets: 'attn_proj' is not a projection"),
    (["lora.alpha=0"], "lora.alpha"),
    (["lora.dropout=1.5"], "lora.dropout"),
    (["init_from=", "model.transformer.dim=64", "lora.rank=4"], "lora: LoRA adapts a pretrained model; set init_from"),
    (["data.pipeline.cm3.rate=0.5"], "data.pipeline.cm3.rate=0.5"),
    (["data.pipeline.cond_dropout=0.1", "data.pipeline.uncond=mask"], "data.pipeline.uncond=mask"),
])
def test_bad_settings_fail_with_one_line_naming_the_field(world, tmp_path, capsys, overrides, field):
    assert main(["train", str(world.config_file), "--out", str(tmp_path / "run"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and "\n" not in err, err
    assert not ckpt.list_checkpoints(tmp_path / "run")


def test_a_chameleon_tokenizer_without_its_map_says_where_the_map_goes(world, tmp_path, capsys):
    import shutil

    shutil.copytree(world.converted / "text_tokenizer", tmp_path / "alone" / "text_tokenizer")
    assert main(["train", str(world.config_file), "--out", str(tmp_path / "run"),
                 f"data.text_tokenizer={tmp_path / 'alone' / 'text_tokenizer'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is Chameleon's text tokenizer" in err and "vocab_map.json" in err and "\n" not in err, err
    json.loads((world.converted / "vocab_map.json").read_text())  # (the converted folder is untouched)
