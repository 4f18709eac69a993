"""The kill -9 soak (issue 22): a tiny training run killed with SIGKILL again and again, resumed each
time, must end with the weights and the logged losses of an uninterrupted run, bitwise.

    python benchmarks/soak.py                         # both image modes, 20 kills each
    python benchmarks/soak.py --mode tokens --kills 5 # a quick one

Kills come two ways, alternating: at a random moment from outside (the parent sends SIGKILL after
a random delay), and from inside at a named point (mixmodal/train/faults.py: after the weights,
the optimizer or the manifest of a checkpoint are written, right after its rename, in the middle
of a metrics line). Every resume must start from an intact checkpoint (it would say "damaged"
otherwise; the soak fails on that). Prints a JSON summary; exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSIDE = ("checkpoint:weights", "checkpoint:optimizer", "checkpoint:manifest", "checkpoint:renamed", "metrics:line")


def tokenizers(root: Path) -> dict[str, Path]:
    import torch

    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.tokenizers.image import save_image_tokenizer
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
    from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
    from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

    torch.manual_seed(0)
    trunk = dict(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2], num_res_blocks=1, norm_groups=4)
    save_image_tokenizer(VQTokenizer(VQConfig(**trunk, latent_channels=8, codebook_size=64, codebook_dim=4)), root / "vq")
    save_image_tokenizer(VAETokenizer(VAEConfig(**trunk, latent_channels=4)), root / "vae")
    texts = (t for doc in ShapesSource(ShapesConfig(resolution=32), num=300) for t in doc.texts)
    TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=300)).save(root / "text")
    return {"tokens": root / "vq", "latents": root / "vae", "text": root / "text"}


def command(mode: str, toks: dict, out: Path, steps: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "mixmodal", "train", str(ROOT / f"configs/models/tiny-{mode}.yaml"), "--out", str(out),
            f"data.image_tokenizer={toks[mode]}", f"data.text_tokenizer={toks['text']}", f"trainer.steps={steps}",
            "trainer.save_every=3", "trainer.keep_last=2", "trainer.log_every=1", "trainer.eval_every=0",
            *(["--resume"] if resume else [])]


def soak(mode: str, toks: dict, work: Path, steps: int, kills: int, rng: random.Random) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = work / f"{mode}-straight"
    began = time.time()
    subprocess.run(command(mode, toks, straight, steps, False), env=env, check=True, capture_output=True)
    duration = time.time() - began  # outside kills land at random moments of a whole run's length
    run = work / f"{mode}-soaked"
    done, killed, log, attempts = False, [], [], 0
    while not done:
        attempts += 1
        if attempts > 4 * kills + 10:
            raise SystemExit(f"{mode}: the soaked run never finished")
        resume = (run / "checkpoints").is_dir()
        how = None
        child_env = dict(env)
        if len(killed) < kills and len(killed) % 2 == 1:
            point = rng.choice(INSIDE)
            child_env["MIXMODAL_KILL_AT"] = f"{point}:{rng.randint(1, 3)}"
            how = f"inside {child_env['MIXMODAL_KILL_AT']}"
        proc = subprocess.Popen(command(mode, toks, run, steps, resume), env=child_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if len(killed) < kills and how is None:
            delay = rng.uniform(0.3, 0.95) * duration
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                how = f"outside after {delay:.1f}s"
        output, _ = proc.communicate()
        log.append(output)
        if "damaged" in output:
            raise SystemExit(f"{mode}: a resume found a damaged checkpoint:\n{output[-2000:]}")
        if proc.returncode == 0:
            done = True
        elif proc.returncode == -signal.SIGKILL:
            killed.append(how)
        else:
            raise SystemExit(f"{mode}: the run failed (exit {proc.returncode}):\n{output[-3000:]}")
    return {"kills": len(killed), "how": killed, **compare(straight, run)}


def compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    from mixmodal.train.metrics import read_metrics

    wa, wb = load_file(str(a / "model/model.safetensors")), load_file(str(b / "model/model.safetensors"))
    weights = wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) and wa[k].dtype == wb[k].dtype for k in wa)
    la = [(r["step"], r["losses"]) for r in read_metrics(a, "train")]
    lb = [(r["step"], r["losses"]) for r in read_metrics(b, "train")]
    return {"weights_equal": weights, "losses_equal": la == lb, "steps_logged": len(lb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["tokens", "latents", "both"], default="both")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        toks = tokenizers(work)
        result = {mode: soak(mode, toks, work, args.steps, args.kills, rng)
                  for mode in (["tokens", "latents"] if args.mode == "both" else [args.mode])}
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=1))
    ok = all(r["weights_equal"] and r["losses_equal"] for k, r in result.items() if k != "seconds")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
