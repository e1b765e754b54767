"""Fused fake quantization for Block-AP (Triton): one pass over W forward, one backward.

Forward, per group of one row:  W_hat = (clamp(round(W / s) + round(z), 0, qmax) - round(z)) * s
with s clamped to [1e-4, 1e4] and z to [0, qmax] (both straight-through), exactly as
`eqat_dist.quant.fake_quant.fake_quantize`. Backward, with g = dL/dW_hat and m = 1 where the code
was inside [0, qmax] before the clamp (the plain clamp's gradient):
    dW = g * m
    ds = sum over the group of g * ((c - round(z)) - m * W / s)
    dz = sum over the group of g * s * (m - 1)
The PyTorch path materialises five elementwise results (and autograd saves them); here W is read once
forward and W, g once backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_device_of

SCALE_MIN, SCALE_MAX = 1e-4, 1e4
# what the kernels read: a compiled Triton kernel may only read globals that are constexpr
_SCALE_MIN, _SCALE_MAX = tl.constexpr(SCALE_MIN), tl.constexpr(SCALE_MAX)


@triton.jit
def _round(x):
    """Round half to even, as torch.round: floor(x + 0.5), minus one on exact .5 ties of odd results."""
    f = tl.floor(x + 0.5)
    tie = (f - x) == 0.5
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where(tie & odd, f - 1.0, f)


@triton.jit
def _step_and_zero(s_ptr, z_ptr, offs, mask, qmax):
    """The group's step size clamped to [1e-4, 1e4] and zero point clamped to [0, qmax] and rounded."""
    s = tl.load(s_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.minimum(tl.maximum(s, _SCALE_MIN), _SCALE_MAX), _round(tl.minimum(tl.maximum(z, 0.0), qmax))


@triton.jit
def _fq_fwd(w_ptr, s_ptr, z_ptr, out_ptr, rows, cols, groups, group, qmax,
            BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    """A tile of BLOCK_R rows x GROUPS whole groups: [rows, groups, a group's columns]."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # r * cols may pass 2^31
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    tile = (r < rows)[:, None] & (g < groups)[None, :]
    s, z = _step_and_zero(s_ptr, z_ptr, r[:, None] * groups + g[None, :], tile, qmax)
    s, z = s[:, :, None], z[:, :, None]
    for start in range(0, group, BLOCK_G):
        c = start + tl.arange(0, BLOCK_G)
        offs = r[:, None, None] * cols + g[None, :, None] * group + c[None, None, :]
        mask = tile[:, :, None] & (c < group)[None, None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round(tl.div_rn(w, s)) + z, 0.0), qmax)
        tl.store(out_ptr + offs, ((q - z) * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fq_bwd(w_ptr, s_ptr, z_ptr, g_ptr, dw_ptr, ds_ptr, dz_ptr, rows, cols, groups, group, qmax,
            BLOCK_R: tl.constexpr, GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    gi = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    tile = (r < rows)[:, None] & (gi < groups)[None, :]
    sz_offs = r[:, None] * groups + gi[None, :]
    s, z = _step_and_zero(s_ptr, z_ptr, sz_offs, tile, qmax)
    s3, z3 = s[:, :, None], z[:, :, None]
    ds = tl.zeros([BLOCK_R, GROUPS], dtype=tl.float32)
    dz = tl.zeros([BLOCK_R, GROUPS], dtype=tl.float32)
    for start in range(0, group, BLOCK_G):
        c = start + tl.arange(0, BLOCK_G)
        offs = r[:, None, None] * cols + gi[None, :, None] * group + c[None, None, :]
        mask = tile[:, :, None] & (c < group)[None, None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ratio = tl.div_rn(w, s3)
        q = _round(ratio) + z3
        inside = (q >= 0.0) & (q <= qmax)
        code = tl.minimum(tl.maximum(q, 0.0), qmax)
        tl.store(dw_ptr + offs, tl.where(inside, grad, 0.0).to(dw_ptr.dtype.element_ty), mask=mask)
        ds += tl.sum(grad * ((code - z3) - tl.where(inside, ratio, 0.0)), axis=2)
        dz += tl.sum(tl.where(inside, 0.0, -grad), axis=2)
    tl.store(ds_ptr + sz_offs, ds, mask=tile)
    tl.store(dz_ptr + sz_offs, dz * s, mask=tile)


# A program's tile: 8 rows x 256 columns of whole groups (1 KiB of float32 a row: wide, contiguous loads;
# the first version's 16 x 64 tiles read 256 bytes a row and reached 42% of an H200's bandwidth); a
# group wider than 256 (per-channel) is walked in 256-column steps by one program per row block.
TILE_ROWS, TILE_COLS = 8, 256


def _tiles(group: int) -> tuple[int, int, int]:
    """(BLOCK_R, GROUPS, BLOCK_G): rows, whole groups and a group's columns per step of one program."""
    block_g = min(TILE_COLS, triton.next_power_of_2(group))
    return TILE_ROWS, max(1, TILE_COLS // block_g), block_g


class FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scale, zero, qmax: int, group: int):
        w, s, z = weight.contiguous(), scale.contiguous(), zero.contiguous()
        rows, cols = w.shape
        out = torch.empty_like(w)
        block_r, per_tile, block_g = _tiles(group)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols // group, per_tile))
        with on_device_of(w):
            _fq_fwd[grid](w, s, z, out, rows, cols, cols // group, group, float(qmax), BLOCK_R=block_r,
                          GROUPS=per_tile, BLOCK_G=block_g)
        ctx.save_for_backward(w, s, z)
        ctx.qmax, ctx.group = qmax, group
        return out

    @staticmethod
    def backward(ctx, grad):
        w, s, z = ctx.saved_tensors
        rows, cols = w.shape
        groups = cols // ctx.group
        dw = torch.empty_like(w)
        ds = torch.empty(rows, groups, dtype=torch.float32, device=w.device)
        dz = torch.empty_like(ds)
        block_r, per_tile, block_g = _tiles(ctx.group)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(groups, per_tile))
        with on_device_of(w):
            _fq_bwd[grid](w, s, z, grad.contiguous(), dw, ds, dz, rows, cols, groups, ctx.group, float(ctx.qmax),
                          BLOCK_R=block_r, GROUPS=per_tile, BLOCK_G=block_g)
        return dw, ds.to(s.dtype), dz.to(z.dtype), None, None


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, group: int) -> torch.Tensor:
    """The fused equivalent of quant.fake_quant.fake_quantize (weight [out, in], scale/zero [out, groups])."""
    return FakeQuantize.apply(weight, scale, zero, qmax, group)
