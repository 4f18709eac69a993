"""Half-precision inference that casts the weights once.

Under `torch.autocast` every fp32 weight is cast to bf16 (or fp16) each time an op uses it. Autocast's
cast cache lives only inside one `with torch.autocast(...)` block, and the engine enters one per forward
(a generator cannot hold one open across its yields: the autocast state is thread-local and would leak
into the caller), so every decoding step re-reads each fp32 weight, writes a half copy and reads that:
8 bytes a weight where a half weight needs 2, in a step that is bound by reading the weights.

`cast_linears(model, dtype)` gives a view of the model whose `nn.Linear` weights and biases are already
half: a shallow copy whose other parameters and buffers are the model's own tensors (no extra memory
for them). Autocast rounds an fp32 weight to half exactly as `.to(dtype)` does, and leaves a weight
that is already half as it is, so under the same autocast the copy computes bitwise what the model
does (`tests/test_inference_engine.py -k cast_once`). A weight shared with a module that is not a Linear
(tied embeddings: the embedding table stays fp32, so the residual stream does) is left as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mixmodal.inference.compiled import check_compiler, compile_blocks
from mixmodal.model.transformer import fuse_projections


def cast_linears(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` for inference whose plain nn.Linear parameters are `dtype`; everything else is shared."""
    linear_params = {id(p) for m in model.modules() if type(m) is nn.Linear for p in m.parameters(recurse=False)}
    other_params = {id(p) for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)}
    memo: dict[int, object] = {}
    for p in model.parameters():
        if id(p) in linear_params and id(p) not in other_params:
            memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        else:
            memo[id(p)] = p
    for b in model.buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo).eval()


def inference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`cast_linears`, then q/k/v and gate/up fused into one matmul each (model/transformer.py
    `fuse_projections`): the same products to within the half dtype's rounding of a different summation
    order, in fewer, larger matmuls."""
    return fuse_projections(cast_linears(model, dtype))


class HalfWeights:
    """The engine's inference copy (`inference_copy`: half weights, or float32 ones when the copy is made only
    to be compiled), made at first use and made again whenever an in-place change to the model's parameters
    (an optimizer step, `load_state_dict`, a LoRA merge) bumped their version counters, so an engine never
    computes with stale weights. `compile`: its blocks' fixed-shape parts compiled (inference/compiled.py)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, fuse: bool = True, compile: bool = False) -> None:
        self.source, self.dtype, self.fuse, self.compile = model, dtype, fuse, compile
        if compile:  # before any step: say so if the run-time C++ compiler is missing
            check_compiler(next(model.parameters()).device)
        self._copy: nn.Module | None = None
        self._versions: list[int] = []

    def model(self) -> nn.Module:
        versions = [p._version for p in self.source.parameters()]
        if self._copy is None or versions != self._versions:
            copy_ = inference_copy(self.source, self.dtype) if self.fuse else cast_linears(self.source, self.dtype)
            if self.compile:
                compile_blocks(copy_)
            self._copy, self._versions = copy_, versions
        return self._copy


__all__ = ["HalfWeights", "cast_linears", "inference_copy"]
