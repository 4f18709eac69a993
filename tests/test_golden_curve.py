"""Golden loss curves (torchtitan's practice): the tiny preset of each image mode
(configs/models/tiny-tokens.yaml, tiny-latents.yaml) trains for 30 steps in fp32 on the CPU
from a fixed seed through `mixmodal train`'s code path, and every loss term it logs at every
step must equal the committed curve, tests/golden/loss_curve_<mode>.json, within 1e-4
absolute. A change anywhere in what training computes (data pipeline, tokenization, layout,
model, losses, optimizer, schedule, initialisation, seeding) shows up here as a number.

The tolerance: fp32 runs of the same code differ by about 1e-6 after 30 steps across CPU
kernels (measured with ATEN_CPU_CAPABILITY=default / avx2 / avx512 and with 1 or 2 threads),
while a 1% change of the learning rate moves the losses by 1e-2; 1e-4 sits between the two.
The test does not skip on another torch version or CPU: the curve records the torch version
and CPU capability it was made with, and a failure names both, with the config keys that
differ from the recorded ones.

Updating the curve is a deliberate commit with a reason (what changed in training, and why
the new numbers are right). Regenerate both files with

    MIXMODAL_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_curve.py

(the tests then skip, saying which files they rewrote), review `git diff tests/golden/`, and
commit the JSON with the change that moved it.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy
import pytest
import tokenizers  # the run trains its BPE first: its version is part of what the curve depends on
import torch

from mixmodal.config import to_dict
from mixmodal.tokenizers.image import save_image_tokenizer
from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
from mixmodal.tokenizers.vq import VQConfig, VQTokenizer
from mixmodal.train.metrics import read_metrics
from mixmodal.train.run import load_run_config, train

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
UPDATE = "MIXMODAL_UPDATE_GOLDEN"
TOLERANCE = 1e-4  # absolute, on every logged loss term at every step
STEPS = 30
# Everything that decides the numbers is fixed here or in the preset; no evals but the
# trainer's final one (1 batch), one checkpoint (the trainer's last).
OVERRIDES = [f"trainer.steps={STEPS}", "trainer.log_every=1", "trainer.seed=0", "trainer.precision=fp32",
             "trainer.device=cpu", "trainer.eval_every=0", "trainer.save_every=0", "trainer.num_workers=0",
             "data.eval_batches=1"]
# The run's own paths (a temporary folder) are not part of what the curve depends on.
MACHINE_KEYS = {"data.image_tokenizer", "data.text_tokenizer"}


def _image_tokenizer(mode: str):
    """A random tiny image tokenizer (32 px, x4 down: 8 x 8 per image), from seed 0."""
    torch.manual_seed(0)
    trunk = dict(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2], num_res_blocks=1, norm_groups=4)
    if mode == "tokens":
        return VQTokenizer(VQConfig(**trunk, latent_channels=8, codebook_size=64, codebook_dim=4))
    return VAETokenizer(VAEConfig(**trunk, latent_channels=4))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _environment() -> dict:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__,
            "tokenizers": tokenizers.__version__}


def _train_curve(mode: str, tmp_path: Path) -> dict:
    save_image_tokenizer(_image_tokenizer(mode), tmp_path / "image_tokenizer")
    preset = f"configs/models/tiny-{mode}.yaml"
    config = load_run_config(ROOT / preset, [f"data.image_tokenizer={tmp_path / 'image_tokenizer'}", *OVERRIDES])
    train(config, tmp_path / "run")
    records = read_metrics(tmp_path / "run", "train")
    resolved = json.loads(json.dumps(to_dict(config)))  # tuples -> lists, as the JSON file holds them
    return {
        "about": "Golden loss curve of tests/test_golden_curve.py (see its docstring). Regenerate with "
                 f"{UPDATE}=1; updating it is a deliberate commit with a reason.",
        "mode": mode,
        "preset": preset,
        "overrides": OVERRIDES,
        "tolerance": {"absolute": TOLERANCE},
        "recorded_with": _environment(),
        "config": {k: v for k, v in _flatten(resolved).items() if k not in MACHINE_KEYS},
        "curve": [{"step": r["step"], **r["losses"]} for r in records],
    }


def _dump(golden: dict) -> str:
    """Indented JSON with one line per step of the curve (readable diffs)."""
    steps = ",\n".join("  " + json.dumps(step) for step in golden["curve"])
    text = json.dumps({**golden, "curve": "@CURVE@"}, indent=1)
    return text.replace('"@CURVE@"', "[\n" + steps + "\n ]") + "\n"


def _mismatches(want: list[dict], got: list[dict]) -> list[str]:
    if [w["step"] for w in want] != [g["step"] for g in got]:
        return [f"logged steps {[g['step'] for g in got]}, golden {[w['step'] for w in want]}"]
    problems = []
    for w, g in zip(want, got):
        if set(w) != set(g):
            problems.append(f"step {w['step']}: logged loss terms {sorted(g)}, golden {sorted(w)}")
            continue
        for key in w:
            if key != "step" and not abs(g[key] - w[key]) <= TOLERANCE:
                problems.append(f"step {w['step']} {key}: {g[key]:.7f}, golden {w[key]:.7f} "
                                f"(off by {abs(g[key] - w[key]):.2e})")
    return problems


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_training_losses_follow_the_golden_curve(mode, tmp_path):
    path = GOLDEN / f"loss_curve_{mode}.json"
    got = _train_curve(mode, tmp_path)
    if os.environ.get(UPDATE) == "1":
        path.write_text(_dump(got), encoding="utf-8")
        pytest.skip(f"{UPDATE}=1: rewrote {path.relative_to(ROOT)}; review the diff and commit it with the reason")
    assert path.is_file(), f"{path} is missing; create it with {UPDATE}=1 (see tests/test_golden_curve.py)"
    want = json.loads(path.read_text(encoding="utf-8"))
    problems = _mismatches(want["curve"], got["curve"])
    if problems:
        changed = sorted(k for k in set(want["config"]) | set(got["config"])
                         if want["config"].get(k, "<absent>") != got["config"].get(k, "<absent>"))
        shown = "; ".join(f"{k}: {want['config'].get(k, '<absent>')} -> {got['config'].get(k, '<absent>')}"
                          for k in changed[:10])
        pytest.fail(
            f"{mode}: {len(problems)} logged losses differ from {path.relative_to(ROOT)} by more than {TOLERANCE} "
            f"(absolute):\n  " + "\n  ".join(problems[:8]) + ("\n  ..." if len(problems) > 8 else "") +
            f"\nrecorded with {want['recorded_with']}; this is {_environment()}"
            f"\nconfig keys that differ from the recorded run: {shown or 'none'}"
            f"\nIf training was meant to change, regenerate with {UPDATE}=1 and commit the curve with the reason.",
            pytrace=False)
