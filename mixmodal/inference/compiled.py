"""Compiled decoding: the fixed-shape parts of every block through `torch.compile`.

A decoding step of a small model is bound by the number of ops, not by arithmetic: each block runs an
RMSNorm, the projections, QK-norm, RoPE, the output projection, two residual adds, another RMSNorm and a
SwiGLU, ~25 kernels for one token per row (benchmarks/RESULTS.md, issue 19). A block is three steps
(model/transformer.py `Block`): `before_attention`, the attention over the KV cache, `after_attention`. The
first and last see the same shapes at every step ([rows, 1, D]), so `torch.compile(dynamic=False)` fuses
each into a few kernels (Inductor: C++ on the CPU, Triton on a GPU) and compiles once per shape: once for
the prompt's length, once for the one-token steps. The attention in between stays eager: the cache grows
every step, and SDPA is one kernel already. Every block shares the two compiled functions (its modules are
inputs to them), so a model compiles two graphs per shape, not two per block.

The first call compiles (~10-40 s on a CPU); a server or a long generation pays it once. The compiled
copy computes the same products in a different order of roundings (fused elementwise ops keep fp32 inside
a kernel where eager rounds each op's output to bf16): its outputs match eager within that dtype's
rounding, not bitwise (tests/test_inference_engine.py -k compiled).
"""

from __future__ import annotations

import functools
import os
import shutil

import torch
from torch import nn

from mixmodal.model.transformer import Block

_COMPILED: dict[str, object] = {}


def check_compiler(device: torch.device | str) -> None:
    """Inductor's CPU backend writes C++ and builds it at run time; say what is missing before the first step."""
    if torch.device(device).type != "cpu":
        return
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise ValueError("compile=True (--compile) builds the decoding kernels with a C++ compiler at run time "
                         "(torch.compile's CPU backend), and none is on PATH: install g++ (apt install g++) or set "
                         "CXX, or generate without --compile")


def compile_blocks(model: nn.Module) -> nn.Module:
    """In place, for an inference copy (inference/precision.py): every Block's `before_attention` and
    `after_attention` through the two shared compiled functions."""
    if not _COMPILED:
        _COMPILED["before"] = torch.compile(Block.before_attention, dynamic=False)
        _COMPILED["after"] = torch.compile(Block.after_attention, dynamic=False)
    for block in model.modules():
        if isinstance(block, Block):
            block.before_attention = functools.partial(_COMPILED["before"], block)
            block.after_attention = functools.partial(_COMPILED["after"], block)
    return model


__all__ = ["check_compiler", "compile_blocks"]
