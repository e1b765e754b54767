"""Writing an exported model's files, whatever the format: the shell (embeddings, final norm, lm_head)
and each decoder block as the format makes them, block by block, so that the whole model is never
assembled (on rank 0 or anywhere): peak memory is one shard.

Shards as Hugging Face writes them: whole blocks gathered up to MAX_SHARD_BYTES a file, the shell in the
first; one file (model.safetensors) when the model fits in one, else model-0000k-of-0000n.safetensors
with the index loaders read. A loader pays per file (accelerate collects garbage after each, a quarter
of a second in a loaded process), so a 135M export is one file, not one per block.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .staging import INDEX
from ..utils.files import save_safetensors

SINGLE = "model.safetensors"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' usual "5GB"


def shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_model_files(folder: Path, shell: dict[str, torch.Tensor],
                      blocks: Iterable[tuple[int, dict[str, torch.Tensor]]], num_blocks: int, config: dict,
                      side_files: dict[str, dict], tokenizer, save_generation_config: Callable[[Path], None],
                      single_file: bool = False) -> Path:
    """The weights (blocks in order, each dropped once its shard is written), then the index when there
    are several shards, config.json (`config`, which holds the format's quantization fields), the
    format's other JSON files (`side_files`), the generation config and the tokenizer. `single_file`:
    one model.safetensors whatever the size."""
    folder.mkdir(parents=True, exist_ok=True)
    limit = float("inf") if single_file else MAX_SHARD_BYTES
    written: list[tuple[Path, list[str]]] = []  # each shard under a provisional name, and its tensors
    pending, size = dict(shell), _bytes(shell)
    pending_bytes = size

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = folder / f"shard-{len(written) + 1:05d}.partial"  # the total is known at the end only
        save_safetensors(pending, str(path), metadata={"format": "pt"})
        written.append((path, list(pending)))
        pending, pending_bytes = {}, 0

    expected = 0
    for index, tensors in blocks:
        if index != expected:
            raise RuntimeError(f"blocks must come in order: got block {index} where block {expected} belongs")
        expected += 1
        block_bytes = _bytes(tensors)
        if pending and pending_bytes + block_bytes > limit:
            flush()
        pending |= tensors
        pending_bytes += block_bytes
        size += block_bytes
    if expected != num_blocks:
        raise RuntimeError(f"{expected} blocks written of {num_blocks}")
    flush()
    if len(written) == 1:
        written[0][0].rename(folder / SINGLE)
    else:
        weight_map = {}
        for k, (path, names) in enumerate(written, start=1):
            path.rename(folder / shard_name(k, len(written)))
            weight_map |= dict.fromkeys(names, shard_name(k, len(written)))
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": size},
                                                "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, content in side_files.items():
        (folder / name).write_text(json.dumps(content, indent=2))
    save_generation_config(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
