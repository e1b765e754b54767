"""Write the packed model block by block: one safetensors shard per decoder block plus one for the
embeddings, final norm and lm_head, with the index Hugging Face loaders read. Peak memory is about one
block, whatever the model's size: the whole model is never assembled, on rank 0 or anywhere.

Same tensors, names and dtypes as `save_packed_model` (which needs the whole model in memory); only the
file split differs. After E2E-QP the export is the checkpoint it started from with each block's trained
scales put in, gathered and written one block at a time.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.quantize import packed_linears
from ..quant import QuantConfig
from ..utils.tensors import LazyTensors
from .gptq_v2 import EXPORT_DTYPE, _g_idx, quantization_config
from .staging import INDEX


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


def write_packed_blocks(source, blocks: Iterable[tuple[int, torch.nn.Module]], tokenizer, folder: str | os.PathLike,
                        cfg: QuantConfig, method: str, dtype: torch.dtype = torch.float16) -> Path:
    """Export `source` (a LazyModel: its shell and config) into the new or empty `folder` (a stage, see
    staging.py), with the packed blocks `blocks` yields, in order, one at a time; each is written and
    dropped before the next is asked for."""
    shell = {k: v.detach().cpu().to(dtype).contiguous() for k, v in source.model.state_dict().items()
             if not k.startswith(source.prefix + ".")}
    if getattr(source.config, "tie_word_embeddings", False):
        shell.pop("lm_head.weight", None)
    tensors = ((i, _block_tensors(block, f"{source.prefix}.{i}.", dtype)) for i, block in blocks)
    config = source.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    generation = getattr(source.model, "generation_config", None)
    return _write_shards(Path(folder), shell, tensors, source.num_blocks, config, cfg, method, tokenizer,
                         lambda dst: generation.save_pretrained(dst) if generation is not None else None)


def write_e2e_blocks(start: str | os.PathLike, gathered: Iterable[tuple[int, dict[str, torch.Tensor]]],
                     blocks_name: str, tokenizer, folder: str | os.PathLike, method: str,
                     dtype: torch.dtype = torch.float16) -> dict:
    """Export an E2E-QP result: the packed checkpoint `start` it was trained from, with each block's
    scales replaced by the trained ones. `gathered` yields (block index, that block's parameters) one
    block at a time (see e2e/ds_setup.gathered_blocks), so the trained model is never whole anywhere;
    `blocks_name` is the blocks' module name (models.blocks.blocks_name).
    Returns the self-checks for results.json: integer tensors unchanged, scales changed."""
    from .gptq_v2 import read_quant_config

    start = Path(start)
    old = LazyTensors(start)
    config = json.loads((start / "config.json").read_text())
    prefix = blocks_name + "."
    shell = {k: _cast(k, old[k], dtype) for k in old if not k.startswith(prefix)}
    checks = {"integers_unchanged": True, "scales_changed": 0}

    def blocks():
        for i, trained in gathered:
            own = f"{prefix}{i}."
            tensors = {k: _cast(k, old[k], dtype) for k in old if k.startswith(own)}
            for name, value in trained.items():
                key = own + name
                if key not in tensors:
                    raise KeyError(f"{start} has no tensor {key}: the trained model does not match it")
                if name.endswith(".scales"):
                    new = value.to(EXPORT_DTYPE)
                    checks["scales_changed"] += not torch.equal(new, tensors[key])
                    tensors[key] = new.contiguous()
                elif not value.is_floating_point():
                    checks["integers_unchanged"] &= torch.equal(value, tensors[key])
            yield i, tensors

    config["dtype"] = str(dtype).removeprefix("torch.")
    _write_shards(Path(folder), shell, blocks(), config["num_hidden_layers"], config, read_quant_config(start),
                  method, tokenizer, lambda dst: _copy_if_there(start / "generation_config.json", dst))
    return checks


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if key.endswith(".scales") or not value.is_floating_point():
        return value
    return value.to(dtype)


def _copy_if_there(path: Path, folder: Path) -> None:
    if path.exists():
        shutil.copy2(path, folder / path.name)


def _write_shards(folder: Path, shell: dict, blocks, num_blocks: int, config: dict, cfg: QuantConfig, method: str,
                  tokenizer, save_generation_config) -> Path:
    """Shard 1: embeddings, final norm, lm_head; shard k + 2: block k. Then the index, config.json with
    quantization_config, quantize_config.json, the generation config and the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    total = num_blocks + 1
    weight_map, size = {}, 0
    for k, (index, tensors) in enumerate(blocks, start=2):
        if index != k - 2:
            raise RuntimeError(f"blocks must come in order: got block {index} for shard {k}")
        save_file(tensors, str(folder / _shard(k, total)), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, _shard(k, total))
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    save_file(shell, str(folder / _shard(1, total)), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(shell, _shard(1, total))
    size += sum(t.numel() * t.element_size() for t in shell.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))},
                                           indent=2))
    config = dict(config)
    config.pop("quantization_config", None)
    config["quantization_config"] = quantization_config(cfg, method)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "quantize_config.json").write_text(json.dumps(quantization_config(cfg, method), indent=2))
    save_generation_config(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
