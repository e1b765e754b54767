"""A linear layer stored as GPTQ-v2 packed integers with trainable step sizes (E2E-QP, export).

`qweight` and `qzeros` are int32 *frozen parameters*, not buffers: DeepSpeed ZeRO-3 partitions and
offloads parameters but replicates buffers on every rank. `scales` is the only trainable tensor.
The forward dequantizes (W_int - z) * s so autograd reaches the scales, then matmuls; on a GPU the
Triton kernel (eqat_dist/kernels) does both without writing the float weight.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .config import QuantConfig
from .fake_quant import dequantize
from .packing import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros


class PackedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        cfg.check_layer("packed", in_features, out_features)
        self.cfg, self.in_features, self.out_features = cfg, in_features, out_features
        groups = cfg.groups_in(in_features)
        int_kw = dict(dtype=torch.int32, device=device)
        self.qweight = nn.Parameter(torch.zeros(in_features * cfg.bits // 32, out_features, **int_kw),
                                    requires_grad=False)
        self.qzeros = nn.Parameter(torch.zeros(groups, out_features * cfg.bits // 32, **int_kw),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.ones(groups, out_features, dtype=dtype, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.fixed_weight = None  # set for a pass that does not train (models/quantize.weights_fixed)

    @classmethod
    def from_int(cls, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, cfg: QuantConfig,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "PackedLinear":
        """From codes [out, in], zero points [out, groups] and scales [out, groups]."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, cfg, bias=bias is not None, dtype=dtype, device=codes.device)
        with torch.no_grad():
            layer.qweight.copy_(pack_qweight(codes, cfg.bits))
            layer.qzeros.copy_(pack_qzeros(zeros, cfg.bits))
            layer.scales.copy_(scales.t())
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def int_codes(self) -> torch.Tensor:
        """Codes [out, in], unpacked on every call and never kept: under ZeRO-3 `qweight` is gathered
        only for this layer's forward, and a kept copy (1 byte per weight, every layer) would undo the
        partitioning on every rank."""
        return unpack_qweight(self.qweight, self.cfg.bits)

    def int_zeros(self) -> torch.Tensor:
        return unpack_qzeros(self.qzeros, self.cfg.bits)

    def dequantized_weight(self) -> torch.Tensor:
        """Float weight [out, in] in the scales' dtype; differentiable w.r.t. `scales`."""
        group = self.cfg.effective_group(self.in_features)
        return dequantize(self.int_codes(), self.scales.t(), self.int_zeros(), group)

    def fix_weight(self) -> None:
        """Dequantize once for the batches of a pass that does not train (advancing a stream); on a GPU
        the kernels dequantize one layer at a time as it runs (eqat_dist/kernels) and keep no float weight."""
        if not kernels.enabled_for(self.qweight):
            with torch.no_grad():
                self.fixed_weight = self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.fixed_weight is not None:
            return nn.functional.linear(x, self.fixed_weight.to(x.dtype), bias)
        if kernels.enabled_for(x):  # dequantized by a kernel as it runs; no float weight saved (eqat_dist/kernels)
            from ..kernels.packed_linear import packed_linear
            if torch.is_autocast_enabled(x.device.type):  # autocast does not reach a custom Function by itself:
                x = x.to(torch.get_autocast_dtype(x.device.type))  # 16-bit tiles go to the tensor cores
            return packed_linear(x, self.qweight, self.qzeros, self.scales, self.bias, self.cfg.bits,
                                 self.cfg.effective_group(self.in_features))
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.cfg.tag()}, packed"
