"""Training-step throughput: mixmodal's FusionModel vs transformers' Chameleon, same weights.

One run, side by side: both models get the same configuration and the same weights (ours
copied into transformers' layout), the same batch of B x T token ids, and one full
training step each (forward, next-token loss, backward, AdamW). The two are interleaved
round by round so machine drift hits both alike; the median step time gives tokens/s.
Model FLOPs utilisation = (training FLOPs per token x tokens/s) / peak, where the peak is a
2048 x 2048 matmul measured in the same run, in the same precision.

Also: our token model on packed rows (several documents per row, per-document attention:
SDPA with a boolean mask instead of the causal kernel; transformers has no such layout),
and the same step for our latent-mode model (Transfusion) at the same transformer size,
with images as 8 x 16 x 16 latents at patch 2 (64 positions each, the shapes-64 layout).
And our token model with each block through torch.compile, what `parallel.compile=true` gives the
trainer (train/parallelize.py); its compile time is paid before the timed rounds.

    python benchmarks/train_step.py                      # 2-core CPU: fp32 and bf16 autocast
    python benchmarks/train_step.py --device cuda        # one GPU: bf16
    python benchmarks/train_step.py --json out.json      # also write the figures
    python benchmarks/train_step.py --no-compile         # without the compiled rows (saves ~1 minute)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.transformer import TransformerConfig
from mixmodal.train.parallelize import apply_compile


# the compiled rows and the key of their ratio to transformers in the JSON
COMPILED_RATIOS = {"mixmodal tokens, compiled": "ratio_tokens_compiled_vs_transformers",
                   "mixmodal tokens, packed, compiled": "ratio_tokens_packed_compiled_vs_transformers"}


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul in `dtype` (the best of `reps`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours(args, mode: str = "tokens") -> FusionModel:
    image = ImageConfig(mode="tokens", num_codes=args.image_codes, grid_size=16) if mode == "tokens" else \
        ImageConfig(mode="latents", latent_channels=8, grid_size=16, patch_size=2)
    text_vocab = args.vocab - (args.image_codes if mode == "tokens" else 0)
    t = TransformerConfig(dim=args.dim, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads,
                          ffn_dim=args.ffn, qk_norm=True)
    return FusionModel(ModelConfig(text_vocab_size=text_vocab, transformer=t, image=image))


def chameleon_like(model: FusionModel, args):
    """transformers' ChameleonForConditionalGeneration with `model`'s weights."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = model.vocab
    names = {f"<t{i}>": i for i in range(vocab.text_size)}
    digits = "ABCDEFGHIJ"
    for code in range(vocab.num_image_codes):  # Chameleon names image tokens IMGIMG<code in letters>Z
        names["IMGIMG" + "".join(digits[int(c)] for c in str(code)) + "Z"] = vocab.image_code_to_id(code)
    names["<image>"] = vocab.boi
    for i in range(vocab.text_size + vocab.num_image_codes, vocab.size):
        names[f"<pad{i}>"] = i
    config = ChameleonConfig(vocab_size=vocab.size, hidden_size=args.dim, intermediate_size=args.ffn,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.heads, vocabulary_map=names, image_token_id=vocab.boi,
                             vq_config={"embed_dim": 8, "num_embeddings": 16, "base_channels": 32,
                                        "channel_multiplier": [1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                                        "resolution": 16, "latent_channels": 8},
                             attn_implementation="sdpa")
    hf = ChameleonForConditionalGeneration(config)
    ours_state = model.state_dict()
    state = {}
    for k, v in ours_state.items():
        if k.startswith("transformer.layers."):
            state["model." + k[len("transformer."):]] = v
        elif k == "transformer.norm.weight":
            state["model.norm.weight"] = v
        elif k == "embed_tokens.weight":
            state["model.embed_tokens.weight"] = v
        elif k == "lm_head.weight":
            state["lm_head.weight"] = v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m.startswith("model.vqmodel.") for m in missing), [m for m in missing if not m.startswith("model.vqmodel")]
    return hf


def step_fn(model, batch, autocast, kind: str, documents: torch.Tensor | None = None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ids, labels = batch

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            if kind == "hf":
                logits = model(input_ids=ids).logits
            elif documents is not None:
                logits = model(ids, document_ids=documents).logits
            else:
                logits = model(ids).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        return loss

    return step


def latent_step_fn(model, args, autocast, device):
    """A Transfusion step: text CE + diffusion MSE, one 64-position image per 128 positions."""
    from mixmodal.objectives.diffusion import DiffusionConfig, build_schedule, diffusion_loss

    b, t = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, model.vocab.text_size, (b, t), generator=g).to(device)
    per_row = t // 128
    starts = torch.arange(per_row) * 128 + 32
    index = (torch.arange(b)[:, None, None] * t + starts[None, :, None] + torch.arange(64)[None, None]).reshape(-1, 64)
    image_ids = torch.full((b, t), -1)
    image_ids.view(-1)[index.flatten()] = torch.arange(index.shape[0]).repeat_interleave(64)
    image_ids, index = image_ids.to(device), index.to(device)
    latents = torch.randn(index.shape[0], 8, 16, 16, generator=g).to(device)
    schedule = build_schedule(DiffusionConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    labels = torch.roll(ids, -1, 1)

    def step():
        opt.zero_grad(set_to_none=True)
        tt = schedule.sample_times(index.shape[0], generator=g, device=torch.device("cpu")).to(device)
        noise = torch.randn(latents.shape, generator=g).to(device)
        with autocast():
            out = model(ids, image_ids=image_ids, image_latents=schedule.add_noise(latents, noise, tt),
                        image_times=tt, image_index=index)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten()) + diffusion_loss(
                out.image_prediction, schedule.target(latents, noise, tt), weight=5.0)
        loss.backward()
        opt.step()
        return loss

    return step


def time_steps(steps: dict, rounds: int, device: str) -> dict[str, float]:
    for fn in steps.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=1536, help="rows of the embedding table (text + image codes)")
    p.add_argument("--image-codes", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--precision", nargs="+", default=None, help="fp32 and/or bf16 (default: both on CPU, bf16 on CUDA)")
    p.add_argument("--json", default=None)
    p.add_argument("--no-compile", action="store_true",
                   help="skip the 'mixmodal tokens, compiled' row (parallel.compile=true: each block through torch.compile)")
    args = p.parse_args()
    torch.manual_seed(0)
    device = args.device
    precisions = args.precision or (["bf16"] if device == "cuda" else ["fp32", "bf16"])
    model = ours(args).to(device).train()
    hf = chameleon_like(model, args).to(device).train()
    latent = ours(args, "latents").to(device).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, model.vocab.size - 64, (args.batch, args.seq), generator=g).to(device)
    batch = (ids, torch.roll(ids, -1, 1))
    # a packed row: documents of 100..300 tokens, per-document attention (the training layout)
    packed = torch.zeros(args.batch, args.seq, dtype=torch.long)
    for r in range(args.batch):
        start, d = 0, 0
        while start < args.seq:
            n = int(torch.randint(100, 300, (1,), generator=g))
            packed[r, start:start + n] = d
            start, d = start + n, d + 1
    packed = packed.to(device)
    tokens = args.batch * args.seq
    flops_token = model.flops_per_token(args.seq)
    flops_latent = latent.flops_per_token(args.seq)
    results = {"machine": platform.processor() or platform.machine(), "device": device,
               "torch": torch.__version__, "params_ours": model.num_parameters(),
               "params_latent": latent.num_parameters(), "batch": args.batch, "seq": args.seq, "runs": {}}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    print(f"tokens model {model.num_parameters() / 1e6:.2f}M params, latents model {latent.num_parameters() / 1e6:.2f}M; "
          f"batch {args.batch} x {args.seq}; {torch.get_num_threads()} threads on {device}")
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
        peak = matmul_peak(device, dtype)
        steps = {"mixmodal tokens": step_fn(model, batch, autocast, "ours"),
                 "mixmodal tokens, packed": step_fn(model, batch, autocast, "ours", packed),
                 "transformers Chameleon": step_fn(hf, batch, autocast, "hf"),
                 "mixmodal latents": latent_step_fn(latent, args, autocast, device)}
        if not args.no_compile:  # what `parallel.compile=true` does to the trainer's model (train/parallelize.py)
            compiled = copy.deepcopy(model)
            apply_compile(list(compiled.transformer.layers))
            steps["mixmodal tokens, compiled"] = step_fn(compiled, batch, autocast, "ours")
            steps["mixmodal tokens, packed, compiled"] = step_fn(compiled, batch, autocast, "ours", packed)
            start = time.perf_counter()
            steps["mixmodal tokens, compiled"]()
            steps["mixmodal tokens, packed, compiled"]()
            print(f"  ({precision}: compiling the blocks took {time.perf_counter() - start:.0f} s, not timed)")
        times = time_steps(steps, args.rounds, device)
        run = {"peak_matmul_tflops": peak / 1e12}
        for name, seconds in times.items():
            per_token = flops_latent if "latents" in name else flops_token
            tps = tokens / seconds
            run[name] = {"step_s": seconds, "tokens_per_s": tps, "mfu": tps * per_token / peak}
        run["ratio_tokens_vs_transformers"] = run["mixmodal tokens"]["tokens_per_s"] / run["transformers Chameleon"]["tokens_per_s"]
        for name, key in COMPILED_RATIOS.items():
            if name in run:
                run[key] = run[name]["tokens_per_s"] / run["transformers Chameleon"]["tokens_per_s"]
        results["runs"][precision] = run
        print(f"\n{precision}: {dtype} matmul peak {peak / 1e12:.2f} TFLOP/s")
        print(f"  {'':26s} {'step s':>8s} {'tokens/s':>10s} {'MFU':>7s}")
        for name in steps:
            r = run[name]
            print(f"  {name:26s} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {100 * r['mfu']:6.1f}%")
        print(f"  mixmodal / transformers tokens/s: {run['ratio_tokens_vs_transformers']:.2f}x")
        if "mixmodal tokens, compiled" in run:
            print(f"  compiled mixmodal / transformers tokens/s: {run['ratio_tokens_compiled_vs_transformers']:.2f}x "
                  f"(packed: {run['ratio_tokens_packed_compiled_vs_transformers']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
