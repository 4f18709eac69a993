"""A toy regression task for the data-parallel tests, and the script torchrun starts:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_task.py RUN key=value...

Batches are numbered globally: a rank's k-th micro-batch is batch k * world_size + rank,
a pure function of that number. So per update, N processes with grad_accumulation a draw
together exactly the batches one process draws with grad_accumulation N * a, and the two
runs must end with the same weights up to float rounding (the gradient sums are ordered
differently). `nan_batches` poisons chosen batches; `noise` and `dropout` draw from the
task's per-rank generator and the global RNG, which a resume must restore on every rank.
`model=fusion` trains a tiny early-fusion transformer (mixmodal's FusionModel, token mode)
on random id sequences instead of the MLP: transformer blocks for `trainer.parallel`
(tests/test_parallelize.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mixmodal.train import checkpoint as ckpt
from mixmodal.train import distributed
from mixmodal.train.task import OptimizerSpec, TaskBase
from mixmodal.train.trainer import Trainer, TrainerConfig

NUM_FEATURES = 4


@dataclass
class DDPToyConfig:
    task: str = "ddp-toy"
    width: int = 16
    noise: float = 0.0  # input noise from the task's per-rank generator
    dropout: float = 0.0  # draws from the global torch RNG
    nan_batches: list[int] = field(default_factory=list)  # global batch numbers whose loss is NaN
    find_unused_parameters: bool = False  # DDP's: the trainer must handle skipped steps either way
    bypass_wrapper: bool = False  # call models["net"].module: gradients are then not averaged (a bug to catch)
    model: str = "mlp"  # mlp | fusion (a FusionModel of `layers` blocks, next-token loss on random ids)
    tie_embeddings: bool = False  # fusion: lm_head shares embed_tokens' weight
    seq_len: int = 12  # fusion: ids per row
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        steps=6, batch_size=8, lr=3e-2, warmup_steps=1, weight_decay=0.1, precision="fp32", device="cpu",
        log_every=1, save_every=2, keep_last=0, progress=False))


class MLP(nn.Module):
    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(NUM_FEATURES, width), nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B,)
        return self.body(x).squeeze(-1)


def fusion_config(config: DDPToyConfig):
    from mixmodal.model.fusion import ImageConfig, ModelConfig
    from mixmodal.model.transformer import TransformerConfig
    from mixmodal.vocab import NUM_SPECIAL

    return ModelConfig(
        text_vocab_size=NUM_SPECIAL + 40, image=ImageConfig(mode="tokens", num_codes=16, grid_size=2),
        transformer=TransformerConfig(dim=config.width, num_layers=2, num_heads=2, dropout=config.dropout),
        tie_embeddings=config.tie_embeddings)


class GlobalBatches:
    """This rank's micro-batches: numbers rank, rank + world_size, ... of the global sequence."""

    def __init__(self, batch_size: int, seq_len: int = 0, vocab_size: int = 0) -> None:
        self.batch_size, self.rank, self.world_size = batch_size, distributed.rank(), distributed.world_size()
        self.seq_len, self.vocab_size = seq_len, vocab_size  # ids of a fusion model, else regression features
        self.count = 0

    def __next__(self) -> dict:
        number = self.count * self.world_size + self.rank
        self.count += 1
        g = torch.Generator().manual_seed(1000 + number)
        if self.seq_len:
            return {"ids": torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len), generator=g),
                    "number": number}
        x = torch.randn(self.batch_size, NUM_FEATURES, generator=g)
        return {"x": x, "y": torch.sin(x.sum(-1)), "number": number}

    def state_dict(self) -> dict:
        return {"rank": self.rank, "count": self.count}

    def resharded_state(self, states: list[dict], rank: int, world_size: int) -> dict:
        """A run of len(states) processes continued on world_size: the strided layout's rule."""
        from mixmodal.train.sharded import strided_resume

        return {"rank": rank, "count": strided_resume([s["count"] for s in states], rank, world_size)[0]}

    def load_state_dict(self, state: dict) -> None:
        if state["rank"] != self.rank:
            raise AssertionError(f"rank {self.rank} was given rank {state['rank']}'s data state")
        self.count = state["count"]


class DDPToyTask(TaskBase):
    def __init__(self, config: DDPToyConfig) -> None:
        self.config = config
        self.noise = torch.Generator()
        self.ddp_find_unused_parameters = config.find_unused_parameters

    def setup(self, device) -> None:
        self.noise = torch.Generator().manual_seed(distributed.rank_seed(self.config.trainer.seed + 1))

    def architecture(self) -> dict:
        if self.config.model == "fusion":
            return {"width": self.config.width, "model": "fusion", "tie_embeddings": self.config.tie_embeddings}
        return {"width": self.config.width}

    def build_models(self) -> dict:
        if self.config.model == "fusion":
            from mixmodal.model.fusion import FusionModel

            return {"net": FusionModel(fusion_config(self.config))}
        return {"net": MLP(self.config.width, self.config.dropout)}

    def optimizers(self, models) -> dict:
        return {"net": OptimizerSpec(models["net"])}

    def data_iterator(self) -> GlobalBatches:
        if self.config.model == "fusion":
            return GlobalBatches(self.config.trainer.batch_size, self.config.seq_len,
                                 fusion_config(self.config).vocab.size)
        return GlobalBatches(self.config.trainer.batch_size)

    def generators(self) -> dict:
        return {"noise": self.noise}

    def train_step(self, models, batch, step) -> dict:
        if self.config.model == "fusion":
            ids = batch["ids"]
            logits = models["net"](ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            return {"loss": loss * float("nan") if batch["number"] in self.config.nan_batches else loss}
        x = batch["x"]
        if self.config.noise:
            x = x + self.config.noise * torch.randn(x.shape, generator=self.noise)
        net = getattr(models["net"], "module", models["net"]) if self.config.bypass_wrapper else models["net"]
        loss = (net(x) - batch["y"]).pow(2).mean()
        if batch["number"] in self.config.nan_batches:
            loss = loss * float("nan")
        return {"loss": loss}

    def evaluate(self, models, step, run_dir) -> dict:
        net = models["net"]
        first = net.embed_tokens.weight if self.config.model == "fusion" else net.body[0].weight
        return {"rank": distributed.rank(), "weight_norm": float(first.norm())}

    def save_artifacts(self, models, run_dir) -> None:
        (Path(run_dir) / f"artifact_rank{distributed.rank()}.txt").write_text("written\n")


def main(argv: list[str]) -> None:
    """Fit the toy into RUN (argv[0]) with key=value overrides, or with `--config YAML` first
    a `mixmodal train` config; every rank then writes RUN/ranks/rankN.json: the steps it
    wrote checkpoints for, what fit returned and a hash of its final weights and buffers."""
    from mixmodal.config import build_config, to_dict
    from mixmodal.train.run import load_run_config, task_module

    if argv[0] == "--config":
        config = load_run_config(argv[1], argv[3:])
        run_dir, task = Path(argv[2]), task_module(config.task, argv[1]).build_task(config)
    else:
        # the toy's defaults as the preset: a trainer.* override must not reset the other trainer fields
        run_dir, config = Path(argv[0]), build_config(DDPToyConfig, to_dict(DDPToyConfig()), argv[1:])
        task = DDPToyTask(config)
    written: list[int] = []
    save_checkpoint = ckpt.save_checkpoint

    def counting_save(run, step, *args, **kwargs):
        written.append(step)
        return save_checkpoint(run, step, *args, **kwargs)

    ckpt.save_checkpoint = counting_save
    rank = os.environ.get("RANK", "0")  # the process group exists only inside fit
    torch.manual_seed(4321 + int(rank))  # a stray state the trainer must not depend on
    trainer = Trainer(task, config.trainer, run_dir)
    result = trainer.fit()
    digest = hashlib.sha256()  # of this rank's weights (its shards under trainer.parallel.dp=fsdp)
    for model_name, model in sorted(trainer.models.items()):
        for key, value in sorted(model.state_dict().items()):
            value = value.to_local() if hasattr(value, "to_local") else value
            digest.update(f"{model_name}.{key}".encode() + value.detach().cpu().numpy().tobytes())
    report = {"checkpoint_writes": written, "result": result, "process_group_left": distributed.is_initialized(),
              "state_hash": digest.hexdigest()}
    out = run_dir / "ranks" / f"rank{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
