"""LoRA (Hu et al., 2021) on the transformer's projections, applied to a FusionModel from outside.

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T       A [rank, in]: Kaiming-uniform (as PEFT)
                                                              B [out, rank]: zeros (the model starts unchanged)

`apply_lora(model, config)` replaces every targeted `nn.Linear` of `model.transformer.layers`,
found by its name (attention `q_proj k_proj v_proj o_proj`, MLP `gate_proj up_proj down_proj`:
model/transformer.py), by a `LoRALinear` that holds the *same* weight and bias Parameters plus
`lora_A` / `lora_B`; every other parameter of the model is frozen (requires_grad False). The
base tensors keep their names (`transformer.layers.0.self_attn.q_proj.weight`), the adapters
are `...q_proj.lora_A` / `...q_proj.lora_B`, and an optimizer built over the trainable
parameters (train/optim.py `build_adamw` takes only those) updates the adapters alone. The
model's own code (transformer.py, fusion.py) knows nothing of this.

On disk, beside a model folder's `model.safetensors` (the base weights, as they were):

    adapter.safetensors    the lora_A / lora_B tensors, under the names above
    adapter_config.yaml    format, rank, alpha, targets, dropout, and the wrapped modules

Every reader of a model folder goes through `model/io.py read_model_state`, which merges the
adapter into the weights it returns (`merge_adapter`: W + (alpha / rank) B A in float32, cast
back to W's dtype): `load_model_dir` (so Engine.from_pretrained, `mixmodal generate`, `serve`,
`eval`), a run's `init_from`, and `convert to-hf-chameleon`. `merge_lora_folder`
(`mixmodal convert merge-lora SRC OUT`) writes the merged weights as a plain model folder,
every other file copied; `load_unmerged` gives the model with its adapters as training ran it.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixmodal.config import ConfigError, build_config, load_yaml
from mixmodal.model.io import (CONFIG_FILE, WEIGHTS_FILE, load_model_dir, read_model_config, read_model_state,
                                write_model_dir)
from mixmodal.model.transformer import Block, TransformerConfig
from mixmodal.weights import read_weights, write_manifest

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.yaml"
ADAPTER_FORMAT = "mixmodal.lora.v1"
ADAPTER_KEYS = ("lora_A", "lora_B")


@functools.lru_cache(maxsize=1)
def projection_names() -> tuple[str, ...]:
    """The names of the nn.Linear layers inside one transformer block, read off a real (tiny) block,
    so the list is the model's: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""
    block = Block(TransformerConfig(dim=8, num_layers=1, num_heads=2, ffn_dim=8), 0)
    return tuple(name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, nn.Linear))


def _default_targets() -> list[str]:
    return list(projection_names())


@dataclass
class LoRAConfig:
    rank: int = 8  # the adapters' inner width r
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: list[str] = field(default_factory=_default_targets)  # projection names (every block)
    dropout: float = 0.0  # on the adapter's input only

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank!r}: must be an integer >= 1 (the adapters' inner width; 8 or 16 "
                              "is usual)")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0 \
                or not math.isfinite(self.alpha):
            raise ConfigError(f"lora.alpha={self.alpha!r}: must be a number > 0 (the update is scaled by alpha / rank; "
                              "2 x rank is usual)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r}: must be in [0, 1)")
        names = projection_names()
        if not self.targets:
            raise ConfigError(f"lora.targets is empty: name the projections to adapt, from {', '.join(names)}")
        unknown = [t for t in self.targets if t not in names]
        if unknown:
            raise ConfigError(f"lora.targets: {unknown[0]!r} is not a projection of the transformer; choose from "
                              f"{', '.join(names)} (model/transformer.py)")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets lists a projection twice: {self.targets}")
        self.targets = list(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An nn.Linear whose weight and bias are the wrapped layer's own Parameters (frozen by
    `apply_lora`), plus a low-rank update `scaling * B A`."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no new weight, the base's is kept
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.rank, self.scaling = config.rank, config.scaling
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def reset_parameters(self) -> None:  # nn.Linear's would re-draw the (pretrained) base weight
        raise RuntimeError("LoRALinear wraps a pretrained weight; it is never re-initialised")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scaling * B A (float32 arithmetic, W's dtype)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(_merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.weight.requires_grad_(self.weight.requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return (weight.detach().float() + scaling * (b.detach().float() @ a.detach().float())).to(weight.dtype)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the targeted projections of `model.transformer.layers` in place and freeze everything
    else; returns the wrapped modules' names. Adapters are drawn from the global torch generator
    (seeded by the trainer before build_models, so a run and its resume draw the same)."""
    layers = getattr(getattr(model, "transformer", None), "layers", None)
    if layers is None:
        raise TypeError(f"apply_lora adapts a FusionModel (model.transformer.layers); got {type(model).__name__}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model already carries LoRA adapters; merge them (merge_lora) before adding others")
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(name, m) for name, m in layers.named_modules(prefix="transformer.layers")
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in config.targets]
    missing = set(config.targets) - {name.rsplit(".", 1)[-1] for name, _ in found}
    if missing:
        raise ConfigError(f"lora.targets: the model has no {', '.join(sorted(missing))} layer")
    for name, module in found:
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, LoRALinear(module, config))
    return [name for name, _ in found]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear of `model` into a plain nn.Linear (in place); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, module.merged())
    return model


def is_adapter_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_KEYS


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The lora_A / lora_B tensors of a model carrying adapters, by their state-dict names."""
    return {k: v.detach() for k, v in model.state_dict().items() if is_adapter_key(k)}


def save_adapter(model: nn.Module, config: LoRAConfig, out: str | os.PathLike) -> Path:
    """Write out/adapter.safetensors and out/adapter_config.yaml (each to a temporary name, then renamed)."""
    import yaml
    from safetensors.torch import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state(model).items()}
    if not tensors:
        raise ValueError("the model carries no LoRA adapters to save (apply_lora first)")
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    tmp = folder / (ADAPTER_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT})
    os.replace(tmp, folder / ADAPTER_FILE)
    text = yaml.safe_dump({"format": ADAPTER_FORMAT, **asdict(config), "modules": modules}, sort_keys=False)
    tmp = folder / (ADAPTER_CONFIG_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / ADAPTER_CONFIG_FILE)
    return folder


def remove_adapter(folder: str | os.PathLike) -> None:
    for name in (ADAPTER_FILE, ADAPTER_CONFIG_FILE):
        Path(folder, name).unlink(missing_ok=True)


def read_adapter(folder: str | os.PathLike) -> tuple[LoRAConfig, dict[str, torch.Tensor]] | None:
    """The adapter beside a model folder's weights, or None when it has none. A half adapter (one of
    the two files), a foreign format or tensors that do not pair up fail naming the file."""
    folder = Path(folder)
    weights, config_path = folder / ADAPTER_FILE, folder / ADAPTER_CONFIG_FILE
    if not weights.is_file() and not config_path.is_file():
        return None
    for present, absent in ((weights, config_path), (config_path, weights)):
        if present.is_file() and not absent.is_file():
            raise ValueError(f"{present} has no {absent.name} beside it: an adapter is both files; re-copy the "
                             "model folder (or delete both to use the base weights alone)")
    data = dict(load_yaml(config_path))
    if data.pop("format", None) != ADAPTER_FORMAT:
        raise ValueError(f"{config_path}: not a mixmodal LoRA adapter config (format: {ADAPTER_FORMAT} expected)")
    data.pop("modules", None)
    try:
        config = build_config(LoRAConfig, data)
    except ConfigError as e:
        raise ValueError(f"{config_path}: {e}") from None
    tensors = read_weights(weights, fix="re-copy the model folder (the adapter was cut short)")
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        other = f"{module}.{'lora_B' if leaf == 'lora_A' else 'lora_A'}"
        if leaf not in ADAPTER_KEYS or other not in tensors:
            raise ValueError(f"{weights}: {key} is not one of a lora_A / lora_B pair; this is not a LoRA adapter")
        rank_axis = 0 if leaf == "lora_A" else 1
        if tensor.ndim != 2 or tensor.shape[rank_axis] != config.rank:
            raise ValueError(f"{weights}: {key} has shape {tuple(tensor.shape)}, not rank {config.rank} "
                             f"({config_path}); the two files are not one adapter")
    return config, tensors


def merge_adapter(state: dict[str, torch.Tensor], config: LoRAConfig, adapter: dict[str, torch.Tensor],
                  origin: str) -> dict[str, torch.Tensor]:
    """`state` (base weights) with the adapter merged: a new dict, untouched tensors shared."""
    out = dict(state)
    for key in sorted(k for k in adapter if k.endswith(".lora_A")):
        module = key[:-len(".lora_A")]
        weight_key = f"{module}.weight"
        a, b = adapter[key], adapter[f"{module}.lora_B"]
        weight = state.get(weight_key)
        if weight is None or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise ValueError(f"{origin}: the adapter of {module} (A {tuple(a.shape)}, B {tuple(b.shape)}) does not fit "
                             f"the model's {weight_key} "
                             f"({'absent' if weight is None else tuple(weight.shape)}); it belongs to another model")
        out[weight_key] = _merged_weight(weight, a, b, config.scaling)
    return out


def load_unmerged(folder: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A model folder with an adapter as training ran it: the base weights, LoRALinear layers, the
    adapter's tensors (eval mode)."""
    read = read_adapter(folder)
    if read is None:
        raise ValueError(f"{folder} holds no {ADAPTER_FILE}: it is a plain model folder")
    config, tensors = read
    model = load_model_dir(folder, device, merge_adapter=False)
    apply_lora(model, config)
    missing = set(adapter_state(model)) - set(tensors)
    unexpected = set(tensors) - set(adapter_state(model))
    if missing or unexpected:
        raise ValueError(f"{Path(folder) / ADAPTER_FILE}: adapters for other layers than "
                         f"{Path(folder) / ADAPTER_CONFIG_FILE}'s targets (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]})")
    model.load_state_dict(tensors, strict=False)
    return model.to(device).eval()


def merge_lora_folder(src: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, LoRAConfig]:
    """A model folder (or a run directory: its model/) with an adapter -> `out`, a plain model folder:
    model.safetensors with the adapter merged (the base's dtype), every other file and folder copied
    (tokenizers, generation.yaml, vocab_map.json, hf_config.json, ...), no adapter files."""
    folder = Path(src)
    if not (folder / WEIGHTS_FILE).is_file() and (folder / "model" / WEIGHTS_FILE).is_file():
        folder = folder / "model"
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{src} is not a model folder ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a run directory with one "
                         "in model/")
    read = read_adapter(folder)
    if read is None:
        raise ValueError(f"{folder} holds no {ADAPTER_FILE}: there is nothing to merge (it is a plain model folder; "
                         "a LoRA run writes RUN/model/adapter.safetensors)")
    target = Path(out)
    if target.resolve() == folder.resolve():
        raise ValueError(f"merge-lora: OUT ({out}) is the source folder; give a new folder")
    state = read_model_state(folder)  # merged (the folder's manifest checked first)
    # the source's manifest.json is copied too and stays until the last line: a merge cut short fails it
    shutil.copytree(folder, target, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if Path(d).resolve() == folder.resolve()
                                             and n in (WEIGHTS_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE)])
    remove_adapter(target)
    write_model_dir(read_model_config(folder), state, target, manifest=False)
    write_manifest(target, remake=f"re-run `mixmodal convert merge-lora {src} {out}`")
    return target, read[0]


__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_FILE", "LoRAConfig", "LoRALinear", "adapter_state", "apply_lora",
           "is_adapter_key", "load_unmerged", "merge_adapter", "merge_lora", "merge_lora_folder", "projection_names",
           "read_adapter", "remove_adapter", "save_adapter"]
