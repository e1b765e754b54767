"""Writing an exported model's files, whatever the format: the shell (embeddings, final norm, lm_head)
and each decoder block as the format makes them, block by block, so that peak memory is one block
whatever the model's size (the whole model is never assembled, on rank 0 or anywhere).

Per-block sharding: shard 1 holds the shell, shard k + 2 block k, with the index Hugging Face loaders
read. `single_file` writes one model.safetensors instead (a whole model saved at once, small models);
the tensors are the same either way.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .staging import INDEX
from ..utils.files import save_safetensors

SINGLE = "model.safetensors"


def shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def write_model_files(folder: Path, shell: dict[str, torch.Tensor],
                      blocks: Iterable[tuple[int, dict[str, torch.Tensor]]], num_blocks: int, config: dict,
                      side_files: dict[str, dict], tokenizer, save_generation_config: Callable[[Path], None],
                      single_file: bool = False) -> Path:
    """The weights (blocks in order, each written and dropped before the next is asked for), then the
    index, config.json (`config`, which holds the format's quantization fields), the format's other
    JSON files (`side_files`), the generation config and the tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    total = num_blocks + 1
    weight_map, size, whole = {}, 0, {}
    for k, (index, tensors) in enumerate(blocks, start=2):
        if index != k - 2:
            raise RuntimeError(f"blocks must come in order: got block {index} for shard {k}")
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        if single_file:
            whole |= tensors
        else:
            save_safetensors(tensors, str(folder / shard_name(k, total)), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, shard_name(k, total))
        del tensors
    size += sum(t.numel() * t.element_size() for t in shell.values())
    if single_file:
        save_safetensors(shell | whole, str(folder / SINGLE), metadata={"format": "pt"})
    else:
        save_safetensors(shell, str(folder / shard_name(1, total)), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shell, shard_name(1, total))
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": size},
                                                "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, content in side_files.items():
        (folder / name).write_text(json.dumps(content, indent=2))
    save_generation_config(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
