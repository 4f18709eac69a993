"""Next-token cross-entropy with Chameleon's z-loss and a per-group breakdown for logging.

Axes: B batch rows, T positions, V vocabulary (`Vocab.size`).

Labels arrive already shifted: labels[b, t] is the target of the prediction made at
position t, and -100 marks a position with no target (padding, a document's last token,
a sentinel the CM3 transform exempts, latent image positions). Both terms come from one
logsumexp over the vocabulary:

    ce      = mean over labelled positions of  logsumexp(logits) - logits[label]
    z_loss  = z_loss_weight * mean over labelled positions of  logsumexp(logits)^2

With `weights` (B, T) both means are weighted (sum w * term / sum w): retrieval-augmented
training gives retrieved documents' tokens RA-CM3's alpha.

The z-loss (PaLM; Chameleon's stability recipe) pulls the softmax normaliser towards 1; without it,
mixed-modal training drifts the logits upward until bf16 runs diverge. Everything is
computed in float32 whatever the dtype of the logits, and with masks rather than by
selecting the labelled rows, so the shapes never depend on the data (no host sync, no
recompilation under torch.compile).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label of a position without a target (same as torch's default)


def next_token_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    z_loss_weight: float = 1e-5,
    groups: dict[str, Tensor] | None = None,
    weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """{"ce", "z_loss", and "<group>_ce" for each group} from logits (B, T, V) and labels (B, T).

    ce and z_loss carry gradients (the training loss is their sum); each "<group>_ce" is
    the cross-entropy averaged over the labelled positions of that group (a bool mask
    (B, T), e.g. "text", "image"), detached, 0.0 when the group has no labelled position.
    With no labelled position at all, ce and z_loss are zeros that still backpropagate
    (into zero gradients), so a batch of ignored positions does not break the step."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the (B, T) of logits {tuple(logits.shape)}; "
            "shift them before the loss (labels[:, t] is the target of position t)"
        )
    if labels.dtype != torch.long:
        raise TypeError(f"labels must be int64 (torch.long), got {labels.dtype}")
    groups = groups or {}
    for name, mask in groups.items():
        if mask.shape != labels.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"group {name!r} must be a bool mask of shape {tuple(labels.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )

    labelled = labels != IGNORE_INDEX  # (B, T)
    logits32 = logits.float()  # a no-op for float32 logits; the one float32 copy otherwise
    normaliser = torch.logsumexp(logits32, dim=-1)  # (B, T)
    safe_labels = torch.where(labelled, labels, 0)  # -100 is no index; its row is masked out below
    target_logit = logits32.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    zero = normaliser.new_zeros(())
    # torch.where, not a product with the mask: a non-finite logit at an ignored position
    # must not turn the loss into nan.
    per_position = torch.where(labelled, normaliser - target_logit, zero)  # (B, T)
    squared_normaliser = torch.where(labelled, normaliser.square(), zero)  # (B, T)
    if weights is None:
        count = labelled.sum().clamp(min=1)
        out = {"ce": per_position.sum() / count, "z_loss": z_loss_weight * squared_normaliser.sum() / count}
    else:
        if weights.shape != labels.shape:
            raise ValueError(f"weights {tuple(weights.shape)} must match labels {tuple(labels.shape)}")
        w = torch.where(labelled, weights.float(), zero)
        total = w.sum().clamp(min=1e-8)
        out = {"ce": (w * per_position).sum() / total, "z_loss": z_loss_weight * (w * squared_normaliser).sum() / total}
    detached = per_position.detach()
    for name, mask in groups.items():
        in_group = mask & labelled
        out[f"{name}_ce"] = torch.where(in_group, detached, zero).sum() / in_group.sum().clamp(min=1)
    return out
