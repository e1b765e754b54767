"""AWQ (GEMM layout), 4-bit: what AutoAWQ writes and vLLM serves with `awq_marlin`.

Per quantized linear `L` (AWQ keeps the input dimension first, unlike GPTQ):
    L.qweight  int32 [in, out / 8]       8 codes per word along the output, in AWQ's interleaved order
    L.qzeros   int32 [groups, out / 8]   zero points, the same order, stored as they are (no offset)
    L.scales   fp16  [groups, out]
AWQ's weight is (q - z) * s like ours, so the export is lossless. Its kernels take 4 bits; other widths
go to compressed-tensors.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..quant import QuantConfig
from ..quant.packing import as_int32
from .packed_source import PackedExport, QuantizedLinear
from .safetensors_format import write_like_source

BITS = 4
# word nibble j holds column ORDER[j] of each 8 output columns (AWQ's GEMM kernels unpack in this order)
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit integers -> [R, C / 8] int32, each 8 columns in AWQ's order, low nibble first."""
    rows, cols = values.shape
    v = values.to(torch.int64).view(rows, cols // 8, 8)[..., list(ORDER)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    return as_int32((v << shifts).sum(-1))


def linear_tensors(name: str, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    out = {f"{name}.qweight": pack_columns(layer.codes.t()),
           f"{name}.qzeros": pack_columns(layer.zeros.t()),
           f"{name}.scales": layer.scales.t().contiguous()}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias
    return out


def quantization_config(quant: QuantConfig, source_meta: dict) -> dict:
    return {"quant_method": "awq", "bits": BITS, "group_size": quant.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None, "meta": source_meta}


class AWQ:
    name = "awq"

    def refusal(self, quant: QuantConfig, model_type: str) -> str | None:
        if quant.bits != BITS:
            return (f"the AWQ format holds 4-bit weights only, not {quant.bits}-bit; use `export_format` "
                    "compressed-tensors (any width) or gptq_v2")
        if quant.group_size == -1:
            return ("AWQ checkpoints are grouped; per-channel (`group_size` -1) weights go to `export_format` "
                    "compressed-tensors or gptq_v2")
        return None

    def write(self, source: PackedExport, folder: Path) -> Path:
        return write_like_source(source, folder, linear_tensors, quantization_config(source.quant, source.meta()))
