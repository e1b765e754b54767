"""GPTQ (Frantar et al., 2022) onto the EfficientQAT grid, as a starting point for Block-AP (`--init gptq`).

Round-to-nearest from min/max rounds every weight on its own; GPTQ rounds the input columns one after
another and moves each rounding error onto the columns not yet rounded, weighted by the layer's input
second moments H = X^T X, so the layer's *output* error is what is kept small. The groups' step sizes
and zero points are the paper's min/max rule, taken from the weights as they stand when GPTQ reaches a
group's first column (GPTQ's own group handling), so the grid is exactly the one `QuantLinear` trains.

Returned is a float weight that rounds to GPTQ's codes under those step sizes and zero points: each
column as GPTQ saw it when it rounded it (the original column plus the errors moved onto it), kept just
inside the grid's range. Block-AP trains from it as from any weight, its first step's fake quantization
being GPTQ's result; where a weight lies between grid points is kept, as the paper's start keeps it for
the original weights (a start on the grid points themselves trained worse: each code had to travel half
a step before it could change).
"""
from __future__ import annotations

import torch

from .config import QuantConfig
from .fake_quant import SCALE_MAX, SCALE_MIN

DAMP = 0.01  # times the mean of H's diagonal, added to it (GPTQ's default): keeps H invertible
BLOCK = 128  # columns updated together (GPTQ's lazy batch updates; the result does not depend on it)
INSIDE = 0.49  # a weight past the grid's ends is put this many steps beyond the end point (rounds onto it)


def _group_scale_zero(w: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's min/max rule for one group of columns w [out, g]: the range holds zero."""
    w_min, w_max = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    scale = ((w_max - w_min) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    return scale, (-w_min / scale).round().clamp(0, qmax)


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight on the grid [out, in], scale [out, groups], zero [out, groups]) for a layer whose inputs
    have second moments `hessian` [in, in]. float32 throughout, on the weight's device."""
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    group = cfg.effective_group(in_features)
    h = hessian.float().clone().to(w.device)
    dead = h.diagonal() == 0  # inputs that are always zero: their columns do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads onto columns i..
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    scales = torch.zeros(out_features, in_features // group, device=w.device)
    zeros = torch.zeros_like(scales)
    for a in range(0, in_features, BLOCK):
        b = min(a + BLOCK, in_features)
        w1, err1, hinv1 = w[:, a:b].clone(), torch.zeros(out_features, b - a, device=w.device), h_inv[a:b, a:b]
        for i in range(b - a):
            col = a + i
            if col % group == 0:  # a new group: its grid from the weights as they stand now
                lo = col - a
                g = torch.cat([w1[:, lo:], w[:, b:]], dim=1)[:, :group] if lo + group > b - a else w1[:, lo:lo + group]
                scales[:, col // group], zeros[:, col // group] = _group_scale_zero(g, cfg.qmax)
            s, z = scales[:, col // group], zeros[:, col // group]
            column = w1[:, i]
            rounded = ((column / s).round() + z).clamp(0, cfg.qmax).sub(z).mul(s)
            # kept inside the range: the same code, and a gradient for Block-AP (a clipped weight has none)
            q[:, col] = torch.minimum(torch.maximum(column, (-z - INSIDE) * s), (cfg.qmax - z + INSIDE) * s)
            err = (column - rounded) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, b:] -= err1 @ h_inv[a:b, b:]
    return q, scales, zeros


class InputMoments:
    """X^T X of each linear layer's inputs, summed over the batches a block is run on (forward hooks)."""

    def __init__(self, linears: dict[str, torch.nn.Module]):
        self.sums = {name: torch.zeros(lin.in_features, lin.in_features, device=lin.weight.device)
                     for name, lin in linears.items()}
        self.handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.sums[name].addmm_(x.T, x)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
