"""trainer.parallel (mixmodal/train/parallelize.py) on the CPU: FSDP2 over 2 gloo processes
trains as one process does with the same global batch; its checkpoints have the single-process
format and resume exactly; activation checkpointing changes no gradient; torch.compile gives
the same losses; models without transformer blocks and settings that cannot work are refused
in one line. The 2-process runs use the DDP tests' harness (ddp_task.py, `model=fusion`: a
tiny FusionModel whose blocks are `transformer.layers`)."""

from __future__ import annotations

import dataclasses
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

from ddp_task import DDPToyConfig, DDPToyTask, fusion_config
from mixmodal.config import ConfigError, build_config, to_dict
from mixmodal.model.fusion import FusionModel
from mixmodal.train import checkpoint as ckpt
from mixmodal.train.metrics import read_metrics
from mixmodal.train.parallelize import apply_activation_checkpointing, parallelize, transformer_blocks
from mixmodal.train.trainer import OptimizerSpec, Trainer, TrainingError
from test_distributed import final_weights, torchrun

FSDP = ("model=fusion", "tie_embeddings=true", "trainer.parallel.dp=fsdp")


def toy(*overrides: str) -> DDPToyConfig:
    return build_config(DDPToyConfig, to_dict(DDPToyConfig()), list(overrides))


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["losses"]["loss"] for r in read_metrics(run_dir, "train")}


# --- config and refusals ------------------------------------------------------------------------

def test_the_parallel_section_and_its_defaults():
    default = toy().trainer.parallel
    assert (default.dp, default.activation_checkpointing, default.compile) == ("ddp", "none", False)
    chosen = toy("trainer.parallel.dp=fsdp", "trainer.parallel.activation_checkpointing=selective",
                 "trainer.parallel.compile=true").trainer.parallel
    assert (chosen.dp, chosen.activation_checkpointing, chosen.compile) == ("fsdp", "selective", True)
    with pytest.raises(ConfigError, match=r"trainer.parallel.dp: 'zero3' is not allowed; allowed values: 'ddp', 'fsdp'"):
        toy("trainer.parallel.dp=zero3")
    with pytest.raises(ConfigError, match=r"trainer.ema_decay > 0 is not supported with trainer.parallel.dp=fsdp"):
        toy("trainer.parallel.dp=fsdp", "trainer.ema_decay=0.9")


@pytest.mark.parametrize("override, key", [("trainer.parallel.dp=fsdp", "dp=ddp"),
                                           ("trainer.parallel.activation_checkpointing=full",
                                            "activation_checkpointing=none"),
                                           ("trainer.parallel.compile=true", "compile=false")])
def test_a_model_without_blocks_is_refused_in_one_line(override, key, tmp_path):
    config = toy(override)  # the MLP: no `layers`
    with pytest.raises(TrainingError, match=rf"model 'net' \(MLP\) has none; set trainer.parallel.{key}$"):
        Trainer(DDPToyTask(config), config.trainer, tmp_path).fit()


def test_fsdp_refuses_several_optimizers_locally_updated_weights_and_scalar_parameters():
    models = {"a": FusionModel(fusion_config(toy())), "b": FusionModel(fusion_config(toy()))}
    config = toy("trainer.parallel.dp=fsdp").trainer.parallel
    kwargs = dict(device=torch.device("cpu"), autocast_dtype=None, world_size=1)
    with pytest.raises(TrainingError, match=r"fsdp trains tasks of one optimizer, and this one has 2 \(a, b\)"):
        parallelize(models, {n: OptimizerSpec(m) for n, m in models.items()}, config, task=DDPToyTask(toy()), **kwargs)

    class EditsWeights(DDPToyTask):
        def locally_updated_modules(self, models):
            return [models["a"].lm_head]

    with pytest.raises(TrainingError, match=r"locally_updated_modules.*set trainer.parallel.dp=ddp"):
        parallelize({"a": models["a"]}, {"a": OptimizerSpec(models["a"])}, config, task=EditsWeights(toy()), **kwargs)

    scaled = models["b"]
    scaled.logit_scale = torch.nn.Parameter(torch.tensor(1.0))  # as the dual encoder has
    with pytest.raises(TrainingError, match=r"FSDP2 refuses 0-dim parameters \(logit_scale\); set trainer.parallel.dp=ddp"):
        parallelize({"b": scaled}, {"b": OptimizerSpec(scaled)}, config, task=DDPToyTask(toy()), **kwargs)


# --- activation checkpointing -------------------------------------------------------------------

class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
        return func(*args, **(kwargs or {}))


def _gradients(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a next-token loss, and how many matmuls the backward ran (recomputation included)."""
    torch.manual_seed(7)  # dropout
    logits = model(ids[:, :-1]).logits
    with _CountMatmuls() as counter:
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, counter.count


def test_activation_checkpointing_changes_no_gradient():
    config = fusion_config(toy("dropout=0.1", "width=32"))
    torch.manual_seed(0)
    reference = FusionModel(config)
    ids = torch.randint(0, config.vocab.size, (3, 20), generator=torch.Generator().manual_seed(1))
    plain, matmuls_plain = _gradients(reference, ids)
    matmuls = {}
    for mode in ("full", "selective"):
        model = FusionModel(config)
        model.load_state_dict(reference.state_dict())
        blocks = transformer_blocks(model)
        assert blocks == list(model.transformer.layers) and len(blocks) == 2
        apply_activation_checkpointing(blocks, mode)
        grads, matmuls[mode] = _gradients(model, ids)
        assert grads.keys() == plain.keys()
        for name in plain:  # dropout draws the same mask again in the recomputation
            torch.testing.assert_close(grads[name], plain[name], rtol=0, atol=1e-6, msg=f"{mode}: {name}")
        assert list(model.state_dict()) == list(reference.state_dict())  # checkpoints keep their keys
    # backward recomputed the blocks' forward: all of its matmuls (full), every other one (selective)
    assert matmuls_plain < matmuls["selective"] < matmuls["full"]


def test_evaluation_runs_the_blocks_plain_forward():
    config = toy("model=fusion", "trainer.parallel.activation_checkpointing=full")
    model = FusionModel(fusion_config(config))
    parallel = parallelize({"net": model}, {"net": OptimizerSpec(model)}, config.trainer.parallel,
                           task=DDPToyTask(config), device=torch.device("cpu"), autocast_dtype=None, world_size=1)
    block = model.transformer.layers[0]
    assert "forward" in vars(block)  # patched on the instance
    with parallel.plain():
        assert "forward" not in vars(block)
    assert "forward" in vars(block)


# --- FSDP2 over 2 processes ---------------------------------------------------------------------

def test_fsdp_trains_as_one_process_with_the_same_global_batch(tmp_path):
    """20 steps in fp32: 2 ranks x 2 micro-batches under FSDP2 against 1 process x 4 (the same
    batches per update); a NaN in rank 1's batch 5 skips update 2 on both ranks, as it does on one."""
    common = (*FSDP, "trainer.steps=20", "trainer.save_every=0", "trainer.lr=1e-2", "nan_batches=[5]")
    torchrun(tmp_path / "fsdp", *common, "trainer.grad_accumulation=2")
    config = toy(*common, "trainer.grad_accumulation=4")
    config.trainer = dataclasses.replace(config.trainer, parallel=dataclasses.replace(config.trainer.parallel, dp="ddp"))
    Trainer(DDPToyTask(config), config.trainer, tmp_path / "one").fit()

    two, one = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert two.keys() == one.keys() == set(range(1, 21)) - {2}
    assert two == pytest.approx(one, rel=0, abs=1e-5)
    assert [r["step"] for r in read_metrics(tmp_path / "fsdp", "nonfinite")] == [2]
    norms = [(r["grad_norm"]["net"], s["grad_norm"]["net"]) for r, s in zip(
        read_metrics(tmp_path / "fsdp", "train"), read_metrics(tmp_path / "one", "train"))]
    assert [a for a, _ in norms] == pytest.approx([b for _, b in norms], rel=1e-4)  # clipped by the global norm

    # rank 0 wrote the single-process checkpoint format: full weights, one tied tensor, int-keyed optimizer state
    paths = {name: ckpt.latest_checkpoint(tmp_path / name) for name in ("fsdp", "one")}
    metadata = {}
    for name, path in paths.items():
        with safe_open(str(path / ckpt.WEIGHTS), "pt") as f:
            metadata[name] = f.metadata()
    assert metadata["fsdp"] == metadata["one"] and "lm_head.weight" in metadata["one"]["aliases"]
    weights = {name: final_weights(tmp_path / name) for name in paths}
    assert weights["fsdp"].keys() == weights["one"].keys()
    for key in weights["one"]:
        torch.testing.assert_close(weights["fsdp"][key], weights["one"][key], rtol=0, atol=1e-4, msg=key)
    states = {name: torch.load(path / ckpt.OPTIMIZER, weights_only=True)["net"] for name, path in paths.items()}
    assert states["fsdp"]["param_groups"] == states["one"]["param_groups"]
    assert states["fsdp"]["state"].keys() == states["one"]["state"].keys()
    assert (tmp_path / "fsdp" / "eval.json").is_file() and (tmp_path / "fsdp" / "artifact_rank0.txt").is_file()


@pytest.mark.slow
def test_an_fsdp_run_resumes_exactly_and_under_ddp_too(tmp_path):
    """Per-rank dropout, tied weights, bf16 (the mixed-precision policy), selective AC: kill
    after the checkpoint of step 2, resume on 2 processes, and the curve continues bitwise; the
    same checkpoint resumes under DDP too (to float tolerance: the reductions differ)."""
    common = (*FSDP, "dropout=0.1", "trainer.precision=bf16", "trainer.parallel.activation_checkpointing=selective")
    torchrun(tmp_path / "straight", *common)
    for name, dp in (("resumed", "fsdp"), ("as_ddp", "ddp")):
        shutil.copytree(tmp_path / "straight", tmp_path / name)
        for later in ("step_000004", "step_000006"):
            shutil.rmtree(tmp_path / name / "checkpoints" / later)
        torchrun(tmp_path / name, *common, f"trainer.parallel.dp={dp}", "trainer.resume=true")

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert losses(tmp_path / "as_ddp") == pytest.approx(losses(tmp_path / "straight"), rel=0, abs=1e-3)


# --- torch.compile --------------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_gives_the_same_losses(tmp_path):
    """Inductor compiles each block's forward and backward (C++ kernels on the CPU: about a
    minute on 2 busy cores the first time, its cache in /tmp afterwards): on one process, and
    on two under FSDP2 with selective AC (the same global batch)."""
    if not shutil.which("g++") and not shutil.which("c++"):
        pytest.skip("torch.compile (inductor) needs a C++ compiler on the CPU, and there is none")
    if sys.platform == "win32":
        pytest.skip("inductor's CPU backend is not supported on Windows")
    common = ("model=fusion", "trainer.steps=3", "trainer.save_every=0", "width=32")
    curves = {}
    torch._dynamo.utils.counters.clear()
    for compiled in ("false", "true"):
        config = toy(*common, "trainer.grad_accumulation=2", f"trainer.parallel.compile={compiled}")
        Trainer(DDPToyTask(config), config.trainer, tmp_path / compiled).fit()
        curves[compiled] = losses(tmp_path / compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torchrun(tmp_path / "fsdp", *common, "trainer.parallel.dp=fsdp", "trainer.parallel.compile=true",
             "trainer.parallel.activation_checkpointing=selective")
    assert curves["true"].keys() == {1, 2, 3}
    assert curves["true"] == pytest.approx(curves["false"], rel=0, abs=1e-4)
    assert losses(tmp_path / "fsdp") == pytest.approx(curves["false"], rel=0, abs=1e-4)
