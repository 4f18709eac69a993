"""The kill -9 soak (issue 22): runs killed with SIGKILL and resumed must end bitwise as uninterrupted ones.

Runs are killed again and again and resumed each time; they must end exactly where an uninterrupted run
ends, bitwise.

    python benchmarks/soak.py                             # every mode, 20 kills each
    python benchmarks/soak.py --mode tokens --kills 5     # one mode
    python benchmarks/soak.py --quick --kills 5           # every mode, short runs (a few minutes)

Modes:

  tokens, latents  a tiny training run (`mixmodal train`, one process) of that image mode: the final
                   weights and the logged losses must equal an uninterrupted run's.
  torchrun         the same training with 2 processes (torchrun, gloo): one rank is killed; the other
                   must be gone within --exit-timeout seconds, nothing left running; the resume
                   (under torchrun again) must end with the weights and losses of an uninterrupted
                   2-process run.
  index            `mixmodal index add` of documents to a memory bank: after every kill the bank must
                   be the old one or the new one, never torn (it opens, `mixmodal verify` passes, and
                   its rows are the first rows of the finished bank); re-running the add completes it,
                   and the finished bank equals an uninterrupted add's, file by file.

Kills come two ways, alternating: at a random moment from outside (the parent sends SIGKILL after a
random delay), and from inside at a named point (mixmodal/train/faults.py: after the weights, the
optimizer or the manifest of a checkpoint are written, right after its rename, in the middle of a
metrics line; in `index add`, after a batch is appended to the store, with every new file written,
after the commit record, after each file is moved into place). Every resume must start from an intact
checkpoint (it would say "damaged" otherwise; the soak fails on that). Prints a JSON summary; exit
status 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSIDE = ("checkpoint:weights", "checkpoint:optimizer", "checkpoint:manifest", "checkpoint:renamed", "metrics:line")
INSIDE_INDEX = ("index:store", "index:prepared", "index:committed", "index:replaced")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


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


def command(mode: str, toks: dict, out: Path, steps: int, resume: bool, nproc: int = 1) -> list[str]:
    image_mode = "tokens" if mode == "torchrun" else mode
    launcher = [sys.executable, "-m", "mixmodal"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "mixmodal"]
    return [*launcher, "train", str(ROOT / f"configs/models/tiny-{image_mode}.yaml"), "--out", str(out),
            f"data.image_tokenizer={toks[image_mode]}", f"data.text_tokenizer={toks['text']}", f"trainer.steps={steps}",
            "trainer.save_every=3", "trainer.keep_last=2", "trainer.log_every=1", "trainer.eval_every=0",
            "data.eval_batches=1", *(["--resume"] if resume else [])]


# --- training: one process, or two under torchrun -------------------------------------------------------

def soak_training(mode: str, toks: dict, work: Path, steps: int, kills: int, rng: random.Random,
                  exit_timeout: float) -> dict:
    nproc = 2 if mode == "torchrun" else 1
    straight = work / f"{mode}-straight"
    began = time.time()
    done = subprocess.run(command(mode, toks, straight, steps, False, nproc), env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode}: the uninterrupted run failed:\n{(done.stdout + done.stderr)[-3000:]}")
    duration = time.time() - began  # outside kills land at random moments of a whole run's length
    run = work / f"{mode}-soaked"
    finished, killed, attempts, exits, restarts, before_first, seconds = False, [], 0, [], 0, 0, []
    while not finished:
        attempts += 1
        if attempts > 4 * kills + 10:
            raise SystemExit(f"{mode}: the soaked run never finished")
        if run.exists() and not any((run / "checkpoints").glob("step_*")):
            # Killed before its first checkpoint: started again in the same folder, from step 0 (the trainer
            # drops the killed attempt's metrics.jsonl, torn last line included)
            before_first += 1
        resume = (run / "checkpoints").is_dir()
        how, env, delay = None, dict(ENV), None
        if len(killed) < kills and len(killed) % 2 == 1:
            point = rng.choice(INSIDE)
            env["MIXMODAL_KILL_AT"] = f"{point}:{rng.randint(1, 3)}"
            how = f"inside {env['MIXMODAL_KILL_AT']}"
            if nproc > 1:
                env["MIXMODAL_KILL_RANK"] = "0"  # rank 0 writes the checkpoints and metrics
                how += " on rank 0"
        elif len(killed) < kills:
            delay = rng.uniform(0.25, 0.9) * duration
        attempt_began = time.time()
        code, output, outside, gone_after = attempt(command(mode, toks, run, steps, resume, nproc), env, nproc, delay,
                                                    rng, exit_timeout, limit=3 * duration + 120, log=work / "attempt.log")
        how = outside or how
        seconds.append(round(time.time() - attempt_began, 1))
        if "damaged" in output:
            raise SystemExit(f"{mode}: a resume found a damaged checkpoint:\n{output[-2000:]}")
        if code == 0 and len(killed) < kills:  # it ended before its kill (a resumed run is shorter): again
            shutil.rmtree(run)
            restarts += 1
        elif code == 0:
            finished = True
        elif nproc == 1 and code == -signal.SIGKILL:
            killed.append(how)
        elif nproc > 1 and how is not None and gone_after is not None:
            left = _left_running(run)
            if left:
                raise SystemExit(f"{mode}: processes of the killed run still running: {left}")
            exits.append(round(gone_after, 1))
            killed.append(how)
        else:
            raise SystemExit(f"{mode}: the run failed (exit {code}, {how or 'not killed'}):\n{output[-3000:]}")
    result = {"kills": len(killed), "how": killed, "started_again": {"finished_before_its_kill": restarts,
                                                                     "killed_before_a_checkpoint": before_first},
              "straight_run_s": round(duration, 1), "attempt_s": seconds, **compare(straight, run)}
    if exits:
        result["others_gone_within_s"] = max(exits)
    return result


def attempt(cmd: list[str], env: dict, nproc: int, delay: float | None, rng: random.Random, exit_timeout: float,
            limit: float, log: Path) -> tuple[int, str, str | None, float | None]:
    """Run `cmd` (one process, or torchrun's agent and its ranks), killing it (one process) or a random rank
    after `delay` seconds. Returns (exit status, output, how it was killed from outside, seconds from a rank's
    death to the end of every process of the run). Fails when the other ranks outlive the death of one by
    more than `exit_timeout`, or the whole by more than `limit`."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        began, how, seen, died_at = time.time(), None, {}, None
        ranks: dict[int, int] = {}
        while proc.poll() is None:
            now = time.time()
            if nproc > 1:
                ranks = rank_processes(proc.pid)
                if died_at is None and any(pid not in ranks.values() for pid in seen.values()):
                    died_at = now  # a rank is gone: killed from inside or outside (or the run is ending)
                seen.update(ranks)
            if delay is not None and how is None and now - began >= delay:
                if nproc == 1:
                    os.kill(proc.pid, signal.SIGKILL)
                    how = f"outside after {delay:.1f}s"
                elif ranks:
                    rank = rng.choice(sorted(ranks))
                    try:
                        os.kill(ranks[rank], signal.SIGKILL)
                        how = f"outside after {now - began:.1f}s, rank {rank}"
                    except ProcessLookupError:  # it has just ended: try the next moment
                        pass
            if died_at is not None and now - died_at > exit_timeout or now - began > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                what = (f"the other rank was still running {exit_timeout:.0f}s after one died" if died_at is not None
                        else f"the run did not end within {limit:.0f}s")
                raise SystemExit(f"{' '.join(cmd[:6])}...: {what}:\n{log.read_text()[-3000:]}")
            time.sleep(0.1 if nproc > 1 else 0.05)
        gone_after = time.time() - died_at if died_at is not None else None
    return proc.returncode, log.read_text(errors="replace"), how, gone_after


def rank_processes(agent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun's agent `agent` started (from /proc)."""
    found = {}
    for pid in _children(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = pid
    return found


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def _left_running(run: Path) -> list[int]:
    """Processes still alive whose command line names the run folder (the agent and ranks of a killed run)."""
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if str(run).encode() in cmdline and state != "Z":
                left.append(int(entry.name))
    return left


def compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    from mixmodal.train.metrics import read_metrics

    wa, wb = load_file(str(a / "model/model.safetensors")), load_file(str(b / "model/model.safetensors"))
    weights = wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) and wa[k].dtype == wb[k].dtype for k in wa)
    la = [(r["step"], r["losses"]) for r in read_metrics(a, "train")]
    lb = [(r["step"], r["losses"]) for r in read_metrics(b, "train")]
    differ = sum(1 for k in wa if k in wb and not bool((wa[k] == wb[k]).all()))
    return {"weights_equal": weights, "losses_equal": la == lb, "steps_logged": len(lb),
            "tensors_differing": differ}


# --- the memory bank: `mixmodal index add` ----------------------------------------------------------------

def encoder(root: Path, toks: dict) -> Path:
    import torch

    from mixmodal.retrieval.document_embedder import save_dual_encoder
    from mixmodal.retrieval.encoder import DualEncoder, DualEncoderConfig, TextTowerConfig, VisionTowerConfig
    from mixmodal.tokenizers.text import TextTokenizer

    text = TextTokenizer.load(toks["text"])
    tower = dict(dim=32, num_layers=2, num_heads=2, mlp_dim=64)
    config = DualEncoderConfig(embed_dim=16, text=TextTowerConfig(vocab_size=text.vocab_size, max_length=32, **tower),
                               vision=VisionTowerConfig(image_size=32, patch_size=8, **tower))
    torch.manual_seed(0)
    return save_dual_encoder(DualEncoder(config), text.backend, root / "encoder")


def index_command(bank: Path, num: int) -> list[str]:
    return [sys.executable, "-m", "mixmodal", "index", "add", str(bank), "shapes:split=heldout,resolution=32",
            "--num", str(num), "--batch-size", "8", "--quiet"]


def soak_index(toks: dict, work: Path, docs: int, kills: int, rng: random.Random) -> dict:
    from mixmodal.cli.verify import verify_path
    from mixmodal.retrieval.bank import MemoryBank

    enc = encoder(work, toks)
    base = work / "bank-base"
    subprocess.run([sys.executable, "-m", "mixmodal", "index", "build", "shapes:split=train,resolution=32", "--num",
                    str(max(docs // 4, 8)), "--encoder", str(enc), "--out", str(base), "--quiet"],
                   env=ENV, check=True, capture_output=True)
    old = len(MemoryBank.open(base))
    straight = work / "bank-straight"
    shutil.copytree(base, straight)
    began = time.time()
    subprocess.run(index_command(straight, docs), env=ENV, check=True, capture_output=True)
    duration = time.time() - began
    reference = bank_files(straight)
    new = len(MemoryBank.open(straight))
    # Rounds: the old bank copied again, `index add` run (and killed) until a run completes; then the bank must
    # equal the uninterrupted add's. A new round while kills are left.
    killed, states, equal, attempts = [], {"old": 0, "new": 0}, [], 0
    bank = work / "bank-soaked"
    while len(killed) < kills or not equal:
        shutil.rmtree(bank, ignore_errors=True)
        shutil.copytree(base, bank)
        completed = False
        while not completed:
            attempts += 1
            if attempts > 4 * kills + 10:
                raise SystemExit("index: the soaked add never finished")
            how, env = None, dict(ENV)
            if len(killed) < kills and len(killed) % 2 == 1:
                point = rng.choice(INSIDE_INDEX)
                visits = {"index:store": rng.randint(1, max(docs // 8, 1)), "index:replaced": rng.randint(1, 5)}
                env["MIXMODAL_KILL_AT"] = f"{point}:{visits.get(point, 1)}"
                how = f"inside {env['MIXMODAL_KILL_AT']}"
            proc = subprocess.Popen(index_command(bank, docs), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            if len(killed) < kills and how is None:
                delay = rng.uniform(0.3, 1.0) * duration
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    how = f"outside after {delay:.1f}s"
            output, _ = proc.communicate()
            if proc.returncode not in (0, -signal.SIGKILL):
                raise SystemExit(f"index: `index add` failed (exit {proc.returncode}):\n{output[-3000:]}")
            # never torn: it opens, verify passes, it is the old bank or the new one, row for row
            try:
                opened = MemoryBank.open(bank)
            except Exception as e:  # noqa: BLE001 - any refusal is a torn bank
                raise SystemExit(f"index: after {how or 'a run'} the bank does not open: {e}")
            count = len(opened)
            if count not in (old, new):
                raise SystemExit(f"index: after {how} the bank holds {count} documents, neither {old} nor {new}")
            bad = [f.line() for f in verify_path(bank) if f.status == "DAMAGED"]
            if bad:
                raise SystemExit(f"index: after {how} `mixmodal verify` fails: {bad}")
            if not same_rows(opened, straight, count):
                raise SystemExit(f"index: after {how} the bank's {count} rows are not the finished bank's")
            del opened
            if proc.returncode == 0:
                completed = True
            else:
                state = "new" if count == new else "old"
                killed.append(f"{how}: {state}")
                states[state] += 1
        equal.append(bank_files(bank) == reference)
    return {"kills": len(killed), "how": killed, "bank_after_kill": states, "rounds": len(equal),
            "documents": {"old": old, "new": new}, "banks_equal": all(equal)}


def bank_files(bank: Path) -> dict[str, str]:
    """SHA-256 of every file of the bank but bank.json (its times), and bank.json without them."""
    files = {}
    for p in sorted(bank.rglob("*")):
        name = p.relative_to(bank).as_posix()
        if p.is_file() and name not in ("bank.json", "write.lock"):
            files[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    meta = json.loads((bank / "bank.json").read_text())
    files["bank.json"] = json.dumps({k: v for k, v in meta.items() if k not in ("created", "updated")}, sort_keys=True)
    return files


def same_rows(opened, finished: Path, count: int) -> bool:
    """The first `count` rows of `opened` are those of the finished bank (embeddings, keys, store bytes)."""
    import numpy as np

    from mixmodal.retrieval.bank import MemoryBank

    full = MemoryBank.open(finished)
    ids = np.arange(count)
    if not np.array_equal(opened.embeddings(ids), full.embeddings(ids)):
        return False
    if not np.array_equal(opened.keys(ids), full.keys(ids)):
        return False
    end = opened._store.end  # (the new offsets.npy of a commit not yet moved into place, if so)
    mine = (opened.path / "store" / "documents.jsonl").read_bytes()[:end]
    return mine == (finished / "store" / "documents.jsonl").read_bytes()[:end]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["tokens", "latents", "torchrun", "index", "both", "all"], default="all",
                        help="both: tokens and latents; all: every mode")
    parser.add_argument("--kills", type=int, default=20, help="kills per mode")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 240; 18 with --quick)")
    parser.add_argument("--docs", type=int, default=None, help="documents `index add` adds (default 400; 96 with --quick)")
    parser.add_argument("--quick", action="store_true", help="short runs: a few minutes for every mode")
    parser.add_argument("--exit-timeout", type=float, default=60.0,
                        help="torchrun: seconds the other rank may take to exit after one is killed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = args.steps or (18 if args.quick else 240)
    docs = args.docs or (96 if args.quick else 400)
    modes = {"both": ["tokens", "latents"], "all": ["tokens", "latents", "torchrun", "index"]}.get(args.mode, [args.mode])
    rng = random.Random(args.seed)
    started = time.time()
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        toks = tokenizers(work)
        for mode in modes:
            began = time.time()
            if mode == "index":
                result[mode] = soak_index(toks, work, docs, args.kills, rng)
            else:
                result[mode] = soak_training(mode, toks, work, steps, args.kills, rng, args.exit_timeout)
            result[mode]["seconds"] = round(time.time() - began, 1)
            print(json.dumps({mode: result[mode]}), flush=True)
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result, indent=1))
    ok = all(r.get("weights_equal", True) and r.get("losses_equal", True) and r.get("banks_equal", True)
             for k, r in result.items() if k != "seconds")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
