"""Training throughput with retrieval augmentation vs without (issue target: within 10%).

Side by side in one script: the same fusion config (configs/retrieval/ra-tokens-32.yaml,
same model, batch and sequence length, so the same positions per step) trained with
data.retrieval.k = 0 and k = 2, alternating round by round so machine drift hits both
alike. Reported: the median steps/s of each (from the trainer's own metrics.jsonl, after
the first logged interval), their ratio, and the data pipeline alone (ms per batch,
retrieval included: dual-encoder forward + FAISS search + encoding retrieved documents,
which are encoded once for the whole bank before training: data.retrieval.precompute).

    python benchmarks/retrieval_train.py --bank runs/study-retrieval/bank --vq runs/study-retrieval/vq/tokenizer
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/retrieval/ra-tokens-32.yaml"
PRECOMPUTE: list[float] = []  # seconds to encode the whole bank once (data.retrieval.precompute)


def overrides(k: int, bank: str, vq: str, steps: int) -> list[str]:
    retrieval = [f"data.retrieval.index={bank}", f"data.retrieval.k={k}"] if k else []
    return [f"data.image_tokenizer={vq}", f"trainer.steps={steps}", "trainer.eval_every=0", "trainer.save_every=0",
            "trainer.progress=false", "data.eval_batches=1", *retrieval]


def train_rate(k: int, bank: str, vq: str, steps: int, work: Path) -> float:
    from mixmodal.train.run import load_run_config, train

    run = work / f"k{k}"
    shutil.rmtree(run, ignore_errors=True)
    train(load_run_config(CONFIG, overrides(k, bank, vq, steps)), run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in records if r.get("kind") == "train" and "steps_per_s" in r][1:]
    return statistics.median(rates)


def data_rate(k: int, bank: str, vq: str, batches: int, work: Path) -> float:
    """ms per batch of the data pipeline alone (after one warm-up batch)."""
    from mixmodal.train.fusion import build_task, prepare
    from mixmodal.train.run import load_run_config

    config = prepare(load_run_config(CONFIG, overrides(k, bank, vq, 10)), work / f"data-k{k}")
    task = build_task(config)
    import torch

    task.setup(torch.device("cpu"))
    task.rank, task.world = 0, 1
    it = task.data_iterator()
    if it.augmenter is not None:
        PRECOMPUTE.append(it.augmenter.precompute_seconds)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", required=True, help="a memory bank (mixmodal index build)")
    p.add_argument("--vq", required=True, help="a 32 px VQ tokenizer")
    p.add_argument("--steps", type=int, default=120, help="steps per training run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=40, help="batches for the data-only timing")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ra-bench-"))
    rates = {0: [], 2: []}
    data = {0: [], 2: []}
    try:
        for r in range(args.rounds):
            for k in (0, 2) if r % 2 == 0 else (2, 0):
                rates[k].append(train_rate(k, args.bank, args.vq, args.steps, work))
                data[k].append(data_rate(k, args.bank, args.vq, args.batches, work))
                print(f"round {r} k={k}: {rates[k][-1]:.2f} steps/s, data {data[k][-1]:.1f} ms/batch", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    dmed = {k: statistics.median(v) for k, v in data.items()}
    result = {"precompute_s": PRECOMPUTE, "steps_per_s": med, "ratio_k2_over_k0": med[2] / med[0], "data_ms_per_batch": dmed,
              "rounds": rates, "data_rounds": data, "steps": args.steps,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    print(f"training steps/s: k=0 {med[0]:.2f}, k=2 {med[2]:.2f} -> ratio {med[2] / med[0]:.3f} "
          f"(ranges {min(rates[0]):.2f}-{max(rates[0]):.2f} / {min(rates[2]):.2f}-{max(rates[2]):.2f}); "
          f"data alone {dmed[0]:.1f} vs {dmed[2]:.1f} ms/batch; bank encoded once in "
          f"{statistics.median(PRECOMPUTE) if PRECOMPUTE else 0:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
