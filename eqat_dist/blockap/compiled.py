"""The block forward that Block-AP trains and validates with: plain, or through torch.compile.

One compiled function serves every block of a run: the blocks of a model have the same code and
shapes, and torch.compile takes a module's parameters as inputs of the graph, so block 1 onwards reuse
the graphs block 0 compiled (forward with gradients, forward without; a last, smaller batch compiles
once more). What compiling buys is the element-wise work fused into fewer passes (the fake quantizer,
norms, rotary, the gated MLP); the matmuls are the same calls.
"""
from __future__ import annotations

import torch

from ..models.blocks import run_block

_compiled = None


def block_forward(compile: bool):
    """run_block, or its compiled form (made once per process and shared by every block)."""
    global _compiled
    if not compile:
        return run_block
    if _compiled is None:
        _compiled = torch.compile(run_block, dynamic=False)
    return _compiled
