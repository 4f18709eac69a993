"""Data parallelism under torchrun (gloo on CPU): 2 processes train the toy of ddp_task.py
as 1 process does with twice the gradient accumulation; only rank 0 writes; a resumed
2-process run continues exactly; a checkpoint refuses another number of processes; the VQ
tokenizer with a GAN keeps its ranks identical; gradients that bypass DDP are caught;
image batches shard in batch-sized blocks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_task import DDPToyConfig, DDPToyTask
from mixmodal.train import checkpoint as ckpt
from mixmodal.train import distributed
from mixmodal.train.image_data import ImageBatches
from mixmodal.train.metrics import read_metrics
from mixmodal.train.trainer import Trainer

WORKER = Path(__file__).with_name("ddp_task.py")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAN_BATCHES = "nan_batches=[5]"  # batch 5 = rank 1's batch of update 3 = micro-batch 1 of update 3 on one process
# per-rank random streams, which a resume must restore rank by rank; a skipped update after
# the resume, this time with DDP's find_unused_parameters (another path through its reducer)
NOISY = ("noise=0.05", "dropout=0.2", "nan_batches=[8]", "find_unused_parameters=true")


def torchrun(*args: str | Path, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """`python ddp_task.py ARGS` in `nproc` processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0 or not check, f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run_dir) / ckpt.WEIGHTS))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(run_dir, NAN_BATCHES)
    return run_dir


def test_two_processes_match_one_with_twice_the_accumulation(two_processes, tmp_path):
    config = DDPToyConfig(nan_batches=[5])
    config.trainer = dataclasses.replace(config.trainer, grad_accumulation=2)
    Trainer(DDPToyTask(config), config.trainer, tmp_path).fit()

    one, two = final_weights(tmp_path), final_weights(two_processes)
    assert one.keys() == two.keys()
    for key in one:  # the same batches per update; only the order of the gradient sums differs
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-6, msg=key)
    assert not torch.equal(one["net.body.0.weight"], load_file(
        str(ckpt.checkpoint_dir(tmp_path, 2) / ckpt.WEIGHTS))["net.body.0.weight"])  # it did train

    # the logged losses are means over ranks, so they equal the single process's means over micro-batches
    logged = {r["step"]: r["losses"]["loss"] for r in read_metrics(two_processes, "train")}
    expected = {r["step"]: r["losses"]["loss"] for r in read_metrics(tmp_path, "train")}
    assert logged.keys() == expected.keys() == {1, 2, 4, 5, 6}
    assert logged == pytest.approx(expected, rel=1e-5)
    # rank 1's NaN made both ranks skip update 3, as the NaN micro-batch does on one process
    assert [r["step"] for r in read_metrics(two_processes, "nonfinite")] == [3]


def rank_reports(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_only_rank_zero_writes(two_processes):
    reports = rank_reports(two_processes)
    assert reports[0]["state_hash"] == reports[1]["state_hash"]  # the ranks end with identical models
    assert [r["checkpoint_writes"] for r in reports] == [[2, 4, 6], []]
    assert reports[0]["result"] == reports[1]["result"] == json.loads((two_processes / "eval.json").read_text())
    assert not any(r["process_group_left"] for r in reports)  # fit destroyed the group it created
    assert sorted(p.name for p in two_processes.glob("artifact_rank*")) == ["artifact_rank0.txt"]
    records = read_metrics(two_processes)
    assert len(records) == len({(r["step"], r["kind"]) for r in records})  # one writer: nothing twice
    assert [r["metrics"]["rank"] for r in records if r["kind"] == "eval"] == [0]

    last = ckpt.read_checkpoint(ckpt.latest_checkpoint(two_processes))
    assert last.state["world_size"] == 2
    assert last.state["data"] == [{"rank": 0, "count": 6}, {"rank": 1, "count": 6}]
    rng = torch.load(last.path / ckpt.RNG, weights_only=True)
    assert len(rng["ranks"]) == 2
    noise = [r["generators"]["noise"] for r in rng["ranks"]]
    assert not torch.equal(*noise) and not torch.equal(*(r["torch"] for r in rng["ranks"]))  # streams per rank


def test_resuming_with_another_number_of_processes_fails_clearly(two_processes, tmp_path):
    shutil.copytree(two_processes, tmp_path / "run")
    config = DDPToyConfig(nan_batches=[5])
    config.trainer = dataclasses.replace(config.trainer, steps=8, resume=True)
    with pytest.raises(ckpt.CheckpointError, match=r"written by a run of 2.*torchrun --nproc_per_node 2"):
        Trainer(DDPToyTask(config), config.trainer, tmp_path / "run").fit()


def test_gradients_that_bypass_the_wrapper_are_caught(tmp_path):
    done = torchrun(tmp_path, "bypass_wrapper=true", "trainer.steps=2", check=False)
    assert done.returncode != 0
    assert "copies of net have drifted apart" in done.stdout + done.stderr
    assert not (tmp_path / "eval.json").exists()


def test_image_batches_shard_shapes_in_batch_blocks():
    """Rank r of 2 draws the single process's batches r, r + 2, ...: per update the two ranks
    see exactly what one process sees with twice the accumulation. A rank resumes its own."""
    spec, resolution, batch_size = "shapes:split=train", 32, 2
    single = ImageBatches(spec, resolution, batch_size, rank=0, world_size=1)
    expected = [next(single) for _ in range(6)]
    ranks = [ImageBatches(spec, resolution, batch_size, rank=r, world_size=2) for r in (0, 1)]
    for k in range(2):
        for r in (0, 1):
            assert torch.equal(next(ranks[r]), expected[2 * k + r])
    resumed = ImageBatches(spec, resolution, batch_size, rank=1, world_size=2)
    resumed.load_state_dict(ranks[1].state_dict())
    assert torch.equal(next(resumed), expected[5])
    assert ImageBatches(spec, resolution, batch_size, rank=1, world_size=2).source.rank == 1  # other sources shard


def test_collectives_without_a_process_group():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert not distributed.init_from_env("cpu")  # no torchrun environment: nothing to join
    assert distributed.all_reduce_mean({"b": 2, "a": 1.5}) == {"b": 2.0, "a": 1.5}
    assert distributed.all_true(True) and not distributed.all_true(False)
    assert distributed.gather_objects({"x": 1}) == [{"x": 1}]
    assert distributed.rank_seed(7) == 7
    distributed.barrier()
    distributed.destroy()


def test_a_resumed_two_process_run_continues_exactly(tmp_path):
    torchrun(tmp_path / "straight", *NOISY)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for later in ("step_000004", "step_000006"):  # as if killed after the checkpoint of step 2
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / later)
    torchrun(tmp_path / "resumed", *NOISY, "trainer.resume=true")

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed", "train")]
    assert steps == [1, 2, 3, 4, 6]  # batch 8 = rank 0's of update 5
    assert [r["step"] for r in read_metrics(tmp_path / "resumed", "nonfinite")] == [5]


def test_vq_tokenizer_with_a_gan_keeps_the_ranks_identical(tmp_path):
    """The quantizer edits its codebook in the forward pass from each rank's own batch (dead
    codes restart every step here); the trainer must copy rank 0's back, or the ranks drift
    apart silently. Also runs the GAN's second optimizer and adaptive weight under DDP,
    with gradient accumulation."""
    torchrun("--config", CONFIGS / "tokenizers" / "vq-tiny.yaml", tmp_path, "trainer.device=cpu", "trainer.steps=4",
             "trainer.batch_size=4", "trainer.grad_accumulation=2", "tokenizer.vq.restart_after=1",
             "loss.gan.weight=0.1", "loss.gan.start_step=1", "eval.num_images=8", "eval.num_samples=4")
    reports = rank_reports(tmp_path)
    assert reports[0]["state_hash"] == reports[1]["state_hash"]
    assert [r["checkpoint_writes"] for r in reports] == [[4], []]
    train = read_metrics(tmp_path, "train")
    assert {"disc_loss", "g_adv", "rec"} <= set(train[-1]["losses"]) and set(train[-1]["grad_norm"]) == {
        "tokenizer", "discriminator"}
    assert (tmp_path / "tokenizer" / "config.yaml").is_file()
