"""GPTQ int32 packing, least-significant bits first.

Every 32 consecutive values of `bits` bits fill `bits` int32 words as one little-endian bit
stream. For 2/4/8 bits this is the familiar "32/N values per word"; for 3 bits it is GPTQ's real
layout (32 values in 3 words, values 10 and 21 straddling a word boundary), which other tools load.
"""
from __future__ import annotations

import torch

_WORD = 32
_U32 = (1 << 32) - 1


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] integers in [0, 2^bits) -> [R * bits / 32, C] int32, packing along rows."""
    rows, cols = values.shape
    if rows % _WORD:
        raise ValueError(f"cannot pack {rows} rows: the count must be a multiple of 32")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values out of the {bits}-bit range [0, {2**bits - 1}]")
    v = values.to(torch.int64).reshape(rows // _WORD, _WORD, cols)
    words = torch.zeros(rows // _WORD, bits + 1, cols, dtype=torch.int64, device=values.device)
    for k in range(_WORD):
        word, shift = divmod(k * bits, _WORD)
        words[:, word] |= (v[:, k] << shift) & _U32
        if shift + bits > _WORD:  # the value straddles into the next word
            words[:, word + 1] |= v[:, k] >> (_WORD - shift)
    return as_int32(words[:, :bits].reshape(rows * bits // _WORD, cols))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_rows`: [R * bits / 32, C] int32 -> [R, C] int32."""
    prow, cols = packed.shape
    mask = (1 << bits) - 1
    if _WORD % bits == 0:  # 2/4/8 bits: whole values per word, all shifts in one broadcast op
        per = _WORD // bits
        shifts = torch.arange(0, _WORD, bits, device=packed.device, dtype=torch.int32).view(1, per, 1)
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(prow * per, cols)
    w = (packed.to(torch.int64) & _U32).reshape(prow // bits, bits, cols)
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)  # a zero word past the end
    out = torch.empty(prow // bits, _WORD, cols, dtype=torch.int32, device=packed.device)
    for k in range(_WORD):
        word, shift = divmod(k * bits, _WORD)
        pair = w[:, word] | (w[:, word + 1] << _WORD)
        out[:, k] = ((pair >> shift) & mask).to(torch.int32)
    return out.reshape(prow // bits * _WORD, cols)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [out, in] -> GPTQ qweight [in * bits / 32, out]."""
    return pack_rows(codes.t(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight [in * bits / 32, out] -> codes [out, in]."""
    return unpack_rows(qweight, bits).t()


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [out, groups] -> GPTQ qzeros [groups, out * bits / 32] (packed along outputs).

    Zero points are clamped into [0, 2^bits - 1] before the cast (the official code does not, and
    an out-of-range zero point would corrupt its neighbours). Stored without GPTQ v1's minus-one offset.
    """
    z = zeros.round().clamp(0, 2**bits - 1).to(torch.int64)
    return pack_rows(z, bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qzeros [groups, out * bits / 32] -> zero points [out, groups]."""
    return unpack_rows(qzeros.t().contiguous(), bits)
