"""The generic trainer on a small stand-in task: exact resume, atomic and pruned
checkpoints, the non-finite guard, weight-decay groups, the schedule, metrics.jsonl."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mixmodal.train import checkpoint as ckpt
from mixmodal.train.metrics import read_metrics
from mixmodal.train.optim import build_adamw, lr_multiplier, split_decay
from mixmodal.train.task import OptimizerSpec, TaskBase
from mixmodal.train.trainer import Trainer, TrainerConfig, TrainingError


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.norm = nn.LayerNorm(width)
        self.body = nn.Linear(width, width)
        self.drop = nn.Dropout(0.2)  # draws from the global torch RNG: resume must restore it
        self.head = nn.Linear(width, 1)

    def forward(self, ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids)) + noise  # (B, W)
        return self.head(self.drop(torch.relu(self.body(h)))).squeeze(-1)  # (B,)


class Batches:
    """Batch i is a pure function of i; the state is the next index."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.index = batch_size, 0

    def __next__(self):
        g = torch.Generator().manual_seed(1000 + self.index)
        self.index += 1
        ids = torch.randint(0, 10, (self.batch_size,), generator=g)
        return {"ids": ids, "target": torch.sin(ids.float())}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


@dataclass
class ToyConfig:
    task: str = "toy"
    width: int = 8
    nan_steps: list[int] = field(default_factory=list)  # 0-based updates whose loss is NaN
    crash_at: int = -1  # an update that raises, like a killed process
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        steps=8, batch_size=4, lr=1e-2, warmup_steps=2, weight_decay=0.1, precision="fp32", log_every=2,
        progress=False))


class Crash(Exception):
    pass


class ToyTask(TaskBase):
    progress_keys = ("loss",)

    def __init__(self, config: ToyConfig) -> None:
        self.config = config
        self.noise = torch.Generator().manual_seed(7)

    def architecture(self):
        return {"width": self.config.width}

    def build_models(self):
        return {"net": Net(self.config.width)}

    def optimizers(self, models):
        return {"net": OptimizerSpec(models["net"])}

    def data_iterator(self):
        return Batches(self.config.trainer.batch_size)

    def generators(self):
        return {"noise": self.noise}

    def train_step(self, models, batch, step):
        if step == self.config.crash_at:
            raise Crash(step)
        noise = 0.1 * torch.randn(batch["ids"].shape[0], self.config.width, generator=self.noise)
        prediction = models["net"](batch["ids"], noise)
        mse = (prediction - batch["target"]).pow(2).mean()
        l1 = (prediction - batch["target"]).abs().mean().detach()
        if step in self.config.nan_steps:
            mse = mse * float("nan")
        return {"loss": mse, "l1": l1}

    def evaluate(self, models, step, run_dir):
        return {"weight_norm": float(models["net"].body.weight.norm())}


def toy_config(**trainer) -> ToyConfig:
    config = ToyConfig()
    config.trainer = dataclasses.replace(config.trainer, **trainer)
    return config


def fit(config: ToyConfig, run_dir) -> dict:
    return Trainer(ToyTask(config), config.trainer, run_dir).fit()


def final_state(run_dir):
    last = ckpt.latest_checkpoint(run_dir)
    return load_file(str(last / ckpt.WEIGHTS)), torch.load(last / ckpt.OPTIMIZER, weights_only=True)


def assert_bitwise_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("grad_accumulation", [1, 2])
def test_resume_after_a_crash_is_bitwise_exact(tmp_path, grad_accumulation):
    straight = toy_config(grad_accumulation=grad_accumulation)
    fit(straight, tmp_path / "straight")

    crashed = toy_config(grad_accumulation=grad_accumulation, save_every=3)
    crashed.crash_at = 4  # dies during update 5, after the checkpoint of step 3
    with pytest.raises(Crash):
        fit(crashed, tmp_path / "resumed")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == ["step_000003"]

    torch.manual_seed(12345)  # a fresh process's streams: the checkpoint must restore them all
    resumed = toy_config(grad_accumulation=grad_accumulation, save_every=3, resume=True)
    fit(resumed, tmp_path / "resumed")

    weights_a, optim_a = final_state(tmp_path / "straight")
    weights_b, optim_b = final_state(tmp_path / "resumed")
    assert_bitwise_equal(weights_a, weights_b, "weights")
    assert_bitwise_equal(optim_a, optim_b, "optimizer")
    # the metrics of the redone steps are logged once, not twice
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed", "train")]
    assert steps == [2, 4, 6, 8]


def test_resume_restores_every_random_stream(tmp_path):
    """Dropout (global RNG) and the task's noise generator matter: without restoring them
    the resumed run differs (this guards the test above against passing vacuously)."""
    fit(toy_config(), tmp_path / "straight")
    fit(toy_config(steps=8, save_every=4), tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_000008")
    original = ckpt.set_rng_state
    ckpt.set_rng_state = lambda state, generators=None: None  # "forget" to restore RNG
    try:
        fit(toy_config(save_every=4, resume=True), tmp_path / "resumed")
    finally:
        ckpt.set_rng_state = original
    weights_a, _ = final_state(tmp_path / "straight")
    weights_b, _ = final_state(tmp_path / "resumed")
    assert not all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_resume_refuses_a_different_architecture(tmp_path):
    fit(toy_config(steps=2), tmp_path)
    config = toy_config(steps=4, resume=True)
    config.width = 16
    with pytest.raises(ckpt.CheckpointError, match=r"architecture.*\n  width: 8 -> 16"):
        fit(config, tmp_path)


def test_resume_reads_an_option_the_checkpoint_predates_as_its_default(tmp_path):
    """A checkpoint written before an architecture option existed lacks its key: it resumes when the config sets
    the option's default (the weights are the same), and is refused when it sets anything else."""
    fit(toy_config(steps=2), tmp_path)

    class Later(ToyTask):  # the same task after a `gate` option (default off) was added to its architecture
        def architecture(self):
            return {"width": self.config.width, "gate": self.gate}

        def architecture_defaults(self):
            return {"width": 8, "gate": False}

    for gate in (False, True):
        task = Later(toy_config(steps=3, resume=True))
        task.gate = gate
        if gate:
            with pytest.raises(ckpt.CheckpointError, match=r"gate: False -> True"):
                Trainer(task, task.config.trainer, tmp_path).fit()
        else:
            Trainer(task, task.config.trainer, tmp_path).fit()
            assert ckpt.latest_checkpoint(tmp_path).name == "step_000003"


def test_existing_run_without_resume_is_refused(tmp_path):
    fit(toy_config(steps=2), tmp_path)
    with pytest.raises(TrainingError, match="--resume"):
        fit(toy_config(steps=4), tmp_path)


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = toy_config(steps=2)
    trainer = Trainer(ToyTask(config), config.trainer, tmp_path)
    trainer.fit()
    good = ckpt.latest_checkpoint(tmp_path)
    before = load_file(str(good / ckpt.WEIGHTS))

    def crash(src, dst):  # the process dies here (not an OSError, which is handled: see the disk-full test)
        raise Crash("simulated crash before the rename")

    trainer.step = 5
    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(Crash, match="simulated"):
        trainer.save()
    monkeypatch.undo()
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert any(n.startswith(".tmp-step_000005") for n in leftovers)  # the half-written one is there...
    assert ckpt.latest_checkpoint(tmp_path) == good  # ...but never taken for the latest
    assert_bitwise_equal(before, load_file(str(good / ckpt.WEIGHTS)))
    # and a resumed run loads the good one and cleans the leftover up
    fit(toy_config(steps=3, resume=True), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000003"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(tmp_path, damage, capsys):
    straight = toy_config()
    fit(straight, tmp_path / "straight")
    fit(toy_config(steps=6, save_every=3), tmp_path / "run")  # checkpoints 3 and 6
    weights = tmp_path / "run" / "checkpoints" / "step_000006" / ckpt.WEIGHTS
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte changed: only the hash sees it
        weights.write_bytes(data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])
    else:
        (weights.parent / ckpt.OPTIMIZER).unlink()
    assert ckpt.verify_checkpoint(weights.parent) and not ckpt.verify_checkpoint(weights.parent.with_name("step_000003"))
    fit(toy_config(save_every=3, resume=True), tmp_path / "run")  # on to step 8 from step 3
    said = capsys.readouterr().out
    assert "step_000006 is damaged" in said and "falling back" in said
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "damaged-step_000006" in names  # kept aside, never again taken for the newest
    weights_a, optim_a = final_state(tmp_path / "straight")
    weights_b, optim_b = final_state(tmp_path / "run")
    assert_bitwise_equal(weights_a, weights_b, "weights")  # the run lost only the work after step 3
    assert_bitwise_equal(optim_a, optim_b, "optimizer")


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    fit(toy_config(steps=3, save_every=3), tmp_path)
    (tmp_path / "checkpoints" / "step_000003" / ckpt.WEIGHTS).write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint .* start the run again with another --out"):
        fit(toy_config(steps=4, resume=True), tmp_path)


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, errno_name):
    import errno
    import os

    fit(toy_config(steps=3, save_every=3), tmp_path)
    good = ckpt.latest_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real_save = ckpt.save_file

    def full(tensors, path, metadata=None):  # the weights file is half written when the disk fills up
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), path)

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.CheckpointError) as e:
        fit(toy_config(steps=6, save_every=3, resume=True), tmp_path)
    message = str(e.value)
    assert "cannot write checkpoint step_000006" in message and os.strerror(getattr(errno, errno_name)) in message
    assert f"the last checkpoint, {good}, is intact" in message and "--resume" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]  # no half checkpoint left
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    monkeypatch.undo()
    fit(toy_config(steps=6, save_every=3, resume=True), tmp_path)  # space again: it goes on from step 3
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000006"


def test_mixmodal_train_on_a_disk_that_fills_up_is_one_line(tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    from mixmodal.cli import main
    from mixmodal.train import metrics

    config = Path(__file__).resolve().parents[1] / "configs/tokenizers/vq-tiny.yaml"
    real_log, calls = metrics.MetricsLogger.log, []

    def log(self, step, kind, **fields):  # metrics.jsonl stops taking lines after the checkpoint of step 2
        calls.append(step)
        if step > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_log(self, step, kind, **fields)

    monkeypatch.setattr(metrics.MetricsLogger, "log", log)
    code = main(["train", str(config), "--out", str(tmp_path), "trainer.steps=4", "trainer.save_every=2",
                 "trainer.log_every=1", "trainer.eval_every=0"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and "step_000002, is intact" in err and "--resume" in err


def test_keep_last_k(tmp_path):
    fit(toy_config(steps=6, save_every=1, keep_last=2), tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000005", "step_000006"]
    state = json.loads((tmp_path / "checkpoints" / "step_000006" / ckpt.STATE).read_text())
    assert state["step"] == 6 and state["data"] == {"index": 6} and state["architecture"] == {"width": 8}


def test_nonfinite_step_is_skipped_and_logged(tmp_path):
    config = toy_config(steps=4, save_every=1, keep_last=0)
    config.nan_steps = [3]  # the last update
    fit(config, tmp_path)
    before, after = tmp_path / "checkpoints" / "step_000003", tmp_path / "checkpoints" / "step_000004"
    assert_bitwise_equal(load_file(str(before / ckpt.WEIGHTS)), load_file(str(after / ckpt.WEIGHTS)))
    assert_bitwise_equal(torch.load(before / ckpt.OPTIMIZER, weights_only=True)["net"]["state"],
                         torch.load(after / ckpt.OPTIMIZER, weights_only=True)["net"]["state"])
    bad = read_metrics(tmp_path, "nonfinite")
    assert [r["step"] for r in bad] == [4] and bad[0]["losses"]["loss"] == "nan" and bad[0]["streak"] == 1


def test_training_goes_on_after_a_skipped_step(tmp_path):
    config = toy_config(steps=6, save_every=1, keep_last=0)
    config.nan_steps = [1]
    fit(config, tmp_path)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert "step_000002" not in names and "step_000003" in names  # no checkpoint inside a streak
    weights = [load_file(str(tmp_path / "checkpoints" / n / ckpt.WEIGHTS))["net.body.weight"] for n in names]
    assert all(not torch.equal(a, b) for a, b in zip(weights[1:], weights[2:]))
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [2, 4, 6]


def test_nonfinite_streak_stops_the_run_with_the_last_good_checkpoint(tmp_path):
    config = toy_config(steps=10, save_every=2, max_nonfinite_streak=3)
    config.nan_steps = list(range(2, 10))
    with pytest.raises(TrainingError, match=r"3 consecutive steps.*step_000002"):
        fit(config, tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002"]
    checkpoint = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path))
    net = Net()
    ckpt.load_weights({"net": net}, checkpoint.path / ckpt.WEIGHTS)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_weight_decay_groups():
    net = Net()
    decay, no_decay = split_decay(net)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay) == {id(net.body.weight), id(net.head.weight)}
    assert ids(no_decay) == {id(p) for p in (net.embed.weight, net.norm.weight, net.norm.bias, net.body.bias,
                                             net.head.bias)}
    optimizer = build_adamw(net, lr=1e-3, weight_decay=0.1)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0


def test_schedule_warmup_peak_and_end():
    f = lambda step: lr_multiplier(step, total_steps=111, warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5)  # linear warmup
    assert f(9) == f(10) == 1.0  # peak
    assert f(60) == pytest.approx(0.55)  # halfway through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # the end, and beyond
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    assert lr_multiplier(0, 5, 0, 0.0) == 1.0 and lr_multiplier(4, 5, 0, 0.0) == pytest.approx(0.0)


def test_metrics_jsonl(tmp_path):
    config = toy_config(steps=6, eval_every=3)
    result = fit(config, tmp_path)
    train = read_metrics(tmp_path, "train")
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert set(r["losses"]) == {"loss", "l1"} and r["losses"]["loss"] > 0
        assert set(r["lr"]) == {"net"} and set(r["grad_norm"]) == {"net"}
        assert r["samples_per_s"] > 0 and r["time"] > 0 and r["elapsed"] >= 0
    assert train[0]["lr"]["net"] == pytest.approx(1e-2)  # step index 1: the end of the 2-step warmup
    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [3, 6] and "weight_norm" in evals[0]["metrics"]
    assert json.loads((tmp_path / "eval.json").read_text()) == result and result["step"] == 6


def test_bf16_autocast_runs(tmp_path):
    fit(toy_config(steps=2, precision="bf16"), tmp_path)
    assert len(read_metrics(tmp_path, "train")) == 1


def test_weight_average_resumes_exactly_and_is_what_eval_sees(tmp_path):
    straight = toy_config(ema_decay=0.9)
    result = fit(straight, tmp_path / "straight")
    crashed = toy_config(ema_decay=0.9, save_every=3)
    crashed.crash_at = 4
    with pytest.raises(Crash):
        fit(crashed, tmp_path / "resumed")
    fit(toy_config(ema_decay=0.9, save_every=3, resume=True), tmp_path / "resumed")
    last_a, last_b = (ckpt.latest_checkpoint(tmp_path / r) for r in ("straight", "resumed"))
    average_a, average_b = load_file(str(last_a / "ema.safetensors")), load_file(str(last_b / "ema.safetensors"))
    assert_bitwise_equal(average_a, average_b, "average")
    assert_bitwise_equal(final_state(tmp_path / "straight")[0], final_state(tmp_path / "resumed")[0], "weights")
    # the eval saw the average, and the checkpoint keeps the trained weights (they differ)
    trained = final_state(tmp_path / "straight")[0]["net.body.weight"]
    assert not torch.equal(trained, average_a["net.body.weight"])
    assert result["weight_norm"] == pytest.approx(float(average_a["net.body.weight"].norm()), rel=1e-6)


def test_a_saved_average_reloads_with_its_own_decay(tmp_path):
    """export reads the average with the decay it was trained with, not the run config's."""
    from mixmodal.train.ema import EMA

    net = nn.Linear(3, 2)
    ema = EMA({"net": net}, decay=0.95)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    ema.save(tmp_path / "ema.safetensors")
    again = EMA.from_file({"net": nn.Linear(3, 2)}, tmp_path / "ema.safetensors")
    assert again.decay == 0.95 and again.updates == 1
    assert torch.equal(again.shadow["net.weight"], ema.shadow["net.weight"])
    save_file({"net.weight": torch.zeros(2, 3), "net.bias": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no 'decay' in its metadata"):
        EMA.from_file({"net": nn.Linear(3, 2)}, tmp_path / "other.safetensors")


def test_weight_average_follows_the_updates_with_a_warm_up():
    from mixmodal.train.ema import EMA

    net = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = EMA({"net": net}, decay=0.99)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update()  # rate at update 0: min(0.99, 1/10) -> the average moves 90% of the way
    assert torch.allclose(ema.shadow["net.weight"], torch.full((1, 2), 0.9))
    with ema.swapped_in():
        assert torch.allclose(net.weight, torch.full((1, 2), 0.9))
    assert torch.equal(net.weight, torch.ones(1, 2))


def test_resume_without_the_average_the_run_had_is_refused(tmp_path):
    crashed = toy_config(save_every=3)
    crashed.crash_at = 4
    with pytest.raises(Crash):
        fit(crashed, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="ema_decay"):
        fit(toy_config(ema_decay=0.9, save_every=3, resume=True), tmp_path / "run")


def test_a_metrics_line_torn_by_a_crash_is_dropped_and_the_step_redone(tmp_path):
    fit(toy_config(steps=3, save_every=3, log_every=1), tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tra')  # killed mid-line
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2, 3]
    fit(toy_config(steps=4, save_every=3, log_every=1, resume=True), tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2, 3, 4]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON record"):
        read_metrics(tmp_path)


def test_a_run_killed_before_its_first_checkpoint_starts_afresh_in_the_same_folder(tmp_path, capsys):
    crashed = toy_config(steps=4, save_every=10, log_every=1)
    crashed.crash_at = 2
    with pytest.raises(Crash):
        fit(crashed, tmp_path)
    assert not ckpt.list_checkpoints(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "tra')  # and its last line torn by the kill
    fit(toy_config(steps=4, save_every=10, log_every=1), tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2, 3, 4]  # once each, nothing torn
    assert "held the records of an attempt that wrote no checkpoint" in capsys.readouterr().out


@pytest.mark.slow
def test_kill_9_soak_resumes_bitwise(tmp_path):
    """benchmarks/soak.py, short: a tiny run killed from outside and inside checkpoint writes, resumed
    each time, ends with an uninterrupted run's weights and losses."""
    import subprocess
    import sys
    from pathlib import Path

    soak = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    out = subprocess.run([sys.executable, str(soak), "--kills", "4", "--steps", "60"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout)
    for mode in ("tokens", "latents"):
        assert result[mode]["kills"] >= 2 and result[mode]["weights_equal"] and result[mode]["losses_equal"]
