"""Swap the linear layers of a decoder block between float, fake-quantized and packed forms."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..quant import PackedLinear, QuantConfig, QuantLinear
from .blocks import block_linears, decoder_layers, set_submodule


def check_model(model: nn.Module, cfg: QuantConfig) -> None:
    """Fail before any work if some layer cannot be quantized with `cfg` (the message names it)."""
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block).items():
            cfg.check_layer(f"layers.{i}.{name}", lin.in_features, lin.out_features)


def to_fake_quant(block: nn.Module, cfg: QuantConfig) -> nn.Module:
    """nn.Linear -> QuantLinear (min/max initialised), in place; returns the block."""
    for name, lin in block_linears(block).items():
        set_submodule(block, name, QuantLinear(lin, cfg, name))
    return block


def quant_linears(block: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}


def packed_linears(block: nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, PackedLinear)}


def to_packed(block: nn.Module, cfg: QuantConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """QuantLinear -> PackedLinear with the same integers and scales, in place."""
    for name, q in quant_linears(block).items():
        codes, zeros, scales = q.to_int()
        bias = None if q.bias is None else q.bias.detach()
        set_submodule(block, name, PackedLinear.from_int(codes, zeros, scales, cfg, bias, dtype=dtype))
    return block


def packed_skeleton(block: nn.Module, cfg: QuantConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """nn.Linear -> empty PackedLinear of the same shape (to load packed weights into), in place."""
    for name, lin in block_linears(block).items():
        set_submodule(block, name, PackedLinear(lin.in_features, lin.out_features, cfg,
                                                bias=lin.bias is not None, dtype=dtype))
    return block


def quantize_rtn(model: nn.Module, cfg: QuantConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Round-to-nearest with the paper's min/max initialisation: every block packed, in place."""
    check_model(model, cfg)
    for block in decoder_layers(model):
        to_packed(to_fake_quant(block, cfg), cfg, dtype)
    return model


@contextlib.contextmanager
def weights_fixed(block: nn.Module):
    """For a pass over many batches that does not train (validation, advancing a stream): every quantized
    layer's float weight computed once for the pass, not once per batch. The same values (the weight is
    an element-wise function of parameters that do not change during the pass)."""
    layers = [m for m in block.modules() if isinstance(m, (QuantLinear, PackedLinear))]
    for layer in layers:
        layer.fix_weight()
    try:
        yield block
    finally:
        for layer in layers:
            layer.fixed_weight = None
