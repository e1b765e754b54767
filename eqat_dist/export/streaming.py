"""Write the packed model block by block: one safetensors shard per decoder block plus one for the
embeddings, final norm and lm_head, with the index Hugging Face loaders read. Peak memory is about one
block, whatever the model's size: the whole model is never assembled, on rank 0 or anywhere.

Same tensors, names and dtypes as `save_packed_model` (which needs the whole model in memory and stays
for E2E-QP's gathered export); only the file split differs.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.quantize import packed_linears
from ..quant import QuantConfig
from .gptq_v2 import EXPORT_DTYPE, INDEX, _g_idx, publish_export, quantization_config


def _shard(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def _block_tensors(block: torch.nn.Module, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A packed block's tensors as the export holds them: integers as they are, scales in float16,
    g_idx added, the rest (norms, biases) in the export dtype."""
    layers = {name: layer for name, layer in packed_linears(block).items()}
    out = {}
    for key, value in block.state_dict().items():
        value = value.detach().cpu()
        if key.endswith(".scales"):
            value = value.to(EXPORT_DTYPE)
        elif value.is_floating_point():
            value = value.to(dtype)
        out[prefix + key] = value.contiguous()
    for name, layer in layers.items():
        out[f"{prefix}{name}.g_idx"] = _g_idx(layer)
    return out


def write_packed_blocks(source, blocks: Iterable[tuple[int, torch.nn.Module]], tokenizer, out_dir: str | os.PathLike,
                        cfg: QuantConfig, method: str, dtype: torch.dtype = torch.float16) -> Path:
    """Export `source` (a LazyModel: its shell and config) with the packed blocks `blocks` yields, in
    order, one at a time; each is written and dropped before the next is asked for."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-export-", dir=out_dir.parent))
    try:
        total = source.num_blocks + 1
        weight_map, size = {}, 0
        shell = {k: v.detach().cpu().to(dtype).contiguous() for k, v in source.model.state_dict().items()
                 if not k.startswith(source.prefix + ".")}
        if getattr(source.config, "tie_word_embeddings", False):
            shell.pop("lm_head.weight", None)
        for k, (index, block) in enumerate(blocks, start=2):
            if index != k - 2:
                raise RuntimeError(f"blocks must come in order: got block {index} for shard {k}")
            tensors = _block_tensors(block, f"{source.prefix}.{index}.", dtype)
            save_file(tensors, str(tmp / _shard(k, total)), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, _shard(k, total))
            size += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors, block
        save_file(shell, str(tmp / _shard(1, total)), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shell, _shard(1, total))
        size += sum(t.numel() * t.element_size() for t in shell.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))},
                                            indent=2))
        config = source.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = str(dtype).removeprefix("torch.")
        config["quantization_config"] = quantization_config(cfg, method)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "quantize_config.json").write_text(json.dumps(quantization_config(cfg, method), indent=2))
        if getattr(source.model, "generation_config", None) is not None:
            source.model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return publish_export(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
