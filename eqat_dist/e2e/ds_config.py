"""The DeepSpeed config files and the batch arithmetic, without importing DeepSpeed: the CLI checks them
before any work, the planner reads the ZeRO stage from them, ds_setup builds the engine's config."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"zero3-offload": "zero3_offload.json", "zero3": "zero3.json", "single-gpu": "single_gpu.json"}


def read_ds_config(name_or_path: str) -> dict:
    """A named config from ds_configs/ or the user's JSON file, with one clear error for either."""
    path = ROOT / "ds_configs" / CONFIGS[name_or_path] if name_or_path in CONFIGS else Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"`ds_config` {name_or_path}: not a file nor one of {', '.join(CONFIGS)}")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"`ds_config` {path} is not valid JSON ({err}); fix the file or use one of "
                         f"{', '.join(CONFIGS)}") from err
    if not isinstance(config, dict):
        raise ValueError(f"`ds_config` {path} must hold a JSON object")
    return config


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient accumulation that keeps the global batch whatever the number of ranks."""
    if global_batch % (micro_batch * world):
        raise ValueError(f"`e2e_global_batch` {global_batch} is not a multiple of micro batch {micro_batch} x "
                         f"{world} ranks; choose a global batch divisible by {micro_batch * world}")
    return global_batch // (micro_batch * world)
