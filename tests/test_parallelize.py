"""trainer.parallel (mixmodal/train/parallelize.py) on the CPU: FSDP2 over 2 gloo processes
trains as one process does with the same global batch; its checkpoints are sharded
(train/sharded.py), resume exactly on as many processes and continue the loss curve on another
number (2 -> 1, 1 -> 2); `mixmodal export` writes the model folder from them; activation
checkpointing changes no gradient; torch.compile gives the same losses; models without transformer
blocks and settings that cannot work are refused in one line. The 2-process runs use the DDP
tests' harness (ddp_task.py, `model=fusion`: a tiny FusionModel whose blocks are
`transformer.layers`)."""

from __future__ import annotations

import dataclasses
import json
import socket
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.utils._python_dispatch import TorchDispatchMode

from ddp_task import DDPToyConfig, DDPToyTask, fusion_config
from mixmodal.config import ConfigError, build_config, to_dict
from mixmodal.model.fusion import FusionModel
from mixmodal.train import checkpoint as ckpt
from mixmodal.train import sharded
from mixmodal.train.metrics import read_metrics
from mixmodal.train.parallelize import apply_activation_checkpointing, parallelize, transformer_blocks
from mixmodal.train.task import OptimizerSpec
from mixmodal.train.trainer import Trainer, TrainingError
from test_distributed import torchrun
from test_fusion_training import TINY, tokenizers  # noqa: F401 (a fixture)

FSDP = ("model=fusion", "tie_embeddings=true", "trainer.parallel.dp=fsdp")


def toy(*overrides: str) -> DDPToyConfig:
    return build_config(DDPToyConfig, to_dict(DDPToyConfig()), list(overrides))


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["losses"]["loss"] for r in read_metrics(run_dir, "train")}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    """The full weights of a run's latest checkpoint, sharded or not."""
    return sharded.read_model_weights(ckpt.latest_checkpoint(run_dir))


@contextmanager
def group_of_one(backend: str = "gloo"):
    """A process group of this one process, made by the caller (fit leaves it alone): trainer.parallel.dp=fsdp
    then shards, trivially, over one device (the GPU tests' FSDP2 on one device, nccl)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def cut_after(run_dir, step: int, to) -> None:
    """A copy of a run as if killed after the checkpoint of `step`."""
    shutil.copytree(run_dir, to)
    for later in ckpt.list_checkpoints(to):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)


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

    # every rank wrote its own shards (sharded.py), listed in the manifest; read whole, they are the single
    # process's weights (the full format, tied lm_head under both names); optimizer states by parameter name
    path = ckpt.latest_checkpoint(tmp_path / "fsdp")
    shards = {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert shards | {"rng.pt", "trainer_state.json"} <= set(json.loads((path / ckpt.MANIFEST).read_text())["files"])
    state = ckpt.read_checkpoint(path).state
    assert (state["format"], state["world_size"], len(state["data"])) == ("dcp", 2, 2) and not ckpt.verify_checkpoint(path)
    weights = {name: final_weights(tmp_path / name) for name in ("fsdp", "one")}
    assert weights["fsdp"].keys() == weights["one"].keys() and "net.lm_head.weight" in weights["one"]
    for key in weights["one"]:
        torch.testing.assert_close(weights["fsdp"][key], weights["one"][key], rtol=0, atol=1e-4, msg=key)
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for key, value in weights["one"].items():
        if key != "net.lm_head.weight":  # (tied: its state is embed_tokens')
            assert list(saved[f"optimizers.net.state.{key[4:]}.exp_avg"].size) == list(value.shape), key
    assert (tmp_path / "fsdp" / "eval.json").is_file() and (tmp_path / "fsdp" / "artifact_rank0.txt").is_file()


@pytest.mark.slow
def test_an_fsdp_run_resumes_exactly_and_under_ddp_too(tmp_path):
    """Per-rank dropout, tied weights, bf16 (the mixed-precision policy), selective AC: kill
    after the (sharded) checkpoint of step 2, resume on 2 processes, and the curve continues
    bitwise; the same checkpoint resumes under DDP too (to float tolerance: the reductions differ)."""
    common = (*FSDP, "dropout=0.1", "trainer.precision=bf16", "trainer.parallel.activation_checkpointing=selective")
    torchrun(tmp_path / "straight", *common)
    for name, dp in (("resumed", "fsdp"), ("as_ddp", "ddp")):
        cut_after(tmp_path / "straight", 2, tmp_path / name)
        torchrun(tmp_path / name, *common, f"trainer.parallel.dp={dp}", "trainer.resume=true")

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert losses(tmp_path / "as_ddp") == pytest.approx(losses(tmp_path / "straight"), rel=0, abs=1e-3)


def test_fsdp_in_a_group_of_one_shards_and_resumes_bitwise(tmp_path):
    """FSDP2 on one device (a process group of one): the parameters are DTensors, the checkpoints
    sharded; a resume continues bitwise, and the same checkpoint resumes without a group too."""
    common = (*FSDP, "trainer.steps=4", "dropout=0.1")

    def fit(run, *more):
        config = toy(*common, *more)
        trainer = Trainer(DDPToyTask(config), config.trainer, run)
        trainer.fit()
        return trainer

    with group_of_one():
        assert type(fit(tmp_path / "straight").models["net"].embed_tokens.weight).__name__ == "DTensor"
        cut_after(tmp_path / "straight", 2, tmp_path / "resumed")
        fit(tmp_path / "resumed", "trainer.resume=true")
    cut_after(tmp_path / "straight", 2, tmp_path / "plain")
    fit(tmp_path / "plain", "trainer.resume=true")  # no group: the plain model
    assert sharded.is_sharded(ckpt.latest_checkpoint(tmp_path / "straight"))
    straight = final_weights(tmp_path / "straight")
    for name in ("resumed", "plain"):
        resumed = final_weights(tmp_path / name)
        assert all(torch.equal(straight[key], resumed[key]) for key in straight), name
        assert losses(tmp_path / name) == losses(tmp_path / "straight"), name


def test_a_sharded_checkpoint_that_cannot_be_written_leaves_the_last_one(tmp_path, monkeypatch):
    """A full disk while the shards are written: one CheckpointError naming the intact checkpoint, and no
    partial directory (a checkpoint exists only once renamed into place)."""
    import errno

    import torch.distributed.checkpoint as dcp

    real, calls = dcp.save, []

    def save(state, **kwargs):
        calls.append(kwargs["checkpoint_id"])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, **kwargs)

    monkeypatch.setattr(dcp, "save", save)
    config = toy(*FSDP, "trainer.steps=4")
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint step_000004 .*No space left on device\)"
                                                   r": the last checkpoint, .*step_000002, is intact"):
        Trainer(DDPToyTask(config), config.trainer, tmp_path).fit()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]
    assert not ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_000002")


# --- resharding: another number of processes ----------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)  # several torchruns: minutes on 2 busy cores
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path):
    """The same global batch (2 ranks x accumulation 2 = 1 x 4), fp32, no per-rank randomness: a
    run saved by 2 processes continues on 1, and one saved by 1 continues on 2, on the loss curve of
    the run it came from within fp32 noise (the gradient sums are only added in another order); a
    1-process sharded checkpoint resumed on 1 process stays bitwise."""
    common = (*FSDP, "trainer.steps=6", "trainer.lr=1e-2")
    two, four = "trainer.grad_accumulation=2", "trainer.grad_accumulation=4"

    def one_process(run, *overrides):
        config = toy(*common, four, *overrides)
        Trainer(DDPToyTask(config), config.trainer, run).fit()

    torchrun(tmp_path / "two", *common, two)
    cut_after(tmp_path / "two", 2, tmp_path / "two_then_one")
    one_process(tmp_path / "two_then_one", "trainer.resume=true")
    one_process(tmp_path / "one")
    cut_after(tmp_path / "one", 2, tmp_path / "one_then_two")
    torchrun(tmp_path / "one_then_two", *common, two, "trainer.resume=true")
    cut_after(tmp_path / "one", 4, tmp_path / "one_then_one")
    one_process(tmp_path / "one_then_one", "trainer.resume=true")

    for straight, resumed in (("two", "two_then_one"), ("one", "one_then_two")):
        curve, continued = losses(tmp_path / straight), losses(tmp_path / resumed)
        assert continued.keys() == set(range(1, 7))
        assert continued == pytest.approx(curve, rel=0, abs=1e-5), (straight, resumed)
        a, b = final_weights(tmp_path / straight), final_weights(tmp_path / resumed)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
        state = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / resumed)).state
        assert len(state["data"]) == (1 if resumed.endswith("one") else 2)
    # the data continued from the global batch where it stopped: the same batches per update
    assert [s["count"] for s in ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "one_then_two")).state["data"]] \
        == [12, 12]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "one_then_one")
    assert all(torch.equal(a[key], b[key]) for key in a) and losses(tmp_path / "one_then_one") == losses(tmp_path / "one")


def test_strided_data_positions_reshard_without_skipping():
    """Rank r of N reads items r, r + N, ...: M ranks continue from the first item some rank had not read."""
    assert sharded.strided_resume([3, 3], 0, 1) == (6, 6, 0)  # 2 -> 1: items 0..5 read
    assert [sharded.strided_resume([5], r, 2)[0] for r in (0, 1)] == [3, 2]  # 1 -> 2: items 5 (rank 1), 6 (rank 0)
    assert sharded.strided_resume([4, 2], 0, 1) == (5, 5, 1)  # rank 0 had read past item 5: item 6 is read again
    assert [sharded.strided_resume([2, 2, 2], r, 2)[0] for r in (0, 1)] == [3, 3]  # 3 -> 2


# --- mixmodal export, and the command line under torchrun -------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)  # several torchruns: minutes on 2 busy cores
def test_mixmodal_train_under_fsdp_resumes_on_one_process_and_exports(tokenizers, tmp_path):
    """`torchrun --nproc_per_node 2 -m mixmodal train tiny-tokens.yaml trainer.parallel.dp=fsdp`, then
    its resume on one process (the fusion pipeline's document position resharded), then `mixmodal
    export` of a 2-process and of the 1-process checkpoint: model folders that load, with the
    checkpoint's weights; the last one is bitwise the RUN/model training wrote."""
    from mixmodal.cli import main
    from mixmodal.model.io import load_model
    from mixmodal.train.run import load_run_config, train
    from mixmodal.weights import verify_folder

    run = tmp_path / "run"
    common = ["trainer.parallel.dp=fsdp", f"data.image_tokenizer={tokenizers['vq']}",
              f"data.text_tokenizer={tokenizers['text']}", "trainer.save_every=2", "trainer.keep_last=0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mixmodal",
               "train", str(TINY["tokens"]), "--out", str(run), *common, "trainer.steps=4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert sharded.is_sharded(ckpt.checkpoint_dir(run, 4))
    train(load_run_config(TINY["tokens"], [*common, "trainer.steps=6", "trainer.grad_accumulation=2",
                                           "trainer.resume=true"]), run)
    assert sorted(losses(run)) == [2, 4, 6]
    state = ckpt.read_checkpoint(ckpt.checkpoint_dir(run, 6)).state
    assert state["world_size"] == 1 and state["data"][0]["next_document"] > 0

    for step in (4, 6):
        out = tmp_path / f"export{step}"
        assert main(["export", str(run), "--step", str(step), "--out", str(out)]) == 0
        assert verify_folder(out) and (out / "text_tokenizer").is_dir() and (out / "image_tokenizer").is_dir()
        saved = {k[len("model."):]: v for k, v in sharded.read_model_weights(ckpt.checkpoint_dir(run, step)).items()}
        model = load_model(out).state_dict()
        assert model.keys() == saved.keys()
        assert all(torch.equal(model[k], saved[k]) for k in saved)
    final = load_model(run / "model").state_dict()
    assert all(torch.equal(final[k], model[k]) for k in final)
    assert main(["export", str(run), "--step", "6", "--out", str(out)]) == 1  # exists: --force replaces it
    assert main(["export", str(run), "--step", "6", "--out", str(out), "--force"]) == 0


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
    # rows of 150 ids: longer than a band, so the compiled CPU step takes banded_attention (model/masks.py)
    common = ("model=fusion", "trainer.steps=3", "trainer.save_every=0", "width=32", "seq_len=150")
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
