"""`make bench-gpu`: on one CUDA GPU, in under 10 minutes, the GPU tests and the GPU benchmarks, into one
results file, so that whenever a GPU is available the numbers are one command away.

    python benchmarks/gpu.py            # everything -> benchmarks/results/gpu.json (+ each stage's log in gpu-logs/)
    python benchmarks/gpu.py --check    # only: is a CUDA GPU visible? (one line and exit 1 when not)

Stages, each under its own time limit (together < 10 minutes; one that fails or runs out is recorded
as such and the others still run; the exit status is 1 if any failed):
  tests         pytest -m gpu (tests/test_gpu.py): bf16 training, FlexAttention against the reference
                attention on packed rows, torch.compile against eager, FSDP2 on one device (bf16
                parameters, fp32 reductions) with a bitwise resume from its sharded checkpoint
  train-base    benchmarks/train_step.py --device cuda, bf16, at the base presets' transformer
                (configs/models/base-{tokens,latents}.yaml: 1024 wide, 16 layers, 16 heads, ~200M):
                tokens/s and MFU of our token model (causal and packed rows), of transformers'
                Chameleon on the same weights, and of the latent model; the ratio to transformers
  train-350m    the same at ~390M parameters (1280 wide, 20 layers): the size the MFU target
                (>= 45% on an H100-class GPU for a >= 300M model) is stated for
  generate      benchmarks/generate.py --device cuda --dtype bf16: text and CFG image decoding against
                transformers' generate, latent images against transfusion-pytorch (if installed)
MFU is reported twice: against the bf16 matmul peak train_step.py measures in the same run, and against
the GPU's datasheet dense bf16 peak when the GPU is one of PEAKS (the usual way MFU targets are stated).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets, matched against torch.cuda.get_device_name()
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
         "B200": 2250.0, "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0,
         "RTX 4090": 165.0, "RTX 6000 Ada": 364.0}
BASE = ["--dim", "1024", "--layers", "16", "--heads", "16", "--ffn", "2752", "--vocab", "2048", "--image-codes", "1024",
        "--batch", "16", "--seq", "1024", "--rounds", "8"]
M350 = ["--dim", "1280", "--layers", "20", "--heads", "20", "--ffn", "3456", "--vocab", "2048", "--image-codes", "1024",
        "--batch", "16", "--seq", "1024", "--rounds", "8"]


def no_gpu_reason() -> str | None:
    """One line saying why there is no usable CUDA GPU here, or None when there is one."""
    try:
        import torch
    except ImportError as e:
        return f"bench-gpu: torch is not importable ({e}); run `make install` first"
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        return (f"bench-gpu: no CUDA GPU is visible (torch {torch.__version__}, {build}); run it on a machine with an "
                "NVIDIA GPU and a CUDA build of torch")
    return None


def run_stage(name: str, command: list[str], limit: int, logs: Path) -> dict:
    started = time.perf_counter()
    log = logs / f"{name}.log"
    print(f"[bench-gpu] {name}: {' '.join(command)} (limit {limit}s)", flush=True)
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        output, status = done.stdout + done.stderr, "ok" if done.returncode == 0 else f"failed ({done.returncode})"
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = f"timed out after {limit}s"
    log.write_text(output)
    seconds = round(time.perf_counter() - started, 1)
    print(f"[bench-gpu] {name}: {status} in {seconds}s; log {log.relative_to(ROOT)}", flush=True)
    return {"command": " ".join(command), "status": status, "seconds": seconds, "log": str(log.relative_to(ROOT))}


def datasheet_peak(gpu: str) -> float | None:
    for key in sorted(PEAKS, key=len, reverse=True):  # the most specific name first
        if key in gpu:
            return PEAKS[key]
    return None


def train_summary(path: Path, peak: float | None) -> dict | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    run = data["runs"].get("bf16") or next(iter(data["runs"].values()))
    out = {"params_tokens_model": data["params_ours"], "batch": data["batch"], "seq": data["seq"],
           "measured_peak_tflops": run["peak_matmul_tflops"],
           "ratio_tokens_vs_transformers": run["ratio_tokens_vs_transformers"], "systems": {}}
    for name, figures in run.items():
        if isinstance(figures, dict):
            flops = figures["mfu"] * run["peak_matmul_tflops"] * 1e12  # achieved FLOP/s
            out["systems"][name] = {"tokens_per_s": figures["tokens_per_s"], "mfu_measured_peak": figures["mfu"],
                                    "mfu_datasheet_peak": flops / (peak * 1e12) if peak else None}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that a CUDA GPU is visible")
    p.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = p.parse_args()
    reason = no_gpu_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    if args.check:
        return 0
    import torch

    gpu = torch.cuda.get_device_name()
    peak = datasheet_peak(gpu)
    logs = RESULTS / "gpu-logs"
    logs.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    train_help = subprocess.run([python, "benchmarks/train_step.py", "--help"], cwd=ROOT, capture_output=True,
                                text=True).stdout
    extra = ["--compile"] if re.search(r"--compile\b", train_help) else []  # if the benchmark has it
    stages = {
        "tests": ([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py",
                   "-rs", f"--junitxml={logs / 'tests.xml'}"], 210),
        "train-base": ([python, "benchmarks/train_step.py", "--device", "cuda", "--precision", "bf16", *BASE, *extra,
                        "--json", str(logs / "train_base.json")], 100),
        "train-350m": ([python, "benchmarks/train_step.py", "--device", "cuda", "--precision", "bf16", *M350, *extra,
                        "--json", str(logs / "train_350m.json")], 110),
        "generate": ([python, "benchmarks/generate.py", "--device", "cuda", "--dtype", "bf16",
                      "--out", str(logs / "generate.json")], 130),
    }
    started = time.perf_counter()
    results: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                                 "gpu": gpu, "gpu_datasheet_bf16_tflops": peak, "torch": torch.__version__,
                                 "cuda": torch.version.cuda},
                     "stages": {name: run_stage(name, command, limit, logs) for name, (command, limit) in stages.items()}}
    junit = logs / "tests.xml"
    if junit.is_file():
        suite = re.search(r'<testsuite [^>]*', junit.read_text())
        if suite:
            counts = dict(re.findall(r'(tests|failures|errors|skipped)="(\d+)"', suite.group(0)))
            results["tests"] = {k: int(v) for k, v in counts.items()}
    results["train_base"] = train_summary(logs / "train_base.json", peak)
    results["train_350m"] = train_summary(logs / "train_350m.json", peak)
    generate = logs / "generate.json"
    results["generate"] = json.loads(generate.read_text()) if generate.is_file() else None
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    failed = [name for name, stage in results["stages"].items() if stage["status"] != "ok"]
    for key in ("train_base", "train_350m"):
        if results[key]:
            ours = results[key]["systems"].get("mixmodal tokens", {})
            shown = ours.get("mfu_datasheet_peak") or ours.get("mfu_measured_peak") or 0
            print(f"[bench-gpu] {key}: {results[key]['params_tokens_model'] / 1e6:.0f}M params, "
                  f"{ours.get('tokens_per_s', 0):.0f} tokens/s, MFU {100 * shown:.1f}%, "
                  f"{results[key]['ratio_tokens_vs_transformers']:.2f}x transformers")
    print(f"[bench-gpu] wrote {out} in {results['seconds']:.0f}s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
