"""On one CUDA GPU (skipped without one; `make bench-gpu` runs them, benchmarks/gpu.py): bf16 training,
FlexAttention against the reference attention on packed rows, torch.compile against eager, and FSDP2
on one device (bf16 parameters, fp32 reductions) with its sharded checkpoints resuming bitwise."""

from __future__ import annotations

import pytest
import torch

from ddp_task import DDPToyTask
from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.masks import AttentionMask
from mixmodal.model.transformer import TransformerConfig
from mixmodal.train.trainer import Trainer
from test_parallelize import FSDP, cut_after, final_weights, group_of_one, losses, toy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = "trainer.device=cuda"


def _model(backend: str = "auto") -> FusionModel:
    torch.manual_seed(0)
    config = ModelConfig(text_vocab_size=512, image=ImageConfig(mode="tokens", num_codes=256, grid_size=4),
                         transformer=TransformerConfig(dim=128, num_layers=2, num_heads=4, num_kv_heads=2),
                         attention_backend=backend)
    return FusionModel(config).cuda()


def _packed(length: int = 256, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, document_ids (documents of 50..120 positions) and image_ids (a 16-position block per document)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, 500, (batch, length), generator=g)
    documents = torch.zeros(batch, length, dtype=torch.long)
    images = torch.full((batch, length), -1, dtype=torch.long)
    for row in range(batch):
        start, doc = 0, 0
        while start < length:
            n = int(torch.randint(50, 120, (1,), generator=g))
            documents[row, start:start + n] = doc
            images[row, start + 10:min(start + 26, start + n, length)] = doc
            start, doc = start + n, doc + 1
    return ids.cuda(), documents.cuda(), images.cuda()


def test_bf16_autocast_training_follows_fp32():
    model = _model("sdpa")
    ids, _, _ = _packed()
    with torch.no_grad():
        fp32 = model(ids[:, :-1]).logits.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(ids[:, :-1]).logits.float()
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=5e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(20):  # one batch, learned: the loss falls under bf16
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else float(loss)
    assert float(loss) < 0.7 * first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_attention_matches_the_reference_on_packed_rows(dtype):
    ids, documents, images = _packed()
    flex = AttentionMask.build(documents, images)  # auto: FlexAttention on CUDA
    assert flex.kind == "flex"
    reference = AttentionMask.build(documents, images, backend="reference")
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(2, 4, 256, 32, device="cuda", generator=g, dtype=dtype) for _ in range(3))
    tolerance = 2e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(flex.attend(q, k, v), reference.attend(q, k, v), rtol=0, atol=tolerance)
    with torch.no_grad():  # the whole model, FlexAttention against SDPA with the dense mask
        logits = {backend: _model(backend)(ids, document_ids=documents, image_ids=images).logits
                  for backend in ("flex", "sdpa")}
    torch.testing.assert_close(logits["flex"], logits["sdpa"], rtol=0, atol=2e-3)


def _fit(run, *overrides: str) -> Trainer:
    config = toy(*overrides)
    trainer = Trainer(DDPToyTask(config), config.trainer, run)
    trainer.fit()
    return trainer


def test_compile_on_cuda_gives_the_eager_losses(tmp_path):
    common = ("model=fusion", CUDA, "trainer.steps=4", "trainer.save_every=0", "width=64")
    _fit(tmp_path / "eager", *common)
    _fit(tmp_path / "compiled", *common, "trainer.parallel.compile=true",
         "trainer.parallel.activation_checkpointing=selective")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=0, abs=1e-3)


def test_fsdp2_on_one_device_trains_in_bf16_and_resumes_bitwise(tmp_path):
    """MixedPrecisionPolicy(bf16 parameters, fp32 reductions) on one GPU (an nccl group of one), selective
    activation checkpointing: the curve follows plain bf16 autocast, and a resume from the sharded
    checkpoint of step 2 continues bitwise."""
    common = (*FSDP, CUDA, "trainer.precision=bf16", "trainer.steps=6", "width=64",
              "trainer.parallel.activation_checkpointing=selective")
    torch.cuda.set_device(0)
    with group_of_one("nccl"):
        trainer = _fit(tmp_path / "straight", *common)
        assert type(trainer.models["net"].embed_tokens.weight).__name__ == "DTensor"
        cut_after(tmp_path / "straight", 2, tmp_path / "resumed")
        _fit(tmp_path / "resumed", *common, "trainer.resume=true")
    _fit(tmp_path / "plain", *common, "trainer.parallel.dp=ddp")  # no group: plain bf16 autocast
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert losses(tmp_path / "straight") == pytest.approx(losses(tmp_path / "plain"), rel=2e-2)
