"""Generation speed: mixmodal's Engine vs transformers' `generate` (token mode) and vs
lucidrains' transfusion-pytorch (latent mode), side by side in one process.

A. Token mode (Chameleon). A random `transformers.ChameleonForConditionalGeneration` (width 256,
   6 layers, 8 heads, SwiGLU 704, QK-norm; 1,536 ids of which 512 are image tokens "IMGIMG..",
   placed at ids 4..515 as in Chameleon's own vocabulary) is saved and converted with
   `mixmodal.interop.hf_chameleon.convert_hf_chameleon` (same weights; the logits are checked
   against transformers' on a random input before anything is timed). Our Engine runs the
   converted model; transformers runs its own `generate`.
     text   a 16-position prompt, exactly 256 new tokens, batch 1, plain sampling (temperature 1,
            no top-k / top-p). transformers: do_sample, min_new_tokens = max_new_tokens = 256,
            use_cache. Ours: mode=text, ignore_eos, max_new_tokens=256.
     image  one image of N = grid^2 codes with classifier-free guidance 3.0 (two streams).
            Ours: mode=image (the engine forces <boi>, then N codes, each one forward of the
            cond and uncond rows batched together; uncond = <bos> only). transformers: the
            same prompt + <boi>, N new tokens with guidance_scale=3.0, which for a decoder-only
            model adds `UnbatchedClassifierFreeGuidanceLogitsProcessor`: a second, separate
            forward per token over its own cache, fed negative_prompt_ids = <bos> <boi> first.
            transformers' Chameleon sets the logits of every image token to -inf-ish, so its
            N tokens are text tokens, not codes; the network work per token is the same.
   Tokens/s = new tokens (256, or N codes) / wall time of one whole `generate` call (prefill,
   set-up and sampling included).
B. Latent mode (Transfusion). Our FusionModel (width 256, 4 layers, 4 heads, SwiGLU 704,
   linear patches, 4 x 8 x 8 latents at patch 2 = 16 patches, text vocabulary = a 512-id BPE)
   with a flow schedule, vs transfusion-pytorch 0.20.0 at the same width / depth / heads /
   text vocabulary / latent shape (benchmarks/peers/transfusion_pytorch.py, GEGLU 704).
   One image after a 16-position prompt, Euler, no guidance, 20 and 50 steps; latency of
   one call. The peer runs `sample_many` (KV-cached prefix) and `sample_one` (uncached).

Every measurement: one warm-up call per system, then --rounds rounds, systems interleaved in
each round so machine drift hits all alike; the median (and the best) are reported, and the
ratio's range over the rounds (each round's systems ran back to back).

    python benchmarks/generate.py                         # CPU, fp32 and bf16 autocast
    python benchmarks/generate.py --device cuda           # one GPU
    python benchmarks/generate.py --quick                 # a smoke run (tiny sizes, 1 round; writes *_quick.json)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/generate.py` from the repository root
    sys.path.insert(0, str(ROOT))

from mixmodal.inference.config import GenerationConfig, GuidanceConfig  # noqa: E402
from mixmodal.inference.engine import Engine  # noqa: E402
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig  # noqa: E402

PROMPT = ("a small red fox jumps over the lazy brown dog near the old river bank while three green birds "
          "sing in the tall oak tree and the sun sets slowly behind the distant blue hills")
CFG_SCALE = 3.0


# --- machine ------------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
            "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv)}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        import importlib.metadata
        info["transfusion_pytorch"] = importlib.metadata.version("transfusion-pytorch")
    except Exception:  # not installed: part B is skipped
        info["transfusion_pytorch"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["loadavg_before"] = loadavg()
    return info


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: another busy process on a 2-core machine ruins every figure here."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return nullcontext()


def time_calls(calls: dict, rounds: int, device: str) -> dict[str, dict]:
    """Warm up each call once, then `rounds` rounds, the calls interleaved in each round."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(v), "best_s": min(v), "all_s": v} for name, v in times.items()}


# --- tokenizer ----------------------------------------------------------------------------

def small_bpe(vocab_size: int) -> TextTokenizer:
    """A byte-level BPE of exactly `vocab_size` ids (mixmodal's specials first), trained on a few
    hundred made-up sentences: the engine only needs its ids and special tokens."""
    import random

    rng = random.Random(0)
    words = ("a the small red fox jumps over lazy brown dog near old river bank while three green birds sing in "
             "tall oak tree and sun sets slowly behind distant blue hills cat sleeps on warm mat under window "
             "children play with yellow ball garden morning evening rain falls softly roof city lights shine "
             "night train leaves station early quiet village road winds through fields of golden wheat").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) + f" {rng.randint(0, 9999)}"
             for _ in range(600)]
    tok = TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=vocab_size, min_frequency=1))
    if tok.vocab_size != vocab_size:
        raise RuntimeError(f"the BPE reached {tok.vocab_size} ids, not {vocab_size}: give it more text")
    return tok


def prompt_of_length(tok: TextTokenizer, positions: int) -> tuple[str, list[int]]:
    """The longest prefix of PROMPT (in words) whose <bos> + ids fit in `positions`; returns it and its ids."""
    words = PROMPT.split()
    best = words[0]
    for n in range(1, len(words) + 1):
        text = " ".join(words[:n])
        if 1 + len(tok.encode(text)) > positions:
            break
        best = text
    return best, tok.encode(best)


# --- A: token mode vs transformers ---------------------------------------------------------

def build_chameleon(args, workdir: Path, grids: list[int]):
    """A random transformers Chameleon and our conversion of it, once per image grid (the grid
    only sets codes per image: vq_config.resolution with one VQGAN level)."""
    import transformers

    from mixmodal.interop.hf_chameleon import VocabMap, convert_hf_chameleon, image_token_name
    from mixmodal.model.io import load_model_dir

    transformers.logging.set_verbosity_error()  # the random vqmodel's load report is noise here
    vocab, codes = args.vocab, args.image_codes
    first = 4  # as Chameleon: a few special ids, then the image tokens, then the text tokens
    names = {f"<t{i}>": i for i in range(vocab) if not first <= i < first + codes}
    names.update({image_token_name(c): first + c for c in range(codes)})
    names["<image>"] = names.pop(f"<t{first + codes}>")  # Chameleon's image placeholder (unused here)

    def vq(grid):
        return {"embed_dim": 8, "num_embeddings": codes, "base_channels": 32, "channel_multiplier": [1],
                "num_res_blocks": 1, "attn_resolutions": [], "resolution": grid, "latent_channels": 8}

    config = transformers.ChameleonConfig(
        vocab_size=vocab, hidden_size=args.dim, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocabulary_map=names,
        vq_config=vq(grids[0]), bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.ChameleonForConditionalGeneration(config)
    with torch.no_grad():  # norms off 1 / biases off 0, so the logit check exercises every tensor
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.eval()
    ours = {}
    for grid in grids:
        src = workdir / f"hf_{grid}"
        hf.config.vq_config.resolution = grid
        hf.save_pretrained(src)
        convert_hf_chameleon(src, workdir / f"ours_{grid}")
        model = load_model_dir(workdir / f"ours_{grid}").eval()
        assert model.config.image.positions_per_image == grid * grid, model.config.image
        ours[grid] = model
    hf.config.vq_config.resolution = grids[0]
    index = VocabMap.read(workdir / f"ours_{grids[0]}" / "vocab_map.json").index()  # hf id -> our id
    return hf, ours, index


@torch.no_grad()
def check_logits(hf, ours, index: torch.Tensor, device: str) -> float:
    """max |our logits - transformers' logits| on a random 2 x 64 input, every column (through the permutation)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, index.numel(), (2, 64), generator=g).to(device)
    expected = hf.lm_head(hf.model(input_ids=x).last_hidden_state)  # before transformers masks image columns
    got = ours(index.to(device)[x]).logits[..., index.to(device)]
    return (got - expected).abs().max().item()


def hf_generate_fn(hf, input_ids: torch.Tensor, new_tokens: int, device: str, precision: str,
                   negative: torch.Tensor | None = None):
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=new_tokens,
                  max_new_tokens=new_tokens, use_cache=True, pad_token_id=0, eos_token_id=2,
                  attention_mask=torch.ones_like(input_ids))
    if negative is not None:
        kwargs.update(guidance_scale=CFG_SCALE, negative_prompt_ids=negative,
                      negative_prompt_attention_mask=torch.ones_like(negative))

    def run():
        torch.manual_seed(0)
        with torch.no_grad(), _autocast(device, precision):
            out = hf.generate(input_ids, **kwargs)
        assert out.shape[1] == input_ids.shape[1] + new_tokens, out.shape
        return out

    return run


def ours_generate_fn(engine: Engine, prompt: str, config: GenerationConfig, check):
    def run():
        (result,) = engine.generate(prompt, config, seed=0)
        check(result)
        return result

    return run


def token_mode(args, device: str, precisions: list[str], results: dict) -> list[list[str]]:
    grids = args.grids
    tok = small_bpe(args.text_bpe)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours, index = build_chameleon(args, Path(tmp), grids)
    hf = hf.to(device)
    ours = {g: m.to(device) for g, m in ours.items()}
    diff = check_logits(hf, ours[grids[0]], index, device)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel())  # our id -> hf id
    base = ours[grids[0]]
    v = base.vocab
    params_hf = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("model.vqmodel."))
    prompt, ids = prompt_of_length(tok, args.prompt)
    ours_ids = [v.bos] + ids
    hf_prompt = inverse[torch.tensor(ours_ids)][None].to(device)
    hf_image_prompt = inverse[torch.tensor(ours_ids + [v.boi])][None].to(device)
    hf_negative = inverse[torch.tensor([v.bos, v.boi])][None].to(device)
    print(f"\nA. token mode: transformers Chameleon {params_hf / 1e6:.2f}M params (language model; the random "
          f"VQGAN encoder is not used), ours {base.num_parameters() / 1e6:.2f}M (vocabulary padded to {v.size} rows); "
          f"max |logit diff| {diff:.2e}; prompt {len(ours_ids)} positions")
    if diff > 1e-3:
        raise RuntimeError(f"the converted model's logits differ from transformers' by {diff:.2e}")
    part = {"params_transformers_lm": params_hf, "params_mixmodal": base.num_parameters(), "max_abs_logit_diff": diff,
            "prompt_positions": len(ours_ids), "vocab": args.vocab, "image_codes": args.image_codes,
            "text_tokenizer_ids": tok.vocab_size, "cfg_scale": CFG_SCALE, "runs": {}}
    rows = []
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else None
        engines = {g: Engine(m, tok, None, dtype=dtype, decode_images=False) for g, m in ours.items()}
        # --compile: the same engine with compiled blocks (inference/compiled.py), a third system in every round;
        # its warm-up call compiles
        compiled = ({g: Engine(m, tok, None, dtype=dtype, decode_images=False, compile=True) for g, m in ours.items()}
                    if args.compile else {})
        run = {}
        n = args.text_tokens
        text_config = GenerationConfig(mode="text", ignore_eos=True, max_new_tokens=n)

        def check_text(r, n=n):
            assert len(r.ids) == n and r.finish_reason == "length", (len(r.ids), r.finish_reason)

        calls = {"mixmodal": ours_generate_fn(engines[grids[0]], prompt, text_config, check_text),
                 "transformers": hf_generate_fn(hf, hf_prompt, n, device, precision)}
        if compiled:
            calls["mixmodal-compiled"] = ours_generate_fn(compiled[grids[0]], prompt, text_config, check_text)
        timed = time_calls(calls, args.rounds, device)
        run[f"text_{n}"] = _rates(timed, n)
        rows.append(_row(precision, f"text, {n} tokens, batch 1", run[f"text_{n}"], "tokens/s"))
        if compiled:
            rows.append(_row(precision, f"text, {n} tokens, batch 1, compiled", run[f"text_{n}"], "tokens/s",
                             "mixmodal-compiled"))
        for grid in grids:
            codes = grid * grid
            image_config = GenerationConfig(mode="image", max_new_tokens=codes + 3, guidance=GuidanceConfig(scale=CFG_SCALE))

            def check_image(r, grid=grid):
                assert len(r.images) == 1 and tuple(r.images[0].shape) == (grid, grid), [x.shape for x in r.images]

            calls = {"mixmodal": ours_generate_fn(engines[grid], prompt, image_config, check_image),
                     "transformers": hf_generate_fn(hf, hf_image_prompt, codes, device, precision, hf_negative)}
            if compiled:
                calls["mixmodal-compiled"] = ours_generate_fn(compiled[grid], prompt, image_config, check_image)
            timed = time_calls(calls, args.rounds, device)
            key = f"image_{grid}x{grid}_cfg"
            run[key] = _rates(timed, codes)
            rows.append(_row(precision, f"image {grid}x{grid} = {codes} codes, CFG {CFG_SCALE:g}", run[key], "tokens/s"))
            if compiled:
                rows.append(_row(precision, f"image {grid}x{grid}, compiled", run[key], "tokens/s", "mixmodal-compiled"))
        part["runs"][precision] = run
        _print_rows(rows[-(1 + len(grids)) * (2 if compiled else 1):], "tokens/s")
    results["token_mode"] = part
    return rows


def _rates(timed: dict, tokens: int) -> dict:
    out = {name: {**t, "tokens_per_s": tokens / t["median_s"], "best_tokens_per_s": tokens / t["best_s"]}
           for name, t in timed.items()}
    out["tokens"] = tokens
    out["ratio_mixmodal_vs_transformers"] = out["mixmodal"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    out["ratio_per_round"] = _paired(timed["transformers"]["all_s"], timed["mixmodal"]["all_s"])
    if "mixmodal-compiled" in out:
        c = out["mixmodal-compiled"]
        out["ratio_compiled_vs_transformers"] = c["tokens_per_s"] / out["transformers"]["tokens_per_s"]
        out["ratio_compiled_per_round"] = _paired(timed["transformers"]["all_s"], timed["mixmodal-compiled"]["all_s"])
        out["ratio_compiled_vs_eager"] = c["tokens_per_s"] / out["mixmodal"]["tokens_per_s"]
    return out


def _paired(slow: list[float], fast: list[float]) -> dict:
    """slow / fast round by round (the systems ran back to back in each round): median, min, max."""
    ratios = [a / b for a, b in zip(slow, fast)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _row(precision: str, what: str, r: dict, unit: str, system: str = "mixmodal") -> list[str]:
    m, t = r[system], r["transformers"]
    compiled = system == "mixmodal-compiled"
    q = r["ratio_compiled_per_round" if compiled else "ratio_per_round"]
    ratio = r["ratio_compiled_vs_transformers" if compiled else "ratio_mixmodal_vs_transformers"]
    return [precision, what, f"{m['tokens_per_s']:,.0f}", f"{t['tokens_per_s']:,.0f}",
            f"{m['median_s']:.3f}", f"{t['median_s']:.3f}", f"**{ratio:.2f}x**", f"{q['min']:.2f}-{q['max']:.2f}x"]


def _print_rows(rows: list[list[str]], unit: str) -> None:
    for row in rows:
        print("  " + " | ".join(row))


# --- B: latent mode vs transfusion-pytorch -------------------------------------------------

def latent_mode(args, device: str, precisions: list[str], results: dict) -> list[list[str]]:
    from benchmarks.peers.transfusion_pytorch import build_peer, peer_parameter_count, sample_one_image
    from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
    from mixmodal.model.transformer import TransformerConfig
    from mixmodal.objectives.diffusion import DiffusionConfig

    tok = small_bpe(args.latent_text_vocab)
    torch.manual_seed(0)
    config = ModelConfig(text_vocab_size=tok.vocab_size,
                         transformer=TransformerConfig(dim=args.latent_dim, num_layers=args.latent_layers,
                                                       num_heads=args.latent_heads, ffn_dim=args.latent_ffn),
                         image=ImageConfig(mode="latents", latent_channels=4, grid_size=8, patch_size=2))
    model = FusionModel(config).to(device).eval()
    peer = build_peer(dim=args.latent_dim, depth=args.latent_layers, heads=args.latent_heads,
                      text_vocab=args.latent_text_vocab, latent_channels=4, latent_size=8, patch_size=2,
                      ff_hidden=args.latent_ffn, ode_method="euler", device=device)
    prompt, ids = prompt_of_length(tok, args.prompt)
    peer_prompt = torch.tensor(ids, dtype=torch.long)  # the peer prepends its own [sos], as we do <bos>
    patches = config.image.positions_per_image
    ours_params, peer_params = model.num_parameters(), peer_parameter_count(peer)
    print(f"\nB. latent mode: ours {ours_params / 1e6:.2f}M params, transfusion-pytorch {peer_params / 1e6:.2f}M "
          f"({peer_params / ours_params:.1f}x); {patches} patches per image; prompt {1 + len(ids)} positions")
    part = {"params_mixmodal": ours_params, "params_peer": peer_params, "patches": patches,
            "prompt_positions": 1 + len(ids), "text_vocab": tok.vocab_size, "runs": {}}
    rows = []
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else None
        engine = Engine(model, tok, None, diffusion=DiffusionConfig(kind="flow"), dtype=dtype, decode_images=False)
        run = {}
        for steps in args.steps:
            gen = GenerationConfig(mode="image", max_new_tokens=patches + 3, diffusion_steps=steps, sampler="flow")

            def check(r):
                assert len(r.images) == 1 and tuple(r.images[0].shape) == (4, 8, 8), [x.shape for x in r.images]

            def peer_fn(cached: bool, steps=steps):
                def run_peer():
                    with _autocast(device, precision):
                        out = sample_one_image(peer, prompt_ids=peer_prompt, steps=steps, use_kv_cache=cached, seed=0)
                    assert tuple(out.shape) == (4, 8, 8)
                return run_peer

            calls = {"mixmodal": ours_generate_fn(engine, prompt, gen, check),
                     "transfusion-pytorch sample_many (KV cache)": peer_fn(True),
                     "transfusion-pytorch sample_one (no cache)": peer_fn(False)}
            timed = time_calls(calls, args.rounds, device)
            ours_s = timed["mixmodal"]["median_s"]
            for name, t in timed.items():
                t["ms"] = 1000 * t["median_s"]
                t["best_ms"] = 1000 * t["best_s"]
                t["ratio_peer_time_over_mixmodal"] = t["median_s"] / ours_s
                t["ratio_per_round"] = _paired(t["all_s"], timed["mixmodal"]["all_s"])
            run[f"steps_{steps}"] = timed
            for name, t in timed.items():
                q = t["ratio_per_round"]
                rows.append([precision, str(steps), name, f"{t['ms']:.1f}", f"{t['best_ms']:.1f}",
                             "" if name == "mixmodal" else f"**{t['ratio_peer_time_over_mixmodal']:.2f}x**",
                             "" if name == "mixmodal" else f"{q['min']:.2f}-{q['max']:.2f}x"])
                print("  " + " | ".join(rows[-1]))
        part["runs"][precision] = run
    results["latent_mode"] = part
    return rows


# --- main ---------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up call (median and best)")
    p.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"],
                   help="fp32, bf16 autocast (both systems, same fp32 weights), or both")
    p.add_argument("--quick", action="store_true", help="a smoke run: short outputs, small images, 1 round")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/generate_{device}.json; "
                   "generate_{device}_quick.json with --quick)")
    p.add_argument("--grids", type=int, nargs="+", default=[16, 32], help="token-mode image grids (N = grid^2 codes)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="latent-mode denoising steps")
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--prompt", type=int, default=16, help="prompt positions, <bos> included")
    p.add_argument("--skip", nargs="*", default=[], choices=["tokens", "latents"])
    p.add_argument("--compile", action="store_true",
                   help="token mode: also time the engine with compiled blocks (Engine(compile=True)) in every round")
    # token-mode model (train_step.py's 5.6M configuration)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=1536, help="transformers' vocab_size (text + image tokens)")
    p.add_argument("--image-codes", type=int, default=512)
    p.add_argument("--text-bpe", type=int, default=512, help="ids of the text tokenizer driving the token-mode engine")
    # latent-mode model (the peer's size)
    p.add_argument("--latent-dim", type=int, default=256)
    p.add_argument("--latent-layers", type=int, default=4)
    p.add_argument("--latent-heads", type=int, default=4)
    p.add_argument("--latent-ffn", type=int, default=704, help="SwiGLU / the peer's GEGLU inner width")
    p.add_argument("--latent-text-vocab", type=int, default=512)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.grids, args.steps, args.text_tokens = 1, [8], [5], 32
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.set_num_threads(os.cpu_count() or 1)
    precisions = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"generate_{device}{'_quick' if args.quick else ''}.json")
    results = {"machine": machine_info(device), "rounds": args.rounds, "precisions": precisions, "compile": args.compile,
               "statistic": "median of the rounds (best also given); systems interleaved per round"}
    m = results["machine"]
    print(f"{m['cpu']} ({m['cores']} cores, {m['threads']} threads), device {device}"
          + (f" ({m['gpu']})" if device == "cuda" else "")
          + f"; torch {m['torch']}, transformers {m['transformers']}, transfusion-pytorch {m['transfusion_pytorch']}")
    token_rows, latent_rows = [], []
    if "tokens" not in args.skip:
        token_rows = token_mode(args, device, precisions, results)
    if "latents" not in args.skip:
        if m["transfusion_pytorch"] is None:
            print("\nB. latent mode skipped: transfusion-pytorch is not installed (pip install transfusion-pytorch==0.20.0)")
        else:
            latent_rows = latent_mode(args, device, precisions, results)

    print("\n## markdown\n")
    if token_rows:
        print("| precision | measurement | mixmodal tokens/s | transformers tokens/s | mixmodal s | transformers s "
              "| mixmodal / transformers | per-round range |")
        print("|---|---|---|---|---|---|---|---|")
        for row in token_rows:
            print("| " + " | ".join(row) + " |")
        print()
    if latent_rows:
        print("| precision | steps | system | ms / image (median) | best ms | peer time / ours | per-round range |")
        print("|---|---|---|---|---|---|---|")
        for row in latent_rows:
            print("| " + " | ".join(row) + " |")
    results["machine"]["loadavg_after"] = loadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
