"""What Block-AP minimises between the quantized block's output and the full-precision target.

- `mse`: the paper's mean squared error over every element. From block 11 of SmolLM2 one massive
  activation (a single hidden channel of the first token, ~98% of the output's mean square) dominates
  it, and the steps go to that one element.
- `relative`: each token's squared error divided by that token's target mean square, then the mean over
  tokens: every position counts the same whatever its norm (the attention-sink token included).
"""
from __future__ import annotations

import torch

LOSSES = ("mse", "relative")
_FLOOR = 1e-8  # a token whose target is all zeros would divide by zero


def reconstruction_loss(name: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out, target = out.float(), target.float()
    if name == "mse":
        return torch.nn.functional.mse_loss(out, target)
    if name == "relative":
        error = (out - target).square().mean(-1)
        return (error / target.square().mean(-1).clamp_min(_FLOOR)).mean()
    raise ValueError(f"`loss` {name!r} is not known; use one of {', '.join(LOSSES)}")
