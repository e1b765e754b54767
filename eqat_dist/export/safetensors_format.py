"""Writing a safetensors format (compressed-tensors, AWQ) from a GPTQ-v2 export, block by block: the
shell as it is, each block's quantized linears re-encoded by the format, its other tensors (norms) as
they are, config.json with the format's `quantization_config`, and the tokenizer and generation files
copied from the source."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .packed_source import PackedExport, QuantizedLinear
from .shards import write_model_files

# what a Hugging Face folder holds besides weights and config.json
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def copy_side_files(source: Path, folder: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, folder / name)


def write_like_source(source: PackedExport, folder: Path,
                      encode: Callable[[str, QuantizedLinear], dict[str, torch.Tensor]],
                      quantization_config: dict, side_files: dict | None = None) -> Path:
    """`encode(name, layer)` gives a layer's tensors in the format, under their full names."""
    def blocks():
        for i in range(source.num_blocks):
            linears, others = source.block(i)
            own = f"{source.prefix}.{i}."
            tensors = {own + name: value for name, value in others.items()}
            for name, layer in linears.items():
                tensors |= encode(own + name, layer)
            yield i, tensors

    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    config["quantization_config"] = quantization_config
    write_model_files(folder, source.shell(), blocks(), source.num_blocks, config, side_files or {}, None,
                      lambda dst: copy_side_files(source.folder, dst))
    return folder
