"""The median token error of a whole step when a data-parallel group shares it: the Huber loss's
threshold (losses.py) is a multiple of the step's median token error, and each rank holds only its
share of the step's windows. Each rank lays its tokens' errors out at its lanes (blockap/lanes.py) in
a [global batch, tokens + 1] buffer, the last column saying which lanes have a window in this step;
one sum over the group (a few KB: 2 x 2048 floats at the paper's batch) gives every rank the step's
errors, whose median is the one a single rank computes over the same windows (the median does not
depend on the order)."""
from __future__ import annotations

import torch

from .lanes import Step


def group_token_median(group, step: Step, tokens: int, positions: torch.Tensor, device) -> callable:
    """median(errors) for this step: `errors` this rank's [rows, its tokens] token errors, at global
    `positions` of each window's `tokens` (all of them, or the rank's share under sequence parallelism:
    models/sequence_split.py); None when it has no window in the step (it still takes part in the sum)."""
    def median(errors: torch.Tensor | None) -> torch.Tensor:
        laid_out = torch.zeros(step.batch, tokens + 1, dtype=torch.float32, device=device)
        if errors is not None and len(step.lanes):
            lanes = torch.tensor(step.lanes, device=device)
            where = positions.to(device)
            laid_out[lanes[:, None], where[None, :]] = errors.detach().float().reshape(len(step.lanes), len(where))
            laid_out[lanes, tokens] = 1.0
        group.allreduce_sum_(laid_out)
        return laid_out[laid_out[:, tokens] > 0, :tokens].flatten().median()
    return median
