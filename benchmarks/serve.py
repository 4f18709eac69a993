"""Load test of `mixmodal serve` on loopback: concurrent streaming clients vs the same requests one
by one (the batching gain), with latencies, throughput and the server's memory over rounds.

The server runs as its own process (`mixmodal serve MODEL --port P`), so its RSS is read from
/proc/PID/status alone. Each round sends --clients streaming chat requests at once, a fixed mix:
text (mode text, --text-tokens new tokens, eos ignored), image (mode image, CFG 3) and interleaved
(mode interleaved, at most one image). Per request: time to first event (first SSE chunk after the
role chunk: a text delta or image_started), per-image latency (image_started -> image_done), total.
Then the same requests one at a time (the sequential wall time). Reported: errors, p50 / p99 of
those latencies, positions/s and images/s over each round's wall time, RSS before / after each
round, and the batching gain = sequential wall / concurrent wall.

    python benchmarks/serve.py                               # a small random model (built here), 32 clients, 3 rounds
    python benchmarks/serve.py --model runs/recipe-tokens    # a trained run
    python benchmarks/serve.py --quick                       # 8 clients, 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def build_model(out: Path, mode: str) -> Path:
    """A random small model folder (width 256, 4 layers, 32 px images as 8 x 8 positions)."""
    import torch

    from mixmodal.data.shapes import ShapesConfig
    from mixmodal.data.sources import ShapesSource
    from mixmodal.inference.checkpoint import write_generation_settings
    from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
    from mixmodal.model.io import save_model_dir
    from mixmodal.model.transformer import TransformerConfig
    from mixmodal.objectives.diffusion import DiffusionConfig
    from mixmodal.tokenizers.image import save_image_tokenizer
    from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
    from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
    from mixmodal.tokenizers.vq import VQConfig, VQTokenizer

    torch.manual_seed(0)
    texts = (t for doc in ShapesSource(ShapesConfig(resolution=32), num=500) for t in doc.texts)
    text = TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=512))
    trunk = dict(resolution=32, base_channels=16, channel_multipliers=[1, 2, 2], num_res_blocks=1, norm_groups=4)
    if mode == "tokens":
        tok = VQTokenizer(VQConfig(**trunk, latent_channels=16, codebook_size=256, codebook_dim=8))
        image = ImageConfig(mode="tokens", num_codes=256, grid_size=8)
    else:
        tok = VAETokenizer(VAEConfig(**trunk, latent_channels=4))
        image = ImageConfig(mode="latents", latent_channels=4, grid_size=8, patch_size=1)
    model = FusionModel(ModelConfig(text_vocab_size=text.vocab_size, image=image,
                                    transformer=TransformerConfig(dim=256, num_layers=4, num_heads=8, num_kv_heads=4)))
    save_model_dir(model, out)
    text.save(out / "text_tokenizer")
    save_image_tokenizer(tok, out / "image_tokenizer")
    write_generation_settings(out, max_length=512, diffusion=DiffusionConfig(kind="flow") if mode == "latents" else None)
    return out


def requests_mix(n: int, text_tokens: int, steps: int) -> list[dict]:
    kinds = [
        {"mode": "text", "max_tokens": text_tokens, "ignore_eos": True},
        {"mode": "image", "cfg": 3.0, "steps": steps},
        {"mode": "interleaved", "max_tokens": text_tokens + 80, "cfg": 3.0, "steps": steps},
    ]
    out = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": f"a photo of {i % 4 + 1} red stars"}], "seed": i,
                "stream": True, **kinds[i % len(kinds)]}
        out.append(body)
    return out


async def one(client: httpx.AsyncClient, body: dict) -> dict:
    started = time.perf_counter()
    first = None
    image_started, image_latency, positions, error = None, [], 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            event = chunk.get("mixmodal", {}).get("event")
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            now = time.perf_counter()
            if first is None and (event == "image_started" or (isinstance(delta.get("content"), str) and delta["content"])):
                first = now - started
            if event == "image_started":
                image_started = now
            elif event == "image_done" and image_started is not None:
                image_latency.append(now - image_started)
            if "usage" in chunk and chunk["usage"]:
                positions = chunk["usage"]["completion_tokens"]
    return {"first": first, "total": time.perf_counter() - started, "images": image_latency, "positions": positions,
            "error": error}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


async def round_trip(url: str, bodies: list[dict], concurrent: bool) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(bodies) + 4)) as client:
        started = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, b) for b in bodies))
        else:
            results = [await one(client, b) for b in bodies]
        return list(results), time.perf_counter() - started


def summary(results: list[dict], wall: float) -> dict:
    errors = [r["error"] for r in results if r.get("error")]
    images = [x for r in results for x in r.get("images", [])]
    return {"requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(wall, 2), "first_event_p50_s": pct([r.get("first") for r in results], 0.5),
            "first_event_p99_s": pct([r.get("first") for r in results], 0.99),
            "image_p50_s": pct(images, 0.5), "image_p99_s": pct(images, 0.99),
            "total_p50_s": pct([r.get("total") for r in results], 0.5),
            "positions_per_s": round(sum(r.get("positions", 0) for r in results) / wall, 1),
            "images_per_s": round(len(images) / wall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a run or model folder (default: a random small one)")
    parser.add_argument("--mode", choices=["tokens", "latents"], default="tokens", help="for the random model")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (latent mode)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serve.json"))
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds = 8, 1
    tmp = tempfile.TemporaryDirectory()
    model = args.model or str(build_model(Path(tmp.name) / f"random-{args.mode}", args.mode))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mixmodal", "serve", model, "--port", str(port), "--max-batch",
                               str(args.max_batch), "--max-queue", str(4 * args.clients), "--dtype", args.dtype],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit(f"the server did not start: {server.stdout.read() if server.poll() is not None else ''}")
        bodies = requests_mix(args.clients, args.text_tokens, args.steps)
        asyncio.run(round_trip(url, bodies[:3], concurrent=True))  # warm-up
        rounds = []
        for r in range(args.rounds):
            before = rss_mib(server.pid)
            results, wall = asyncio.run(round_trip(url, bodies, concurrent=True))
            rounds.append({"round": r, **summary(results, wall), "rss_before_mib": round(before, 1),
                           "rss_after_mib": round(rss_mib(server.pid), 1)})
            print(json.dumps(rounds[-1]), flush=True)
        results, sequential_wall = asyncio.run(round_trip(url, bodies, concurrent=False))
        sequential = summary(results, sequential_wall)
        print(json.dumps({"sequential": sequential}), flush=True)
        walls = [r["wall_s"] for r in rounds]
        report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "command": " ".join(sys.argv), "model": args.model or f"random {args.mode}",
                  "clients": args.clients, "max_batch": args.max_batch, "rounds": rounds, "sequential": sequential,
                  "batching_gain": round(sequential_wall / statistics.median(walls), 2),
                  "errors": sum(r["errors"] for r in rounds) + sequential["errors"],
                  "rss_growth_mib": round(rounds[-1]["rss_after_mib"] - rounds[0]["rss_after_mib"], 1)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"batching gain {report['batching_gain']}x, errors {report['errors']}, RSS growth over rounds "
              f"{report['rss_growth_mib']} MiB -> {args.out}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        tmp.cleanup()


if __name__ == "__main__":
    main()
