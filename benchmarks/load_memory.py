"""Peak memory of loading a bf16 Chameleon checkpoint: mixmodal's model folder vs transformers' from_pretrained.

    python benchmarks/load_memory.py                       # ~1.1B parameters (dim 2048, 16 layers, vocab 65536)
    python benchmarks/load_memory.py --dim 512 --layers 4  # a quick check

Builds a random `ChameleonForConditionalGeneration` in bf16 with transformers, saves it, converts it
(`mixmodal convert hf-chameleon`), then in a fresh process each: loads it with transformers
(`from_pretrained(torch_dtype=bfloat16)`) and with mixmodal (`load_checkpoint(dtype=bfloat16)`: meta-device
init, memory-mapped safetensors), touches every weight, and reports the growth of the process's peak
resident memory (VmHWM, reset after the imports) over its size then, as a multiple of the weights' bytes.
The conversion's own peak is reported too. Issue 18's target: mixmodal's load <= 1.2x the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PEAK = """
import torch
torch.set_num_threads(1)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
def peak(): return status("VmHWM")
def reset():  # the high-water mark back to the current size: imports' transient peaks do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")
"""

LOADERS = {
    "transformers": """
import transformers
transformers.logging.set_verbosity_error()
before = reset()
model = transformers.ChameleonForConditionalGeneration.from_pretrained(FOLDER, dtype=torch.bfloat16)
""",
    "mixmodal": """
from mixmodal.model.io import load_model_dir
before = reset()
model = load_model_dir(FOLDER, dtype=torch.bfloat16)
""",
    "mixmodal convert": """
from mixmodal.interop.hf_chameleon import convert_hf_chameleon
before = reset()
convert_hf_chameleon(SRC, FOLDER + "-again")
model = None
""",
}
TOUCH = """
if model is not None:
    total = 0.0
    for p in model.parameters():  # in 1M-element chunks: the touch itself allocates next to nothing
        for chunk in p.detach().flatten().split(1 << 20):
            total += float(chunk.float().sum())
print(peak() - before)
"""


def build(folder: Path, dim: int, layers: int, vocab: int) -> int:
    """A random bf16 Chameleon saved with transformers; returns its parameter count."""
    import torch
    import transformers

    from mixmodal.interop.hf_chameleon import image_token_name

    torch.manual_seed(0)
    codes = 8192 if vocab >= 16384 else vocab // 4
    names = {f"<tok{i}>": i for i in range(vocab)}
    for c in range(codes):  # image codes at 4..4+codes, as Chameleon's
        names.pop(f"<tok{4 + c}>")
        names[image_token_name(c)] = 4 + c
    for i, name in enumerate(("<s>", "<pad>", "</s>", "<unk>")):
        names.pop(f"<tok{i}>")
        names[name] = i
    for k, name in enumerate(("<eoss>", "<racm3:break>")):
        names.pop(f"<tok{4 + codes + k}>")
        names[name] = 4 + codes + k
    config = transformers.ChameleonConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=int(dim * 2.6875) // 64 * 64, num_hidden_layers=layers,
        num_attention_heads=max(dim // 128, 1), num_key_value_heads=max(dim // 128, 1), vocabulary_map=names,
        vq_config=dict(base_channels=32, channel_multiplier=[1, 2], resolution=16, num_res_blocks=1, latent_channels=8,
                       embed_dim=8, num_embeddings=codes, attn_resolutions=[8]))
    model = transformers.ChameleonForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def measure(kind: str, folder: str, src: str) -> int:
    script = PEAK + LOADERS[kind].replace("FOLDER", repr(folder)).replace("SRC", repr(src)) + TOUCH
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()
    from mixmodal.interop.hf_chameleon import convert_hf_chameleon

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        hf, ours = Path(tmp) / "hf", Path(tmp) / "ours"
        params = build(hf, args.dim, args.layers, args.vocab)
        convert_hf_chameleon(hf, ours)
        weights = (ours / "model.safetensors").stat().st_size
        rows = {"parameters": params, "weights_bytes": weights}
        for kind, folder in (("transformers", hf), ("mixmodal", ours), ("mixmodal convert", ours)):
            grown = measure(kind, str(folder), str(hf))
            rows[kind] = {"peak_growth_bytes": grown, "x_weights": round(grown / weights, 3)}
        rows["mixmodal_vs_transformers"] = round(rows["mixmodal"]["peak_growth_bytes"]
                                                 / rows["transformers"]["peak_growth_bytes"], 3)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
