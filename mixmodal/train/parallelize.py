"""Parallelism applied to plain models from outside, torchtitan's way and order:

    activation checkpointing (per block) -> torch.compile (per block) -> data parallelism

The models stay single-device code and the training loop stays one loop: `parallelize`
changes the task's models in place (AC, compile, FSDP2) or wraps them (DDP) and returns a
`Parallel`, through which the trainer does the few things that differ between the data-
parallel schemes: gradient sync during accumulation, copying locally updated modules,
the replica drift check, full weights for evaluation, and loading full-format checkpoints.

`trainer.parallel` (ParallelConfig):

- `dp: ddp | fsdp` (default ddp). Only under torchrun with more than one process; a single
  process trains the plain models either way (but fsdp shards, trivially, in a process group
  of one that the caller made: FSDP2 on one device, as the GPU tests run it). `ddp`: every
  model an optimizer trains is wrapped in DistributedDataParallel (the trainer's behaviour
  before this module, bitwise).
  `fsdp`: FSDP2 (`fully_shard`) on every transformer block, then on the model's root, so
  parameters, gradients and optimizer states are sharded over the ranks; with bf16
  precision the blocks compute in bf16 and gradients are reduced in fp32
  (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)), otherwise all fp32.
  Gradients are reduce-scattered after every micro-batch (they stay sharded; no no_sync).
- `activation_checkpointing: none | full | selective` (default none). `full` recomputes each
  block's forward in backward; `selective` is torchtitan's op-level policy: the outputs of
  attention and of every other matrix multiply are kept, everything else (norms,
  activations, the other matmuls) is recomputed. Both keep the random state, so dropout
  draws the same mask again and gradients do not change.
- `compile: false | true` (default false): each block's forward goes through torch.compile
  (inductor), inside the FSDP / DDP hooks.

The transformer blocks of a model are the elements of every `nn.ModuleList` named `layers`
(transformers' convention, which mixmodal's models follow: FusionModel.transformer.layers,
the dual encoder's text and vision towers). A model without such blocks (the image
tokenizers, the PatchGAN discriminator) is refused, with one line naming the key, by
`fsdp`, `activation_checkpointing` and `compile`, rather than silently trained otherwise.
The patches are instance attributes (`block.forward`), so state-dict keys do not change:
checkpoints and RUN/model read the same with any of these settings, and evaluation and
saved artifacts run the plain forward (`Parallel.plain`).

Checkpoints: with fsdp (on any number of processes) every rank writes its own shards with
torch.distributed.checkpoint (sharded.py), which a run on another number of processes reads back
resharded; otherwise rank 0 writes the full format. A full-format checkpoint resumed under fsdp
is sharded into the models (`loading_state`: set_model_state_dict; optimizer states sliced like
their parameters), so `dp` may change on resume. Evaluation under fsdp runs on rank 0 on an
unsharded copy of each sharded model (kept on the CPU between evals) loaded with the gathered
weights.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from mixmodal.train import distributed


@dataclass
class ParallelConfig:
    dp: Literal["ddp", "fsdp"] = "ddp"  # data parallelism under torchrun: DistributedDataParallel or FSDP2
    activation_checkpointing: Literal["none", "full", "selective"] = "none"  # per transformer block
    compile: bool = False  # torch.compile each transformer block's forward


def _error(message: str) -> Exception:
    from mixmodal.train.trainer import TrainingError  # (the trainer imports this module)

    return TrainingError(message)


# --- blocks ---------------------------------------------------------------------------------

def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the elements of every nn.ModuleList named `layers`."""
    return [block for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" for block in module]


_DEFAULTS = {"dp": "ddp", "activation_checkpointing": "none", "compile": "false"}


def _blocks_or_refuse(name: str, model: nn.Module, key: str, value: str) -> list[nn.Module]:
    blocks = transformer_blocks(model)
    if not blocks:
        raise _error(f"trainer.parallel.{key}={value} applies per transformer block (an nn.ModuleList named "
                     f"`layers`), and model {name!r} ({type(model).__name__}) has none; set "
                     f"trainer.parallel.{key}={_DEFAULTS[key]}")
    return blocks


# --- activation checkpointing -----------------------------------------------------------------

def _saved_ops() -> set:
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(aten, n).default for n in names if hasattr(aten, n)} | {aten.max.default}


def _selective_context():
    """torchtitan's op-level selective AC policy: keep attention outputs and every other
    matmul's output; recompute the rest in backward."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved, matmuls = _saved_ops(), {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx, op, *args, **kwargs):
        if op in matmuls:
            mode = "recompute" if ctx.is_recompute else "forward"
            counts[mode] += 1
            return CheckpointPolicy.MUST_SAVE if counts[mode] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpointed(forward: Callable, mode: Literal["full", "selective"]) -> Callable:
    """`forward` run under torch.utils.checkpoint (non-reentrant, RNG state preserved)."""
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    context_fn = _selective_context if mode == "selective" else noop_context_fn

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return run


def apply_activation_checkpointing(blocks: list[nn.Module], mode: Literal["full", "selective"]) -> None:
    for block in blocks:
        block.forward = checkpointed(block.forward, mode)


def apply_compile(blocks: list[nn.Module]) -> None:
    for block in blocks:
        block.forward = torch.compile(block.forward)


# --- the parallel models ----------------------------------------------------------------------

class Parallel:
    """The task's models as training sees them, and what differs per data-parallel scheme.

    The collectives (`full_models`, `loading_state` under fsdp,
    `after_update`, `check_replicas_agree`) must be called by every rank in the same order."""

    def __init__(self, config: ParallelConfig, models: dict[str, nn.Module], world_size: int) -> None:
        self.config = config
        self.models = models
        self.world_size = world_size
        self.train_models: dict[str, nn.Module] = models  # what train_step receives
        self.synced_modules: list[nn.Module] = []  # DDP: rank 0's state copied to all after each update
        self.sharded: list[str] = []  # FSDP2: models sharded in place
        self.replicas: dict[str, nn.Module] = {}  # FSDP2, rank 0: unsharded copies for evaluation and artifacts
        self._patched: list[tuple[nn.Module, Callable | None]] = []  # (block, instance forward before the patches)
        self._gathered: dict[str, nn.Module] | None = None

    @property
    def fsdp(self) -> bool:
        return bool(self.sharded)

    # -- during a step --

    def gradient_sync(self, sync: bool):
        """DDP's no_sync on every wrapped model unless `sync`: gradients of the micro-batches
        before the last one are accumulated locally and averaged once, in the last backward.
        FSDP2 reduce-scatters every micro-batch (gradients stay sharded): nothing to do."""
        stack = ExitStack()
        if not sync:
            for model in self.train_models.values():
                if isinstance(model, nn.parallel.DistributedDataParallel):
                    stack.enter_context(model.no_sync())
        return stack

    def backward_inputs(self, params: list[nn.Parameter]) -> list[nn.Parameter] | None:
        """What a loss's backward(inputs=...) names: its optimizer's parameters, so that it
        fills only their gradients. Under FSDP2 the forward ran on gathered copies, which are
        the graph's leaves instead: None (all leaves), safe since fsdp takes one optimizer."""
        return None if self.fsdp else params

    def after_update(self) -> None:
        """Copy rank 0's state of the task's locally updated modules to every rank (DDP)."""
        for module in self.synced_modules:
            distributed.broadcast_module_state(module)
        self._gathered = None

    def check_replicas_agree(self, step: int) -> None:
        """With DDP, fail if the ranks' copies of a trained model differ. They stay bitwise
        equal when every gradient goes through DDP; a train_step that calls `.module` or
        another method of a wrapped model trains each rank on its own batch only. (FSDP2
        keeps one copy of each parameter, sharded: nothing can drift.)"""
        if self.world_size == 1:
            return
        mine = {name: sum(float(p.detach().double().sum()) for p in model.module.parameters())
                for name, model in self.train_models.items() if isinstance(model, nn.parallel.DistributedDataParallel)}
        differ = sorted(name for name in mine if len({sums[name] for sums in distributed.gather_objects(mine)}) > 1)
        if differ:
            raise _error(
                f"step {step}: the ranks' copies of {', '.join(differ)} have drifted apart. Their gradients "
                "are averaged only through the DistributedDataParallel wrapper's forward: train_step must call "
                "models[name](...) itself, not models[name].module or another method of it; weights a forward "
                "pass edits in place must be listed by Task.locally_updated_modules")

    # -- evaluation and artifacts --

    @contextmanager
    def plain(self) -> Iterator[None]:
        """The blocks' own forward inside the block (no activation checkpointing, no compiled
        graph): evaluation and generation run eagerly, with shapes compile never saw."""
        patched = [(block, block.__dict__.get("forward")) for block, _ in self._patched]
        for block, original in self._patched:
            _set_forward(block, original)
        try:
            yield
        finally:
            for block, forward in patched:
                _set_forward(block, forward)

    def full_models(self) -> dict[str, nn.Module]:
        """The models with their full weights, for evaluation and artifacts (rank 0's; other
        ranks get {} under fsdp). Under fsdp every rank must call it: the shards are gathered
        into rank 0's unsharded replicas (once per update)."""
        if not self.fsdp:
            return self.models
        if self._gathered is None:
            states = {name: _full_model_state(self.models[name]) for name in self.sharded}  # collective
            if not self.replicas:
                self._gathered = {}
            else:
                for name, state in states.items():
                    self.replicas[name].load_state_dict(state)
                self._gathered = {name: self.replicas.get(name, model) for name, model in self.models.items()}
        return self._gathered

    @contextmanager
    def on_device(self, device: torch.device) -> Iterator[None]:
        """The replicas on `device` inside the block, back on the CPU after it."""
        for replica in self.replicas.values():
            replica.to(device)
        try:
            yield
        finally:
            for replica in self.replicas.values():
                replica.to("cpu")

    # -- checkpoints --

    def loading_state(self, optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict, dict]:
        """(models, optimizers) for checkpoint.load_checkpoint: full states read from a
        checkpoint are sharded into the models and optimizers (every rank must call it)."""
        if not self.fsdp:
            return self.models, optimizers
        models = {name: _ShardingLoader(model) if name in self.sharded else model for name, model in self.models.items()}
        return models, {name: _ShardingOptimizerLoader(opt) for name, opt in optimizers.items()}

    def close(self) -> None:
        """Drop the wrappers (held in reference cycles) while the process group still exists."""
        self.train_models = self.models
        self._gathered = None


def _set_forward(block: nn.Module, forward: Callable | None) -> None:
    if forward is None:
        block.__dict__.pop("forward", None)
    else:
        block.forward = forward


# --- full <-> sharded state (FSDP2) -------------------------------------------------------------

def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank gathers; rank 0 gets the full weights on the CPU (other ranks {}). Keys of
    one tied parameter map to one tensor, so the checkpoint stores it once, with an alias, as
    a single process does."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    if state:
        owner: dict[int, str] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            first = owner.setdefault(id(value), key)
            if first != key and first in state and key in state:
                state[key] = state[first]
    return state


class _ShardingLoader:
    """load_state_dict(full state) into an FSDP2-sharded model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        return set_model_state_dict(self.model, state, options=_options(strict=strict))


class _ShardingOptimizerLoader:
    """load_state_dict(a single process's optimizer state) into an optimizer over sharded
    parameters: each state tensor shaped like its parameter is sliced like it (no comms)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        sharded = {}
        for index, entry in state["state"].items():
            param = params[int(index)]
            sharded[index] = {
                key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
                if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape
                else value
                for key, value in entry.items()}
        self.optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def _trained_models(models: dict[str, nn.Module], specs: dict[str, Any], whole: bool) -> list[str]:
    """Names of the models an optimizer trains (that have trainable parameters). `whole`
    (data parallelism): an optimizer over anything but a whole model is refused."""
    names = {id(m): name for name, m in models.items()}
    trained = []
    for opt_name, spec in specs.items():
        name = names.get(id(spec.module))
        if name is None:
            if whole:
                raise _error(
                    f"optimizer {opt_name!r} trains a module that is not one of the task's models "
                    f"({', '.join(models)}); data parallelism wraps whole models, so return that module "
                    "from build_models under its own name")
            name = next((n for n, m in models.items() if any(spec.module is sub for sub in m.modules())), None)
        if name is not None and name not in trained:
            trained.append(name)
    return [name for name in models if name in trained and any(p.requires_grad for p in models[name].parameters())]


# --- applying it ----------------------------------------------------------------------------

def parallelize(
    models: dict[str, nn.Module],
    specs: dict[str, Any],
    config: ParallelConfig,
    *,
    task: Any,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    world_size: int,
) -> Parallel:
    """Apply `config` to the models the optimizers (`specs`: name -> OptimizerSpec) train
    and that have trainable parameters; others are left alone: AC, compile, then DDP /
    FSDP2 when `world_size` > 1 (FSDP2 also in a process group of one). In place, except
    DDP's wrappers (Parallel.train_models). Call it after the models are on `device` and before building the optimizers (FSDP2
    replaces the parameters by sharded ones)."""
    parallel = Parallel(config, models, world_size)
    if world_size > 1:
        reason = getattr(task, "ddp_unsupported", None)
        if reason:
            raise _error(f"this task cannot train on {world_size} processes: {reason}")
    fsdp = config.dp == "fsdp"
    shard = fsdp and (world_size > 1 or distributed.is_initialized())  # (a group of one: FSDP2 on one device)
    trained = _trained_models(models, specs, whole=world_size > 1 or shard)
    if fsdp and len(specs) > 1:
        raise _error(f"trainer.parallel.dp=fsdp trains tasks of one optimizer, and this one has {len(specs)} "
                     f"({', '.join(specs)}): a loss's backward must reach only its own optimizer's parameters, "
                     "which FSDP2's gathered copies do not let the trainer name; set trainer.parallel.dp=ddp")
    if fsdp and list(getattr(task, "locally_updated_modules", lambda models: [])(models)):
        raise _error("trainer.parallel.dp=fsdp: this task edits weights in the forward pass "
                     "(Task.locally_updated_modules, e.g. a VQ codebook's EMA), which sharded parameters cannot "
                     "keep in step; set trainer.parallel.dp=ddp")
    ac = config.activation_checkpointing
    per_block = [(key, value) for key, value, on in (("dp", "fsdp", fsdp), ("activation_checkpointing", ac, ac != "none"),
                                                     ("compile", "true", config.compile)) if on]
    blocks = {name: _blocks_or_refuse(name, models[name], *per_block[0]) for name in trained} if per_block else {}
    for name in trained if fsdp else ():
        scalars = [key for key, p in models[name].named_parameters() if p.ndim == 0]
        if scalars:
            raise _error(f"trainer.parallel.dp=fsdp cannot shard model {name!r}: FSDP2 refuses 0-dim parameters "
                         f"({', '.join(scalars)}); set trainer.parallel.dp=ddp")
    if shard and distributed.is_main():  # before any patch: plain copies, on the CPU
        parallel.replicas = {name: copy.deepcopy(models[name]).to("cpu") for name in trained}
    for name in trained if ac != "none" or config.compile else ():
        if ac != "none":
            apply_activation_checkpointing(blocks[name], ac)
        if config.compile:
            apply_compile(blocks[name])
        parallel._patched += [(block, None) for block in blocks[name]]
    if world_size == 1 and not shard:
        return parallel
    find_unused = bool(getattr(task, "ddp_find_unused_parameters", False))
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if autocast_dtype == torch.bfloat16 else MixedPrecisionPolicy())
        for name in trained:
            for block in blocks[name]:
                fully_shard(block, mp_policy=policy)
            fully_shard(models[name], mp_policy=policy)
            if find_unused:  # a parameter a rank's batch leaves unused gets a zero gradient, as under DDP
                models[name].set_reduce_scatter_unused_params(True)
        parallel.sharded = list(trained)
        return parallel
    device_ids = [device.index] if device.type == "cuda" else None
    parallel.train_models = {
        name: nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)
        if name in trained else model
        for name, model in models.items()
    }
    parallel.synced_modules = list(getattr(task, "locally_updated_modules", lambda models: [])(models))
    return parallel


__all__ = [
    "Parallel", "ParallelConfig", "apply_activation_checkpointing", "apply_compile", "checkpointed", "parallelize",
    "transformer_blocks",
]
