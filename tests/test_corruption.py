"""Corruption is detected, not trusted (issue 22): every loader of a folder mixmodal writes, given a truncated,
empty, foreign, wrong-dtype or renamed-tensor file (or a missing / garbage config), answers with one line that
names the path, what is wrong and what to do, through the API a user calls and the command line (no traceback,
nothing written). Each case runs twice: with the folder's manifest.json (weights.py: the manifest names the
damage) and without one (a folder from before manifests: the loader's own checks name it)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixmodal import weights
from mixmodal.cli import main
from mixmodal.weights import MANIFEST, ManifestError

PNG = (lambda b: (PIL.Image.new("RGB", (16, 16), "red").save(b, "PNG"), b.getvalue())[1])(io.BytesIO())


# --- damage, and what a refusal must look like ---------------------------------------------------

def _rewrite_tensors(path: Path, change) -> None:
    tensors = dict(load_file(str(path)))
    key = sorted(k for k, v in tensors.items() if v.is_floating_point())[-1]
    save_file(change(tensors, key), str(path))


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "foreign": lambda p: p.write_bytes(PNG),  # a PNG renamed to the file's name
    "not-json": lambda p: p.write_bytes(b"{this is not json"),
    "garbage": lambda p: p.write_bytes(b"\x89\x00\xff garbage: [unclosed\n  - {"),
    "missing": lambda p: p.unlink(),
    "wrong-dtype": lambda p: _rewrite_tensors(p, lambda t, k: {**t, k: t[k].to(torch.int16)}),
    "renamed-tensor": lambda p: _rewrite_tensors(p, lambda t, k: {**{n: v for n, v in t.items() if n != k},
                                                                  "renamed." + k: t[k]}),
    "flipped-byte": lambda p: p.write_bytes(_flip(p.read_bytes())),  # same size: only the hash tells
}


def _flip(data: bytes) -> bytes:
    i = len(data) - 7  # in the last tensor's data, away from the safetensors header
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def drop_manifests(folder: Path) -> None:
    """A folder as written before manifests existed."""
    for m in folder.rglob(MANIFEST):
        m.unlink()


def one_line(error: BaseException, *must: str) -> str:
    message = str(error)
    assert message.strip() and "\n" not in message.strip(), message
    for text in must:
        assert text in message, f"{text!r} not in {message!r}"
    return message


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def refuse(load, folder: Path, *must: str, error=(ValueError, FileNotFoundError)) -> str:
    """`load()` fails with one line holding `must`, and writes nothing into `folder`."""
    before = snapshot(folder)
    with pytest.raises(error) as raised:
        load()
    assert snapshot(folder) == before, "a failed load wrote into the folder"
    return one_line(raised.value, *must)


def refuse_cli(argv: list[str], capsys, *must: str, out: Path | None = None) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code != 0 and "Traceback" not in captured.err + captured.out, captured.err
    assert len(err.splitlines()) == 1, err
    for text in must:
        assert text in err, f"{text!r} not in {err!r}"
    if out is not None:
        assert not out.exists(), f"{out} was written by a command that failed"
    return err


def _copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# --- folders, built once -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_tokenizer():
    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig

    texts = (t for d in ShapesSource(ShapesConfig(resolution=32), num=50) for t in d.texts)
    return TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=280))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, text_tokenizer):
    """A token-mode model folder as `mixmodal train` leaves RUN/model: manifest.json written last."""
    from mixmodal.train.checkpoint import artifact_remake
    from tiny import save_engine_folder, tiny_engine

    out = tmp_path_factory.mktemp("run") / "model"
    save_engine_folder(tiny_engine("tokens", text_tokenizer), out, max_length=256)
    weights.write_manifest(out, remake=artifact_remake(out.parent))
    return out


@pytest.fixture(scope="module")
def image_tokenizers(tmp_path_factory):
    from mixmodal.tokenizers.image import save_image_tokenizer
    from tiny import tiny_image_tokenizer

    root = tmp_path_factory.mktemp("image")
    return {kind: save_image_tokenizer(tiny_image_tokenizer(mode), root / kind, remake=f"re-run the {kind} conversion")
            for kind, mode in (("vq", "tokens"), ("vae", "latents"))}


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory, text_tokenizer):
    from mixmodal.retrieval.document_embedder import save_dual_encoder
    from mixmodal.retrieval.encoder import DualEncoder, DualEncoderConfig, TextTowerConfig, VisionTowerConfig

    tower = dict(dim=16, num_layers=1, num_heads=2, mlp_dim=32)
    config = DualEncoderConfig(embed_dim=8, text=TextTowerConfig(vocab_size=text_tokenizer.vocab_size, max_length=32,
                                                                 **tower),
                               vision=VisionTowerConfig(image_size=16, patch_size=8, **tower))
    torch.manual_seed(0)
    return save_dual_encoder(DualEncoder(config), text_tokenizer.backend, tmp_path_factory.mktemp("enc") / "encoder",
                             remake="re-run `mixmodal convert hf-clip SRC OUT`")


MODEL_FIX = "copy the model folder again"


# --- the model folder: Engine.from_pretrained and `mixmodal generate` ---------------------------------

MODEL_CASES = [  # (file, damage, what the loader says without a manifest)
    ("model.safetensors", "truncated", "is not a readable safetensors file"),
    ("model.safetensors", "empty", "is empty (0 bytes)"),
    ("model.safetensors", "foreign", "is not a readable safetensors file"),
    ("model.safetensors", "wrong-dtype", "not floating-point weights"),
    ("model.safetensors", "renamed-tensor", "missing tensors (1)"),
    ("model.safetensors", "flipped-byte", None),  # loads: only the manifest can tell
    ("config.yaml", "missing", "config.yaml is missing"),
    ("config.yaml", "garbage", "config.yaml is not UTF-8 text"),
    ("text_tokenizer/tokenizer.json", "truncated", "is not a valid tokenizers JSON file"),
    ("text_tokenizer/tokenizer.json", "not-json", "is not a valid tokenizers JSON file"),
    ("text_tokenizer/tokenizer.json", "empty", "is not a valid tokenizers JSON file"),
    ("image_tokenizer/model.safetensors", "truncated", "is not a readable safetensors file"),
    ("image_tokenizer/config.yaml", "garbage", "is not UTF-8 text"),
]


@pytest.mark.parametrize("name, damage, says", MODEL_CASES, ids=[f"{n}-{d}" for n, d, _ in MODEL_CASES])
def test_a_damaged_model_folder_is_one_line_with_its_manifest(model_folder, tmp_path, capsys, name, damage, says):
    from mixmodal.inference.engine import Engine

    folder = _copy(model_folder, tmp_path)
    DAMAGE[damage](folder / name)
    expected = {"missing": "is missing", "truncated": "bytes, the manifest says", "empty": "has 0 bytes",
                "foreign": "bytes, the manifest says"}.get(damage, "the manifest")  # size or SHA-256
    refuse(lambda: Engine.from_pretrained(folder), folder, str(folder / name), expected, MODEL_FIX, "--resume",
           error=ManifestError)
    out = tmp_path / "gen"
    refuse_cli(["generate", str(folder), "--prompt", "a red circle", "--mode", "text", "--max-new-tokens", "2",
                "--out", str(out)], capsys, str(folder / name), MODEL_FIX, out=out)


@pytest.mark.parametrize("name, damage, says", [c for c in MODEL_CASES if c[2]],
                         ids=[f"{n}-{d}" for n, d, s in MODEL_CASES if s])
def test_a_damaged_model_folder_without_a_manifest_is_one_line(model_folder, tmp_path, capsys, name, damage, says):
    from mixmodal.inference.engine import Engine

    folder = _copy(model_folder, tmp_path)
    drop_manifests(folder)
    DAMAGE[damage](folder / name)
    message = refuse(lambda: Engine.from_pretrained(folder), folder, str(folder / name), says)
    assert any(fix in message for fix in ("again", "re-save", "re-copy", "earlier checkpoint")), message
    out = tmp_path / "gen"
    refuse_cli(["generate", str(folder), "--prompt", "a", "--mode", "text", "--max-new-tokens", "2", "--out",
                str(out)], capsys, str(folder / name), says, out=out)


def test_a_folder_without_a_manifest_or_with_edits_it_allows_still_loads(model_folder, tmp_path):
    from mixmodal.inference.engine import Engine
    from mixmodal.model.io import load_model_dir

    folder = _copy(model_folder, tmp_path)
    (folder / "notes.txt").write_text("added by hand: not in the manifest, not checked")
    settings = folder / "generation.yaml"  # meant to be edited: never listed
    settings.write_text(settings.read_text() + "image_generation: true\n")
    assert Engine.from_pretrained(folder).image_generation is True
    drop_manifests(folder)
    DAMAGE["flipped-byte"](folder / "model.safetensors")  # nothing to check it against
    load_model_dir(folder)


def test_the_manifest_itself_damaged_or_naming_a_path_outside_is_one_line(model_folder, tmp_path):
    from mixmodal.model.io import load_model_dir

    folder = _copy(model_folder, tmp_path)
    (folder / MANIFEST).write_bytes(b'{"files": {"model.safetensors": ')
    refuse(lambda: load_model_dir(folder), folder, str(folder / MANIFEST), "is not readable", MODEL_FIX,
           error=ManifestError)
    (folder / MANIFEST).write_text(json.dumps({"files": {"../outside.bin": {"size": 1, "sha256": "0" * 64}}}))
    refuse(lambda: load_model_dir(folder), folder, str(folder / MANIFEST), "is not a manifest", error=ManifestError)


def test_large_weights_are_hashed_when_loading_fails_or_when_asked(model_folder, tmp_path, monkeypatch):
    """The cost rule: above HASH_AT_LOAD only sizes are checked at load; a changed large file is named when
    reading it fails, and verify_folder hashes everything."""
    from mixmodal.model.io import load_model_dir

    monkeypatch.setattr(weights, "HASH_AT_LOAD", 0)  # every file counts as large
    folder = _copy(model_folder, tmp_path)
    weights.verify_folder(folder)
    DAMAGE["flipped-byte"](folder / "model.safetensors")  # in the data: loads, garbage in
    load_model_dir(folder)
    with pytest.raises(ManifestError) as e:
        weights.verify_folder(folder)
    one_line(e.value, str(folder / "model.safetensors"), "does not match its SHA-256")
    data = bytearray((model_folder / "model.safetensors").read_bytes())  # now a byte of the header, same size:
    data[10] = ord("!")  # reading fails, and then the hash names the changed file
    (folder / "model.safetensors").write_bytes(bytes(data))
    refuse(lambda: load_model_dir(folder), folder, str(folder / "model.safetensors"), "does not match its SHA-256",
           MODEL_FIX, error=ManifestError)


def test_every_problem_is_counted_in_the_one_line(model_folder, tmp_path):
    from mixmodal.model.io import load_model_dir

    folder = _copy(model_folder, tmp_path)
    for name in ("model.safetensors", "config.yaml", "text_tokenizer/tokenizer.json"):
        DAMAGE["truncated"](folder / name)
    refuse(lambda: load_model_dir(folder), folder, "(and 2 more: ", error=ManifestError)


# --- image tokenizers: load_image_tokenizer and `mixmodal image encode` ------------------------------

IMAGE_CASES = [
    ("model.safetensors", "truncated", "is not a readable safetensors file"),
    ("model.safetensors", "empty", "is empty (0 bytes)"),
    ("model.safetensors", "foreign", "is not a readable safetensors file"),
    ("model.safetensors", "wrong-dtype", "checkpoint holds torch.int16"),
    ("model.safetensors", "renamed-tensor", "unexpected tensors (1): renamed."),
    ("config.yaml", "garbage", "is not UTF-8 text"),
    ("config.yaml", "missing", "config.yaml is missing"),
]


@pytest.mark.parametrize("kind", ["vq", "vae"])
@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("name, damage, says", IMAGE_CASES, ids=[f"{n}-{d}" for n, d, _ in IMAGE_CASES])
def test_a_damaged_image_tokenizer_is_one_line(image_tokenizers, tmp_path, capsys, kind, manifest, name, damage, says):
    from mixmodal import load_image_tokenizer

    folder = _copy(image_tokenizers[kind], tmp_path)
    if not manifest:
        drop_manifests(folder)
    DAMAGE[damage](folder / name)
    must = [str(folder / name)] + (["(" + str(folder / MANIFEST) + ")", f"re-run the {kind} conversion"] if manifest
                                   else [says])
    message = refuse(lambda: load_image_tokenizer(folder), folder, *must)
    assert any(fix in message for fix in ("re-save or re-copy", "written by different runs", "convert one")), message
    image = tmp_path / "in.png"
    image.write_bytes(PNG)
    out = tmp_path / "codes.npy"
    refuse_cli(["image", "encode", str(folder), str(image), "--out", str(out)], capsys, str(folder / name), out=out)


# --- the text tokenizer folder: TextTokenizer.load and `mixmodal tokenizer encode` -------------------------

@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("damage", ["truncated", "not-json", "empty"])
def test_a_damaged_text_tokenizer_is_one_line(text_tokenizer, tmp_path, capsys, manifest, damage):
    from mixmodal.tokenizers.text import TextTokenizer

    folder = tmp_path / "tok"
    text_tokenizer.save(folder)
    assert json.loads((folder / MANIFEST).read_text())["files"].keys() == {"tokenizer.json", "tokenizer_config.json"}
    if not manifest:
        drop_manifests(folder)
    DAMAGE[damage](folder / "tokenizer.json")
    says = "bytes, the manifest says" if manifest else "is not a valid tokenizers JSON file"
    for target in (folder, folder / "tokenizer.json"):
        refuse(lambda: TextTokenizer.load(target), folder, str(folder / "tokenizer.json"), says, "again")
    refuse_cli(["tokenizer", "encode", str(folder), "a red circle"], capsys, str(folder / "tokenizer.json"), says)


# --- the dual encoder: DocumentEmbedder.from_pretrained ---------------------------------------------------

ENCODER_CASES = [
    ("model.safetensors", "truncated", "cannot read it as safetensors"),
    ("model.safetensors", "empty", "is empty (0 bytes)"),
    ("model.safetensors", "foreign", "cannot read it as safetensors"),
    ("model.safetensors", "wrong-dtype", "not floating-point weights"),
    ("model.safetensors", "renamed-tensor", "missing tensors (1)"),
    ("model.safetensors", "flipped-byte", None),
    ("tokenizer.json", "truncated", "is not a valid tokenizers JSON file"),
    ("tokenizer.json", "not-json", "is not a valid tokenizers JSON file"),
    ("config.yaml", "garbage", "config.yaml is not UTF-8 text"),
]


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("name, damage, says", ENCODER_CASES, ids=[f"{n}-{d}" for n, d, _ in ENCODER_CASES])
def test_a_damaged_dual_encoder_is_one_line(encoder_folder, tmp_path, manifest, name, damage, says):
    from mixmodal.retrieval.document_embedder import DocumentEmbedder

    folder = _copy(encoder_folder, tmp_path)
    if not manifest:
        drop_manifests(folder)
    DAMAGE[damage](folder / name)
    if not manifest and says is None:
        DocumentEmbedder.from_pretrained(folder)  # a flipped weight byte loads; only the manifest can tell
        return
    must = [str(folder / name), "copy the encoder folder again"]
    must += ["manifest.json", "convert hf-clip"] if manifest else [says]
    refuse(lambda: DocumentEmbedder.from_pretrained(folder), folder, *must)


def test_a_loaded_encoder_agrees_with_its_manifest(encoder_folder):
    from mixmodal.retrieval.document_embedder import DocumentEmbedder

    listed = json.loads((encoder_folder / MANIFEST).read_text())
    assert set(listed["files"]) == {"config.yaml", "model.safetensors", "tokenizer.json"}
    assert DocumentEmbedder.from_pretrained(encoder_folder).fingerprint == listed["files"]["model.safetensors"]["sha256"]


# --- the memory bank: MemoryBank.open and `mixmodal index info` (its own consistency check) -------------------

@pytest.fixture(scope="module")
def bank_folder(tmp_path_factory):
    from mixmodal.retrieval.bank import MemoryBank
    from test_memory_bank import HashEmbedder, make_docs

    root = tmp_path_factory.mktemp("bank")
    MemoryBank.build(make_docs(12), HashEmbedder(root / "enc"), root / "index", progress=False, batch_size=8)
    return root / "index"


BANK_CASES = [
    ("index.faiss", "truncated", "cannot be read by FAISS"),
    ("index.faiss", "empty", "cannot be read by FAISS"),
    ("index.faiss", "foreign", "cannot be read by FAISS"),
    ("embeddings.npy", "truncated", "embeddings.npy"),
    ("embeddings.npy", "empty", "embeddings.npy cannot be read"),
    ("keys.npy", "truncated", "keys.npy"),
    ("store/offsets.npy", "truncated", "offsets.npy"),
    ("store/documents.jsonl", "truncated", "store/documents.jsonl"),
    ("bank.json", "garbage", "bank.json is not valid JSON"),
    ("bank.json", "empty", "bank.json is not valid JSON"),
]


@pytest.mark.parametrize("name, damage, says", BANK_CASES, ids=[f"{n}-{d}" for n, d, _ in BANK_CASES])
def test_a_damaged_memory_bank_is_one_line(bank_folder, tmp_path, capsys, name, damage, says):
    from mixmodal.retrieval.bank import BankError, MemoryBank

    folder = _copy(bank_folder, tmp_path)
    DAMAGE[damage](folder / name)
    refuse(lambda: MemoryBank.open(folder), folder, says, "index build", error=BankError)
    code = main(["index", "info", str(folder)])
    captured = capsys.readouterr()
    assert code != 0 and "Traceback" not in captured.err + captured.out
    assert says in captured.err + captured.out


# --- a converted Chameleon: its vocab_map.json ---------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_chameleon_adapter import build, chameleon_tokenizer

    torch.set_num_threads(1)
    _, folder, _ = build(tmp_path_factory.mktemp("chameleon"), chameleon_tokenizer())
    return folder


def test_a_converted_folder_ends_with_its_manifest(converted):
    from mixmodal.inference.engine import Engine

    listed = json.loads((converted / MANIFEST).read_text())
    assert {"config.yaml", "model.safetensors", "vocab_map.json", "hf_config.json",
            "text_tokenizer/tokenizer.json"} <= set(listed["files"]) and "generation.yaml" not in listed["files"]
    assert "mixmodal convert hf-chameleon" in listed["remake"]
    assert Engine.from_pretrained(converted).checkpoint == str(converted)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-json", "empty"])
def test_a_damaged_vocab_map_is_one_line(converted, tmp_path, capsys, manifest, damage):
    from mixmodal.inference.engine import Engine

    folder = _copy(converted, tmp_path)
    if not manifest:
        drop_manifests(folder)
    DAMAGE[damage](folder / "vocab_map.json")
    must = [str(folder / "vocab_map.json")]
    must += ["manifest.json", "re-run `mixmodal convert hf-chameleon"] if manifest else [
        "cannot read the vocabulary map", "re-run `mixmodal convert hf-chameleon SRC OUT`"]
    refuse(lambda: Engine.from_pretrained(folder), folder, *must)
    out = tmp_path / "gen"
    refuse_cli(["generate", str(folder), "--prompt", "the cat", "--mode", "text", "--max-new-tokens", "2", "--out",
                str(out)], capsys, *must, out=out)


def test_merge_lora_and_training_artifacts_end_with_a_manifest(model_folder, tmp_path):
    """Every writer of a folder a loader checks ends with manifest.json covering what it wrote."""
    from mixmodal.model import lora
    from mixmodal.model.io import load_model_dir

    folder = _copy(model_folder, tmp_path)
    model = load_model_dir(folder)
    config = lora.LoRAConfig(rank=2)
    lora.apply_lora(model, config)
    lora.save_adapter(model, config, folder)
    weights.write_manifest(folder)  # as training ends
    merged, _ = lora.merge_lora_folder(folder, tmp_path / "merged")
    listed = json.loads((merged / MANIFEST).read_text())
    assert "adapter.safetensors" not in listed["files"] and "model.safetensors" in listed["files"]
    assert "merge-lora" in listed["remake"]
    weights.verify_folder(merged)
    load_model_dir(merged)


# --- `mixmodal verify PATH`: every manifest under PATH, every file hashed whatever its size -----------------

@pytest.fixture(scope="module")
def verify_tree(tmp_path_factory, model_folder, bank_folder, text_tokenizer):
    """A run folder (RUN/model + two checkpoints), a memory bank and a text tokenizer, side by side."""
    from mixmodal.train import checkpoint as ckpt

    root = tmp_path_factory.mktemp("verify")
    shutil.copytree(model_folder, root / "run" / "model")
    net = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(net.parameters())
    for step in (2, 4):
        net(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        ckpt.save_checkpoint(root / "run", step, {"net": net}, {"net": optimizer}, {"data": {}}, ckpt.rng_state())
    shutil.copytree(bank_folder, root / "index")
    text_tokenizer.save(root / "tok")
    return root


VERIFY_FOLDERS = ["index", "run/checkpoints/step_000002", "run/checkpoints/step_000004", "run/model", "tok"]


def _verify(root: Path, capsys) -> tuple[int, dict[str, str]]:
    code = main(["verify", str(root)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and not captured.err, captured.err
    lines = captured.out.strip().splitlines()
    by_folder = {}
    for line in lines[:-1]:
        status, _, rest = line.partition(" ")
        folder = rest.strip().split(": ", 1)[0]
        by_folder[str(Path(folder).relative_to(root))] = line
        assert status in ("ok", "DAMAGED", "note"), line
    return code, by_folder


def test_verify_an_intact_tree_is_one_ok_line_per_folder(verify_tree, capsys):
    code, lines = _verify(verify_tree, capsys)
    assert code == 0
    for folder in VERIFY_FOLDERS:
        assert lines[folder].startswith("ok "), lines
    assert "hashed" in lines["run/model"] and "every document reads back" in lines["index"]
    assert main(["verify", str(verify_tree / "run" / "model")]) == 0  # a single folder too
    capsys.readouterr()


VERIFY_CASES = [  # (file, damage, what the line must also say: the fix)
    ("run/model/model.safetensors", "truncated", "--resume"),
    ("run/model/model.safetensors", "flipped-byte", "does not match its SHA-256"),  # same size: hashed in full
    ("run/model/manifest.json", "not-json", "is not readable"),
    ("run/checkpoints/step_000004/optimizer.pt", "truncated", "resume from the previous checkpoint"),
    ("run/checkpoints/step_000002/model.safetensors", "empty", "no earlier checkpoint"),
    ("tok/tokenizer.json", "truncated", "copy the folder again"),
    ("index/store/documents.jsonl", "truncated", "index build"),
    ("index/embeddings.npy", "empty", "index build"),
]


@pytest.mark.parametrize("name, damage, says", VERIFY_CASES, ids=[f"{n}-{d}" for n, d, _ in VERIFY_CASES])
def test_verify_a_damaged_file_is_exit_1_and_a_line_naming_it(verify_tree, tmp_path, capsys, monkeypatch, name,
                                                              damage, says):
    monkeypatch.setattr(weights, "HASH_AT_LOAD", 0)  # as for large weights: loading hashes none of them
    root = _copy(verify_tree, tmp_path)
    DAMAGE[damage](root / name)
    code, lines = _verify(root, capsys)
    assert code == 1
    folder = next(f for f in VERIFY_FOLDERS if name.startswith(f + "/"))
    damaged = [f for f, line in lines.items() if line.startswith("DAMAGED")]
    assert damaged == [folder], lines
    line = lines[folder]
    if damage != "not-json":
        assert str(root / name) in line, line
    assert says in line, line
    if "previous checkpoint" in says:
        assert str(root / "run/checkpoints/step_000002") in line
    assert all(lines[f].startswith("ok ") for f in VERIFY_FOLDERS if f != folder)


def test_verify_an_interrupted_add_is_ok_with_a_note_and_nothing_is_a_failure(verify_tree, tmp_path, capsys):
    root = _copy(verify_tree, tmp_path)
    with open(root / "index" / "store" / "documents.jsonl", "ab") as f:
        f.write(b'{"parts": [{"type": "text", "te')  # a killed `index add`, before its commit
    code, lines = _verify(root, capsys)
    assert code == 0 and "interrupted before its commit" in lines["index"] and lines["index"].startswith("ok ")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["verify", str(empty)]) == 1
    assert "nothing verified" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err


# --- a memory bank on a full or read-only disk: `mixmodal index add` is one line, the bank as it was ------------

BANK_FILES = ["bank.json", "index.faiss", "embeddings.npy", "keys.npy", "store/documents.jsonl", "store/offsets.npy"]


@pytest.mark.parametrize("errno_name, where", [("ENOSPC", "new-file"), ("ENOSPC", "store"), ("EROFS", "lock"),
                                               ("ENOSPC", "faiss")])
def test_index_add_on_a_full_or_read_only_disk_is_one_line_and_the_bank_as_it_was(bank_folder, tmp_path, capsys,
                                                                                 monkeypatch, errno_name, where):
    import errno
    import os

    from mixmodal.documents import write_jsonl
    from mixmodal.retrieval import bank as bank_module
    from mixmodal.retrieval import index as index_module
    from mixmodal.retrieval import store as store_module
    from mixmodal.retrieval.bank import MemoryBank
    from test_memory_bank import HashEmbedder, make_docs

    folder = _copy(bank_folder, tmp_path)
    before = {name: (folder / name).read_bytes() for name in BANK_FILES}
    (tmp_path / "more").mkdir()
    write_jsonl(make_docs(6, seed=7, start=100), tmp_path / "more" / "documents.jsonl")
    monkeypatch.setattr(bank_module, "load_document_embedder", lambda path, device="cpu": HashEmbedder(path))
    code = getattr(errno, errno_name)

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(folder / "keys.npy.add-tmp"))

    if where == "new-file":  # the disk fills up while the new keys.npy is written
        monkeypatch.setattr(bank_module, "save_npy", fail)
    elif where == "store":  # ... while documents are appended to the store (two went in)
        real, calls = store_module.StoreWriter._write_document, []

        def write_two(self, *args):
            calls.append(1)
            if len(calls) > 2:
                fail()
            return real(self, *args)

        monkeypatch.setattr(store_module.StoreWriter, "_write_document", write_two)
    elif where == "lock":  # a read-only folder: not even the lock file can be made
        real_open = os.open
        monkeypatch.setattr(bank_module.os, "open", lambda p, *a, **k: fail() if str(p).endswith("write.lock")
                            else real_open(p, *a, **k))
    else:  # FAISS's own write fails (it raises RuntimeError, not OSError)
        def faiss_fails(index, file):
            raise RuntimeError("Error in faiss::FileIOWriter: fwrite failed (No space left on device)")

        monkeypatch.setattr(index_module.faiss_module(), "write_index", faiss_fails)
    argv = ["index", "add", str(folder), str(tmp_path / "more"), "--quiet"]
    says = "is its disk full or read-only" if where == "faiss" else os.strerror(code)
    refuse_cli(argv, capsys, str(folder), says, "run")
    assert {name: (folder / name).read_bytes() for name in BANK_FILES} == before  # the old bank, byte for byte
    assert not list(folder.glob("*tmp")) and not list((folder / "store").glob("*tmp"))
    monkeypatch.undo()
    monkeypatch.setattr(bank_module, "load_document_embedder", lambda path, device="cpu": HashEmbedder(path))
    assert main(argv) == 0 and "added 6 documents" in capsys.readouterr().out  # space again: the add goes through
    assert len(MemoryBank.open(folder)) == 18


def test_a_build_stopped_while_replacing_a_bank_leaves_one_to_use(bank_folder, tmp_path, monkeypatch):
    """`index build` over an existing bank swaps the folders in one step (RENAME_EXCHANGE); where the OS cannot,
    a build stopped between its two renames leaves the old bank aside: opening says where, the next build
    puts it back before replacing it, and nothing is left beside the bank."""
    from mixmodal.retrieval import bank as bank_module
    from mixmodal.retrieval.bank import BankError, MemoryBank
    from test_memory_bank import HashEmbedder, make_docs

    folder = _copy(bank_folder, tmp_path, "index")
    build = lambda n: MemoryBank.build(make_docs(n, seed=5), HashEmbedder(tmp_path / "enc"), folder,  # noqa: E731
                                       progress=False)
    assert len(build(5)) == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # swapped, old removed
    real_replace = bank_module.os.replace

    def killed_between(src, dst):
        real_replace(src, dst)
        if Path(src) == folder:
            raise KeyboardInterrupt  # as if killed here: the old bank moved aside, the new one not yet in place

    monkeypatch.setattr(bank_module, "_exchange", lambda a, b: False)
    monkeypatch.setattr(bank_module.os, "replace", killed_between)
    with pytest.raises(KeyboardInterrupt):
        build(7)
    monkeypatch.setattr(bank_module.os, "replace", real_replace)
    message = refuse(lambda: MemoryBank.open(folder), tmp_path, "put it back with `mv ", str(folder), error=BankError)
    assert f"{folder.name}.old-" in message
    assert len(build(3)) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["index"]
