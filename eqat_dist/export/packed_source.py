"""A finished GPTQ-v2 export read back block by block, each quantized linear decoded to its integers:
what the other formats' writers (serving.py) start from. Nothing is held beyond the block asked for.

    source = PackedExport(folder)
    source.shell()             embeddings, final norm, lm_head (if not tied): {name: tensor}
    source.block(i)            (linears {name: QuantizedLinear}, other tensors {name: tensor}) of block i
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..quant import QuantConfig
from ..quant.packing import unpack_qweight, unpack_qzeros
from ..utils.tensors import CheckpointError, LazyTensors
from .gptq_v2 import read_quant_config

LINEAR_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")


@dataclass
class QuantizedLinear:
    """One layer's grid: weight = (codes - zeros) * scales, group by group along the input."""
    codes: torch.Tensor   # [out, in] int32 in [0, 2^bits)
    zeros: torch.Tensor   # [out, groups] int32 in [0, 2^bits)
    scales: torch.Tensor  # [out, groups] float16, as the export holds them
    bias: torch.Tensor | None
    group: int            # the input columns per group (the input width when per channel)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] the export stands for."""
        codes = self.codes.float().view(self.codes.shape[0], -1, self.group)
        return ((codes - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)).flatten(1)


class PackedExport:
    """A GPTQ-v2 folder eqat-dist wrote (a run's output or an export), read lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "config.json").exists():
            raise CheckpointError(f"{self.folder} has no config.json: pass a finished run's output folder "
                                  "or a GPTQ v2 export.")
        self.config = json.loads((self.folder / "config.json").read_text())
        self.quant: QuantConfig = read_quant_config(self.folder)
        self.tensors = LazyTensors(self.folder)
        self.num_blocks = int(self.config["num_hidden_layers"])
        self.prefix = self._blocks_prefix()

    def _blocks_prefix(self) -> str:
        """`model.layers` (or the family's path): the part of a qweight's name before the block index."""
        for key in self.tensors:
            if key.endswith(".qweight"):
                head, _, rest = key.partition(".layers.")
                if rest.split(".", 1)[0].isdigit():
                    return head + ".layers"
        raise CheckpointError(f"{self.folder} holds no packed layers (no .qweight tensors); not a packed export.")

    def meta(self) -> dict:
        """What made the export (its quantization_config's `meta`), carried into every format."""
        return dict(self.config["quantization_config"].get("meta", {}))

    def shell(self) -> dict[str, torch.Tensor]:
        return {k: self.tensors[k] for k in self.tensors if not k.startswith(self.prefix + ".")}

    def block(self, i: int) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
        own = f"{self.prefix}.{i}."
        names = [k[len(own):] for k in self.tensors if k.startswith(own)]
        layers = sorted(n[:-len(".qweight")] for n in names if n.endswith(".qweight"))
        linears = {name: self._linear(own + name) for name in layers}
        taken = {f"{layer}.{part}" for layer in layers for part in LINEAR_PARTS}
        others = {n: self.tensors[own + n] for n in sorted(names) if n not in taken}
        return linears, others

    def _linear(self, name: str) -> QuantizedLinear:
        bits = self.quant.bits
        codes = unpack_qweight(self.tensors[name + ".qweight"], bits).contiguous()
        zeros = unpack_qzeros(self.tensors[name + ".qzeros"], bits)
        scales = self.tensors[name + ".scales"].t().contiguous()
        in_features = codes.shape[1]
        if name + ".g_idx" in self.tensors:
            expected = torch.arange(in_features) // self.quant.effective_group(in_features)
            if not torch.equal(self.tensors[name + ".g_idx"].long(), expected):
                raise CheckpointError(f"{self.folder}: layer {name} uses a reordered g_idx (act-order), which "
                                      "no other format here holds.")
        bias = self.tensors[name + ".bias"] if name + ".bias" in self.tensors else None
        return QuantizedLinear(codes, zeros, scales, bias,
                               self.quant.effective_group(in_features))
