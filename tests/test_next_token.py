"""Next-token loss: cross-entropy against torch's, the z-loss by hand, the group breakdown."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixmodal.objectives.next_token import IGNORE_INDEX, next_token_loss


def batch(B=3, T=7, V=11, seed=0, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignored] = IGNORE_INDEX
    return logits, labels


def test_ce_matches_torch_cross_entropy_and_gradients_agree():
    logits, labels = batch()
    ours_logits = logits.clone().requires_grad_()
    torch_logits = logits.clone().requires_grad_()
    ce = next_token_loss(ours_logits, labels, z_loss_weight=0.0)["ce"]
    reference = F.cross_entropy(torch_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(ce, reference)
    ce.backward()
    reference.backward()
    torch.testing.assert_close(ours_logits.grad, torch_logits.grad)


def test_z_loss_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0], [5.0, 5.0, 5.0]]])  # (1, 3, 3)
    labels = torch.tensor([[2, IGNORE_INDEX, 0]])
    out = next_token_loss(logits, labels, z_loss_weight=1e-2)
    lse0 = torch.log(torch.tensor(1.0 + torch.e + torch.e**2))
    lse2 = 5.0 + torch.log(torch.tensor(3.0))
    torch.testing.assert_close(out["z_loss"], 1e-2 * (lse0**2 + lse2**2) / 2)
    torch.testing.assert_close(out["ce"], ((lse0 - 2.0) + (lse2 - 5.0)) / 2)


def test_groups_that_partition_the_positions_average_back_to_ce():
    logits, labels = batch(B=4, T=9)
    text = torch.rand(4, 9, generator=torch.Generator().manual_seed(1)) < 0.5
    out = next_token_loss(logits, labels, groups={"text": text, "image": ~text, "none": torch.zeros_like(text)})
    labelled = labels != IGNORE_INDEX
    n_text, n_image = (text & labelled).sum(), (~text & labelled).sum()
    assert n_text > 0 and n_image > 0
    weighted = (out["text_ce"] * n_text + out["image_ce"] * n_image) / (n_text + n_image)
    torch.testing.assert_close(weighted, out["ce"])
    assert out["none_ce"].item() == 0.0
    assert not out["text_ce"].requires_grad and set(out) == {"ce", "z_loss", "text_ce", "image_ce", "none_ce"}


def test_no_labelled_position_gives_zeros_that_backpropagate():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    out = next_token_loss(logits, labels, groups={"text": torch.ones(2, 3, dtype=torch.bool)})
    assert out["ce"].item() == 0.0 and out["z_loss"].item() == 0.0 and out["text_ce"].item() == 0.0
    (out["ce"] + out["z_loss"]).backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_non_finite_logits_at_ignored_positions_do_not_leak():
    logits, labels = batch()
    labels[0, 0] = IGNORE_INDEX
    logits[0, 0] = float("inf")
    out = next_token_loss(logits, labels)
    assert torch.isfinite(out["ce"]) and torch.isfinite(out["z_loss"])


def test_bf16_logits_give_float32_losses():
    logits, labels = batch()
    bf16 = logits.bfloat16().requires_grad_()
    out = next_token_loss(bf16, labels, groups={"all": torch.ones_like(labels, dtype=torch.bool)})
    assert all(v.dtype == torch.float32 for v in out.values())
    reference = F.cross_entropy(bf16.detach().float().flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out["ce"], reference)
    (out["ce"] + out["z_loss"]).backward()
    assert bf16.grad.dtype == torch.bfloat16


def test_bad_shapes_fail_with_the_fix():
    logits, labels = batch()
    with pytest.raises(ValueError, match="shift them"):
        next_token_loss(logits, labels[:, :-1])
    with pytest.raises(TypeError, match="int64"):
        next_token_loss(logits, labels.int())
    with pytest.raises(ValueError, match="group 'text' must be a bool mask"):
        next_token_loss(logits, labels, groups={"text": torch.ones_like(labels)})
