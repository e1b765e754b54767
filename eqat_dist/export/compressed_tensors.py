"""compressed-tensors "pack-quantized": the layout llm-compressor writes for asymmetric grouped integer
weights, which vLLM serves (WNA16 with zero points; Marlin kernels at 4 and 8 bits).

Per quantized linear `L`:
    L.weight_packed      int32 [out, in * bits / 32]   codes along the input, 32 codes in `bits` words
    L.weight_scale       fp16  [out, groups]
    L.weight_zero_point  int32 [out * bits / 32, groups]   zero points packed along the output
    L.weight_shape       int64 [2]                     (out, in)
compressed-tensors holds codes as signed values q - 2^(bits-1) and packs them with that offset added
back, so the stored bits are our codes and zero points unchanged, and (q - z) * s is the same number:
the format holds every width we make (2, 3, 4, 8) without loss. Its packing is one dense bit stream of
32 values per `bits` words, as GPTQ's (3-bit in this layout needs compressed-tensors >= 0.18; earlier
versions packed 10 per word).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..quant import QuantConfig
from ..quant.packing import pack_qweight, pack_qzeros
from .packed_source import PackedExport, QuantizedLinear
from .safetensors_format import write_like_source


def quantization_config(quant: QuantConfig, source_meta: dict) -> dict:
    """What llm-compressor writes for this scheme (compressed-tensors' own config model parses it)."""
    per_channel = quant.group_size == -1
    weights = {"num_bits": quant.bits, "type": "int", "symmetric": False, "dynamic": False,
               "strategy": "channel" if per_channel else "group",
               "group_size": None if per_channel else quant.group_size}
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, "meta": source_meta,
    }


def linear_tensors(name: str, layer: QuantizedLinear, bits: int) -> dict[str, torch.Tensor]:
    out = {f"{name}.weight_packed": pack_qweight(layer.codes, bits).t().contiguous(),
           f"{name}.weight_scale": layer.scales.contiguous(),
           f"{name}.weight_zero_point": pack_qzeros(layer.zeros, bits).t().contiguous(),
           f"{name}.weight_shape": torch.tensor(list(layer.codes.shape), dtype=torch.int64)}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias
    return out


class CompressedTensors:
    name = "compressed-tensors"

    def refusal(self, quant: QuantConfig, model_type: str) -> str | None:
        return None  # every width and group size we make (1-8 bits in the format)

    def write(self, source: PackedExport, folder: Path) -> Path:
        return write_like_source(source, folder, lambda name, layer: linear_tensors(name, layer, source.quant.bits),
                                 quantization_config(source.quant, source.meta()))
