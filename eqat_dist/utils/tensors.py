"""Reading the tensors of a folder of safetensors files lazily, one tensor at a time."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(RuntimeError):
    pass


class LazyTensors(Mapping):
    """The tensors of a folder's .safetensors files, each read when asked for: a rank that feeds a
    partitioned model module by module never holds the whole checkpoint in memory."""

    def __init__(self, path: Path):
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} has no .safetensors weights.")
        self._handles, self._file_of = {}, {}
        for f in files:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"{f} is corrupt or truncated ({err}); re-export the model.") from err
            self._file_of.update(dict.fromkeys(self._handles[f].keys(), f))

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self._file_of[key]
        try:
            return self._handles[f].get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{f}: tensor {key} cannot be read ({err}); re-export the model.") from err

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)
