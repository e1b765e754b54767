"""What Block-AP minimises between the quantized block's output and the full-precision target.

- `mse`: the paper's mean squared error over every element. From block 11 of SmolLM2 one massive
  activation (a single hidden channel of the first token, ~98% of the output's mean square) dominates
  it, and the steps go to that one element.
- `relative`: each token's squared error divided by that token's target mean square, then the mean over
  tokens: every position counts the same whatever its norm (the attention-sink token included).
- `huber`: the MSE, but a token whose squared error is more than HUBER_FACTOR times the batch's median
  token error counts with the square root of its error (Huber's loss on the token's error norm): its
  gradient is capped at that of a token at the threshold. In SmolLM2 at 2 bits the quantized stream
  grows a second attention sink now and then (a full ~25,000 massive activation at position 1-3 of a
  window, from block 11 on; docs/benchmarks.md): an error no later block can undo, which under the MSE
  took each step's gradient (and, through the clipping, shrank every other token's). Where no token is
  past the threshold it is the MSE exactly.
"""
from __future__ import annotations

import torch

LOSSES = ("mse", "relative", "huber")
STEP_WIDE = ("huber",)  # losses that read the whole step (its median token error), not each token alone
_FLOOR = 1e-8  # a token whose target is all zeros would divide by zero
HUBER_FACTOR = 100.0  # threshold: this many times the batch's median token error (the sink token stays under it)


def reconstruction_loss(name: str, out: torch.Tensor, target: torch.Tensor, token_median=None) -> torch.Tensor:
    """`token_median(errors)`: the median token error of the whole step where a group of ranks shares it
    (token_median.py); default: of `out`'s tokens, which are the whole step on one rank."""
    out, target = out.float(), target.float()
    if name == "mse":
        return torch.nn.functional.mse_loss(out, target)
    if name == "relative":
        error = (out - target).square().mean(-1)
        return (error / target.square().mean(-1).clamp_min(_FLOOR)).mean()
    if name == "huber":
        error = (out - target).square().mean(-1)  # per token; their mean is the MSE
        median = token_median(error) if token_median is not None else error.detach().flatten().median()
        limit = (HUBER_FACTOR * median).clamp_min(_FLOOR)
        beyond = error > limit
        # past the limit: 2 sqrt(limit * e) - limit, which meets e at the limit with the same slope
        robust = torch.where(beyond, 2 * (limit * error.clamp_min(_FLOOR)).sqrt() - limit, error)
        return robust.mean()
    raise ValueError(f"`loss` {name!r} is not known; use one of {', '.join(LOSSES)}")
