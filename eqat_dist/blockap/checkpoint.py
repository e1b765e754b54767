"""Per-block persistence for resume: one safetensors file per finished block, written atomically,
plus a manifest of the settings that produced them (a restart with other settings is refused)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..utils.compare import describe_differences, recipe_hint
from ..utils.files import save_safetensors

from ..run_folder import MANIFEST  # noqa: F401  (named by the run folder's layout)


class ResumeError(RuntimeError):
    pass


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def open_run(folder: Path, settings: dict) -> None:
    """Create the checkpoint folder, or check that an existing one was made with the same settings."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST
    if manifest.exists():
        before = json.loads(manifest.read_text())
        detail = describe_differences(before, settings)
        if detail:
            raise ResumeError(f"{folder} holds blocks trained with other settings ({detail}). Run with the "
                              "original settings to resume, or pass `overwrite` to start again"
                              + recipe_hint(before, settings) + ".")
    else:
        _atomic_write_text(manifest, json.dumps(settings, indent=2, sort_keys=True))


def block_path(folder: Path, index: int) -> Path:
    return folder / f"block_{index:04d}.safetensors"


def save_block(folder: Path, index: int, block: torch.nn.Module, report: dict) -> Path:
    path = block_path(folder, index)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
    save_safetensors(state, tmp, metadata={"report": json.dumps(report)})
    os.replace(tmp, path)  # a block file is either whole or absent
    return path


def finished_blocks(folder: Path, num_blocks: int) -> set[int]:
    return {i for i in range(num_blocks) if block_path(folder, i).exists()}


def load_block(folder: Path, index: int, block: torch.nn.Module) -> dict:
    """Load block `index` into `block` (already in packed form); returns its training report."""
    path = block_path(folder, index)
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            report = json.loads((f.metadata() or {}).get("report", "{}"))
        block.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ResumeError(f"checkpoint {path} cannot be loaded ({str(err)[:300]}). Delete that file to "
                          "retrain the block, then run the same command again.") from err
    return report
