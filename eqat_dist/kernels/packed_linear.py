"""Linear layers on GPTQ-packed weights (Triton): the float weight is never written to memory.

The weight of a PackedLinear is W[n, k] = (q[k, n] - z[k // group, n]) * s[k // group, n], with q
packed along k in `qweight` [in * bits / 32, out] and z packed along n in `qzeros`
[groups, out * bits / 32], least-significant bits first; 3-bit values straddle words (GPTQ's layout:
32 values in 3 words). Every kernel dequantizes its tile of W in registers from the packed words.

- forward  y = x W^T (+ bias), for E2E-QP training, evaluation and serving (batch 1 to large);
- backward dx = dy W (the same dequantization), and
           ds[g, n] = sum over k in group g of (q[k, n] - z[g, n]) * (dy^T x)[n, k],
  without the float weight: autograd saves x and the packed tensors only.

Two ways to do it (EQAT_PACKED_LINEAR):
- "dequant" (the default): a Triton kernel writes one layer's float weight, cuBLAS multiplies, and the
  weight is dropped at once (recomputed for backward). It costs one layer's weight of transient memory
  and runs at the tensor cores' speed: on an H200 the tiled kernel below took 164 ms for 4096 tokens
  through a 8192 -> 28672 layer (12 TFLOP/s) and 5.4 ms for one token (a 59 MB weight: 11 GB/s).
- "fused": the tiled kernels below dequantize in registers and never write the float weight: no
  transient memory, far slower until they are tuned (docs/benchmarks.md).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import on_device_of


@triton.jit
def _wide(rows):
    """Row indices as int64: row * width is an element offset, and tokens x width passes 2^31 (about
    75k tokens at Llama-2-70B's 28672) where int32 would wrap to a wrong address."""
    return rows.to(tl.int64)


@triton.jit
def _unpack(ptr, row, col, row_stride, rows_words, bits: tl.constexpr, mask):
    """Values at unpacked rows `row` (packed along rows, 32 values per `bits` words) and columns `col`."""
    pos = (row % 32) * bits
    word = (row // 32) * bits + pos // 32
    shift = (pos % 32).to(tl.uint32)
    lo = tl.load(ptr + word * row_stride + col, mask=mask, other=0).to(tl.uint32, bitcast=True)
    straddle = (pos % 32) + bits > 32
    hi = tl.load(ptr + (word + 1) * row_stride + col, mask=mask & straddle & (word + 1 < rows_words),
                 other=0).to(tl.uint32, bitcast=True)
    hi_part = tl.where(straddle, hi << (32 - shift), 0)
    return (((lo >> shift) | hi_part) & ((1 << bits) - 1)).to(tl.int32)


@triton.jit
def _codes_tile(qw_ptr, qz_ptr, k, n, K, N, group, bits: tl.constexpr, mask):
    """Codes minus zeros, q - z, as an int32 tile [BLOCK_K, BLOCK_N] of W^T."""
    q = _unpack(qw_ptr, k[:, None], n[None, :], N, K * bits // 32, bits, mask)
    g = k // group
    zrow_words = N * bits // 32
    z = _unpack(qz_ptr + g[:, None] * zrow_words, n[None, :], 0 * g[:, None], 1, zrow_words, bits, mask)
    return q - z


@triton.jit
def _weight_tile(qw_ptr, qz_ptr, s_ptr, k, n, K, N, group, bits: tl.constexpr, mask):
    """W^T tile [BLOCK_K, BLOCK_N] = (q - z) * s in the scales' dtype (as PackedLinear's reference)."""
    s = tl.load(s_ptr + (k // group)[:, None] * N + n[None, :], mask=mask, other=0.0)
    return _codes_tile(qw_ptr, qz_ptr, k, n, K, N, group, bits, mask).to(s.dtype) * s


@triton.jit
def _forward(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, M, N, K, group, bits: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    m = _wide(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = _weight_tile(qw_ptr, qz_ptr, s_ptr, k, n, K, N, group, bits, (k[:, None] < K) & (n[None, :] < N))
        w = w.to(x.dtype)
        if DOT_F32:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _grad_input(dy_ptr, qw_ptr, qz_ptr, s_ptr, dx_ptr, M, N, K, group, bits: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    m = _wide(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + m[:, None] * N + n[None, :], mask=(m[:, None] < M) & (n[None, :] < N), other=0.0)
        w = _weight_tile(qw_ptr, qz_ptr, s_ptr, k, n, K, N, group, bits, (k[:, None] < K) & (n[None, :] < N))
        w = w.to(dy.dtype)
        if DOT_F32:
            dy, w = dy.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(dy, tl.trans(w), input_precision=PRECISION)
    tl.store(dx_ptr + m[:, None] * K + k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=(m[:, None] < M) & (k[None, :] < K))


@triton.jit
def _grad_scales(x_ptr, dy_ptr, qw_ptr, qz_ptr, ds_ptr, M, N, K, group, bits: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """One program per (column tile, group): ds[g, n] = sum_k (q - z)[k, n] * sum_m dy[m, n] x[m, k]."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    zrow_words = N * bits // 32
    for k0 in range(g * group, g * group + group, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = (k < g * group + group) & (k < K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            m = _wide(m0 + tl.arange(0, BLOCK_M))
            dy = tl.load(dy_ptr + m[:, None] * N + n[None, :], mask=(m[:, None] < M) & (n[None, :] < N), other=0.0)
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & kmask[None, :], other=0.0)
            if DOT_F32:
                dy, x = dy.to(tl.float32), x.to(tl.float32)
            acc += tl.dot(tl.trans(dy), x, input_precision=PRECISION)
        mask = kmask[:, None] & (n[None, :] < N)
        q = _unpack(qw_ptr, k[:, None], n[None, :], N, K * bits // 32, bits, mask)
        z = _unpack(qz_ptr + g * zrow_words, n[None, :], 0 * k[:, None], 1, zrow_words, bits, mask)
        total += tl.sum(tl.trans(acc) * (q - z).to(tl.float32), axis=0)
    tl.store(ds_ptr + g * N + n, total, mask=n < N)


@triton.jit
def _dequantize(qw_ptr, qz_ptr, s_ptr, out_ptr, K, N, group, bits: tl.constexpr, SCALED: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n, k] = (q - z) * s (SCALED), or the codes q - z: the [out, in] weight that F.linear reads."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = _wide(tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))
    mask = (k[:, None] < K) & (n[None, :] < N)
    if SCALED:
        w = _weight_tile(qw_ptr, qz_ptr, s_ptr, k, n, K, N, group, bits, mask)
    else:
        w = _codes_tile(qw_ptr, qz_ptr, k, n, K, N, group, bits, mask).to(tl.float32)
    tl.store(out_ptr + n[None, :] * K + k[:, None], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor | None, bits: int, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The float weight [out, in] in `dtype`; with scales=None the codes minus zeros (q - z) instead."""
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    block_k, block_n = 64, 64
    with on_device_of(qweight):
        _dequantize[(triton.cdiv(K, block_k), triton.cdiv(N, block_n))](
            qweight, qzeros, scales if scales is not None else out, out, K, N, group, bits=bits,
            SCALED=scales is not None, BLOCK_K=block_k, BLOCK_N=block_n)
    return out


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b summed in float32: 16-bit inputs stay 16-bit on the tensor cores (their products are exact in
    float32), where the GPU's mm takes out_dtype; elsewhere both go to float32 (a no-op for float32)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a PyTorch without mm's out_dtype on CUDA
            pass
    return a.float() @ b.float()


DS_TEMPORARY_ELEMENTS = 1 << 26  # float32 elements of each temporary of the scales' gradient (256 MiB)


def _grad_scales_dequantized(x2, dy, qweight, qzeros, bits: int, group: int) -> torch.Tensor:
    """ds [groups, out] = per group, sum over k of (q - z)[k, n] * (dy^T x)[n, k], a slice of output
    columns at a time so that the float32 temporaries stay near 256 MiB whatever the layer's size."""
    K, N = x2.shape[1], dy.shape[1]
    ds = torch.empty(K // group, N, dtype=torch.float32, device=dy.device)
    if not x2.is_cuda:
        x2 = x2.float()  # converted once, not once a slice
    columns = max(32, DS_TEMPORARY_ELEMENTS // K // 32 * 32)  # a multiple of 32: the zeros' words split there
    for n0 in range(0, N, columns):
        n1 = min(N, n0 + columns)
        products = _mm_float32(dy[:, n0:n1].t(), x2)  # [columns, K]
        codes = dequantize(qweight[:, n0:n1].contiguous(), qzeros[:, n0 * bits // 32:n1 * bits // 32].contiguous(),
                           None, bits, group, torch.float32)
        ds[:, n0:n1] = products.mul_(codes).view(n1 - n0, K // group, group).sum(-1).t()
    return ds


def _path() -> str:
    path = os.environ.get("EQAT_PACKED_LINEAR", "dequant")
    if path not in ("dequant", "fused"):
        raise ValueError(f"EQAT_PACKED_LINEAR={path!r}: choose 'dequant' (the default) or 'fused'")
    return path


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # float32 stays float32 (Triton's default is TF32)


def _dot_f32(x: torch.Tensor) -> bool:
    """Triton's CPU interpreter multiplies bfloat16 tiles wrongly (a 16 x 16 tl.dot came out ~1e10 off),
    so there bfloat16 tiles are multiplied in float32; on a GPU they go to the tensor cores as they are."""
    return x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _tiles(M: int) -> tuple[int, int, int]:
    return (16 if M <= 16 else 32 if M <= 32 else 64), 64, 32


def _forward_2d(x2, qweight, qzeros, scales, bias, bits, group):
    M, K = x2.shape
    N = scales.shape[1]
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    bm, bn, bk = _tiles(M)
    with on_device_of(x2):
        _forward[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            x2, qweight, qzeros, scales, bias if bias is not None else scales, y, M, N, K, group, bits=bits,
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(x2),
            DOT_F32=_dot_f32(x2))
    return y


class PackedLinearFunction(torch.autograd.Function):
    """y = x W^T + b from the packed weight (EQAT_PACKED_LINEAR picks how); gradients for x and the scales only."""

    @staticmethod
    def forward(ctx, x, qweight, qzeros, scales, bias, bits: int, group: int):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
        ctx.path = _path()
        if ctx.path == "dequant":
            weight = dequantize(qweight, qzeros, scales, bits, group, x2.dtype)
            y = torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(x2.dtype))
            del weight  # recomputed for backward: autograd keeps the packed form only
        else:
            y = _forward_2d(x2, qweight, qzeros, scales, bias, bits, group)
        ctx.save_for_backward(x2, qweight, qzeros, scales)  # the packed form: no float weight is kept
        ctx.bits, ctx.group, ctx.shape = bits, group, shape
        return y.reshape(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x2, qweight, qzeros, scales = ctx.saved_tensors
        M, K = x2.shape
        N = scales.shape[1]
        dy = grad.reshape(-1, N).contiguous().to(x2.dtype)
        dx = ds = None
        if ctx.path == "dequant":
            if ctx.needs_input_grad[0]:
                dx = (dy @ dequantize(qweight, qzeros, scales, ctx.bits, ctx.group, dy.dtype)).reshape(ctx.shape)
            if ctx.needs_input_grad[3]:
                ds = _grad_scales_dequantized(x2, dy, qweight, qzeros, ctx.bits, ctx.group).to(scales.dtype)
            return dx, None, None, ds, None, None, None
        bm, bn, bk = _tiles(M)
        with on_device_of(x2):
            if ctx.needs_input_grad[0]:
                dx = torch.empty_like(x2)
                _grad_input[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
                    dy, qweight, qzeros, scales, dx, M, N, K, ctx.group, bits=ctx.bits, BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_K=bk, PRECISION=_precision(x2), DOT_F32=_dot_f32(x2))
                dx = dx.reshape(ctx.shape)
            if ctx.needs_input_grad[3]:
                ds = torch.empty(scales.shape, dtype=torch.float32, device=scales.device)
                _grad_scales[(triton.cdiv(N, bn), K // ctx.group)](
                    x2, dy, qweight, qzeros, ds, M, N, K, ctx.group, bits=ctx.bits, BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_K=bk, PRECISION=_precision(x2), DOT_F32=_dot_f32(x2))
                ds = ds.to(scales.dtype)
        return dx, None, None, ds, None, None, None


def packed_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
    """x [..., in] -> [..., out] for a GPTQ-packed layer (scales [groups, out], as PackedLinear holds them)."""
    return PackedLinearFunction.apply(x, qweight, qzeros, scales, bias, bits, group)
