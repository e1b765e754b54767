"""Quantizer, packed format and the modules swapped into a model."""
from .config import QuantConfig, QuantConfigError, SUPPORTED_BITS
from .fake_quant import QuantLinear, fake_quantize, minmax_init, quantize_to_int, dequantize
from .packed_linear import PackedLinear
from .packing import pack_qweight, unpack_qweight, pack_qzeros, unpack_qzeros

__all__ = [
    "QuantConfig", "QuantConfigError", "SUPPORTED_BITS", "QuantLinear", "fake_quantize", "minmax_init",
    "quantize_to_int", "dequantize", "PackedLinear", "pack_qweight", "unpack_qweight", "pack_qzeros",
    "unpack_qzeros",
]
