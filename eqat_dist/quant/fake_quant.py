"""The EfficientQAT quantizer: uniform asymmetric per-group fake quantization with learnable
step size `s` and zero point `z`, straight-through rounding (reference doc, section 1).

    W_int = clamp(round(W / s) + round(z), 0, 2^N - 1)
    W_hat = (W_int - round(z)) * s

`s` is kept in [1e-4, 1e4] and `z` in [0, 2^N - 1] by straight-through clamps; the clamp of
`W_int` is a plain clamp, so clipped elements pass no gradient to `W`.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .config import QuantConfig

SCALE_MIN, SCALE_MAX = 1e-4, 1e4


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ClampSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi):
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass (exactly), identity in the backward pass."""
    return _RoundSTE.apply(x)


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp() in the forward pass (exactly), identity in the backward pass."""
    return _ClampSTE.apply(x, lo, hi)


def grouped(weight: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in] -> [out, in/group, group] (a view)."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features, in_features // group, group)


def minmax_init(weight: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's initialisation per group: s = (max - min) / (2^N - 1), z = round(-min / s).

    Returns float32 `s` and `z` of shape [out, groups]. min is capped at 0 and max floored at 0
    (the range always holds zero, as in the official code), so z lies in [0, 2^N - 1].
    """
    w_min, w_max = _group_range(grouped(weight.detach().float(), cfg.effective_group(weight.shape[1])))
    return _scale_zero(w_min, w_max, cfg.qmax)


def _group_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's min capped at 0 and max floored at 0 (the range always holds zero)."""
    return w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)


def _scale_zero(w_min: torch.Tensor, w_max: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s and z that put [w_min, w_max] on the grid 0..qmax."""
    scale = ((w_max - w_min) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    return scale, (-w_min / scale).round().clamp(0, qmax)


CLIP_GRID = tuple(1.0 - 0.025 * k for k in range(21))  # shrink factors 1.0 down to 0.5


def _group_error(w: torch.Tensor, w_min: torch.Tensor, w_max: torch.Tensor, qmax: int):
    """(squared error per group, s, z) of quantizing groups `w` [out, groups, g] on the range [w_min, w_max]."""
    scale, zero = _scale_zero(w_min, w_max, qmax)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    error = (((w / s).round() + z).clamp(0, qmax).sub_(z).mul_(s).sub_(w)).square_().sum(-1)
    return error, scale, zero


def clip_init(weight: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """min/max shrunk by the factor of CLIP_GRID that gives each group the least squared weight error
    (1.0 is in the grid: never worse than `minmax_init`). At 2 bits a few outliers stretch min/max over
    most of the grid; clipping them is what RTN-based methods (AWQ, OmniQuant's LWC) do first."""
    w = grouped(weight.detach().float(), cfg.effective_group(weight.shape[1]))
    w_min, w_max = _group_range(w)
    best, scale, zero = _group_error(w, w_min, w_max, cfg.qmax)
    for factor in CLIP_GRID[1:]:
        error, s, z = _group_error(w, w_min * factor, w_max * factor, cfg.qmax)
        better = error < best
        best, scale, zero = torch.where(better, error, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def initial_scale_zero(weight: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """s and z of each group: on a format grid, of the weight as `grid_sign` turns it, z the format's."""
    if cfg.format_grid is not None:
        return fixed_zero_init(signed(weight, grid_sign(weight, cfg)), cfg)
    return clip_init(weight, cfg) if cfg.init == "clip" else minmax_init(weight, cfg)


def grid_sign(weight: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """A format grid's d may be negative: (q - z) x d with d < 0 is the grid mirrored, so each group can
    put the side with more levels (z below the offset, 2^N - 1 - z above it: Q2_0 has -1..+2, Q4_0 -8..+7)
    where its weights reach further. Quantizing W with -d is quantizing -W with d and negating: the sign
    is applied to the weight (+1 or -1 per group, [out, groups], fixed for the run)."""
    fixed = cfg.format_grid
    w = grouped(weight.detach().float(), cfg.effective_group(weight.shape[1]))
    below, above = -w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    more_above = (cfg.qmax - fixed.zero) > fixed.zero  # Q2_0: more levels above the offset
    flip = (below > above) if more_above else (above > below)
    return torch.where(flip, -1.0, 1.0)


def signed(weight: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] with each group multiplied by its sign [out, groups] (differentiable)."""
    return (grouped(weight, weight.shape[1] // sign.shape[1]) * sign.unsqueeze(-1)).reshape(weight.shape)


def fixed_zero_init(weight: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """s of each group with z fixed at the format's offset: the smallest that holds the group's range
    (minmax), or the shrink of it with the least squared weight error (clip, over CLIP_GRID)."""
    z, qmax = cfg.format_grid.zero, cfg.qmax
    w = grouped(weight.detach().float(), cfg.effective_group(weight.shape[1]))
    below, above = -w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    widest = torch.maximum(below / z, above / (qmax - z)).clamp(SCALE_MIN, SCALE_MAX)
    zero = torch.full_like(widest, float(z))
    best_scale = widest
    if cfg.init == "clip":
        def error(scale):
            s = scale.unsqueeze(-1)
            return (((w / s).round() + z).clamp(0, qmax).sub_(z).mul_(s).sub_(w)).square_().sum(-1)
        best = error(widest)
        for factor in CLIP_GRID[1:]:
            scale = (widest * factor).clamp(SCALE_MIN, SCALE_MAX)
            e = error(scale)
            better = e < best
            best, best_scale = torch.where(better, e, best), torch.where(better, scale, best_scale)
    return best_scale, zero


def quantize_to_int(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig):
    """Integer codes and rounded zero points (no gradient): what gets packed.

    Shapes: weight [out, in], scale/zero [out, groups] -> codes [out, in] int32, zeros [out, groups] int32.
    Uses exactly the forward arithmetic of `fake_quantize`, so packing is bit-exact with training.
    """
    with torch.no_grad():
        group = cfg.effective_group(weight.shape[1])
        s = scale.float().clamp(SCALE_MIN, SCALE_MAX).unsqueeze(-1)
        z = zero.float().clamp(0, cfg.qmax).round().unsqueeze(-1)
        codes = ((grouped(weight.float(), group) / s).round() + z).clamp(0, cfg.qmax)
        return codes.reshape(weight.shape).to(torch.int32), z.squeeze(-1).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """(W_int - z) * s for codes [out, in], scale/zero [out, groups] -> float [out, in] in scale's dtype."""
    s = scale.unsqueeze(-1)
    w = (grouped(codes, group).to(s.dtype) - zero.unsqueeze(-1).to(s.dtype)) * s
    return w.reshape(codes.shape)


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Differentiable fake quantization (see module docstring). Returns a tensor like `weight`."""
    group = cfg.effective_group(weight.shape[1])
    s = clamp_ste(scale, SCALE_MIN, SCALE_MAX).unsqueeze(-1)
    z = round_ste(clamp_ste(zero, 0, cfg.qmax)).unsqueeze(-1)
    w = grouped(weight, group)
    codes = (round_ste(w / s) + z).clamp(0, cfg.qmax)
    return ((codes - z) * s).reshape(weight.shape)


class _FusedFakeQuant(torch.autograd.Function):
    """`fake_quantize` with its backward written out (the formulas of eqat_dist/kernels/fake_quant.py):
    autograd through the composed version saves and revisits five elementwise results; this saves a
    mask and one float tensor and takes five passes backward. The path for weights not on a GPU (the
    GPU's is the Triton kernel). Forward bit-identical to `fake_quantize`."""

    @staticmethod
    def forward(ctx, weight, scale, zero, qmax: int, group: int):
        s = scale.clamp(SCALE_MIN, SCALE_MAX).unsqueeze(-1)
        z = zero.clamp(0, qmax).round().unsqueeze(-1)
        w = grouped(weight, group)
        ratio = w / s
        raw = ratio.round().add_(z)
        inside = (raw >= 0) & (raw <= qmax)
        centred = raw.clamp_(0, qmax).sub_(z)  # c - z
        out = centred * s
        # ds per element: (c - z) - W/s inside the range (= round(W/s) - W/s), (c - z) outside
        ctx.save_for_backward(inside, centred.sub_(ratio.masked_fill_(~inside, 0)), s)
        return out.reshape(weight.shape)

    @staticmethod
    def backward(ctx, grad):
        inside, ds_factor, s = ctx.saved_tensors
        g = grouped(grad, ds_factor.shape[-1])
        grad_w = g.masked_fill(~inside, 0).reshape(grad.shape)
        grad_s = (g * ds_factor).sum(-1)
        grad_z = (g - grad_w.view_as(g)).sum(-1).mul_(-s.squeeze(-1))  # g where outside
        return grad_w, grad_s, grad_z, None, None


def fused_fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """`fake_quantize` in fewer passes (same forward, gradients equal up to summation order)."""
    return _FusedFakeQuant.apply(weight, scale, zero, cfg.qmax, cfg.effective_group(weight.shape[1]))


class QuantLinear(nn.Module):
    """A linear layer trained with fake-quantized weights (Block-AP): `weight`, `scale` and `zero`
    are all parameters. The float bias, if any, is kept as is."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig, name: str = "linear"):
        super().__init__()
        cfg.check_layer(name, linear.in_features, linear.out_features)
        self.cfg = cfg
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())
        scale, zero = initial_scale_zero(self.weight, cfg)
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(zero, requires_grad=cfg.fixed_zero is None)  # a format grid fixes it
        # a format grid's sign of d per group [out, groups], applied to the weight (grid_sign); None: asym
        self.register_buffer("sign", None if cfg.format_grid is None else grid_sign(self.weight, cfg))
        self.fixed_weight = None  # set for a pass that does not train (models/quantize.weights_fixed)

    def quantized_weight(self) -> torch.Tensor:
        weight = self.weight if self.sign is None else signed(self.weight, self.sign)
        if kernels.enabled_for(self.weight):  # one fused pass over W each way (eqat_dist/kernels)
            from ..kernels.fake_quant import fake_quantize as fused
            out = fused(weight, self.scale, self.zero, self.cfg.qmax, self.cfg.effective_group(self.in_features))
        else:
            out = fused_fake_quantize(weight, self.scale, self.zero, self.cfg)
        return out if self.sign is None else signed(out, self.sign)

    def fix_weight(self) -> None:
        """Quantize once for the batches of a pass that does not train; `fixed_weight = None` undoes it."""
        with torch.no_grad():
            self.fixed_weight = self.quantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fixed_weight if self.fixed_weight is not None else self.quantized_weight()
        return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_int(self):
        """(codes [out, in] int32, zeros [out, groups] int32, scales [out, groups] float32): (codes - zeros)
        x scales is the trained weight; on a format grid the scales carry each group's sign."""
        weight = self.weight if self.sign is None else signed(self.weight, self.sign)
        codes, zeros = quantize_to_int(weight, self.scale, self.zero, self.cfg)
        scales = self.scale.detach().float().clamp(SCALE_MIN, SCALE_MAX)
        return codes, zeros, scales if self.sign is None else scales * self.sign

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.cfg.tag()}"
