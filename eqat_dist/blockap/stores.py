"""Activation stores for the teacher (full-precision) and student streams: on the accelerator, in
CPU memory (pinned when a GPU will read it) or on disk (memory-mapped). Same interface, same bits."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

PLACEMENTS = ("gpu", "cpu", "disk")


class ActivationStore:
    """`count` activations of shape [seqlen, hidden], read and written by batches of indices."""

    def __init__(self, count: int, seqlen: int, hidden: int, dtype: torch.dtype, placement: str,
                 device: torch.device, disk_dir: str | os.PathLike | None = None, name: str = "acts"):
        if placement not in PLACEMENTS:
            raise ValueError(f"--activations {placement!r}: use one of {', '.join(PLACEMENTS)}")
        if placement == "gpu" and torch.device(device).type == "cpu":
            raise ValueError("--activations gpu needs a GPU; use --activations cpu or disk on this machine")
        self.count, self.shape, self.dtype, self.device, self.placement = count, (seqlen, hidden), dtype, device, placement
        self._item_bytes = seqlen * hidden * torch.tensor([], dtype=dtype).element_size()
        self._file = None
        if placement == "gpu":
            self._data = torch.empty(count, seqlen, hidden, dtype=dtype, device=device)
        elif placement == "cpu":
            pin = torch.device(device).type == "cuda"
            self._data = torch.empty(count, seqlen, hidden, dtype=dtype, pin_memory=pin)
        else:
            folder = Path(disk_dir or tempfile.gettempdir())
            folder.mkdir(parents=True, exist_ok=True)
            fd, self._file = tempfile.mkstemp(prefix=f"{name}-", suffix=".bin", dir=folder)
            os.close(fd)
            self._mm = np.memmap(self._file, dtype=np.uint8, mode="w+", shape=(max(count, 1), self._item_bytes))

    @property
    def nbytes(self) -> int:
        return self.count * self._item_bytes

    def __len__(self) -> int:
        return self.count

    def get(self, index) -> torch.Tensor:
        """Rows `index` (list of ints) on the compute device."""
        if self.placement == "disk":
            rows = torch.from_numpy(np.ascontiguousarray(self._mm[list(index)]))
            return rows.view(self.dtype).reshape(len(index), *self.shape).to(self.device)
        return self._data[list(index)].to(self.device, non_blocking=True)

    def put(self, index, values: torch.Tensor) -> None:
        values = values.detach().to(self.dtype)
        if self.placement == "disk":
            raw = values.cpu().contiguous().reshape(len(index), -1).view(torch.uint8).numpy()
            self._mm[list(index)] = raw
        else:
            self._data[list(index)] = values.to(self._data.device)

    def host_rows(self, a: int, b: int) -> torch.Tensor | None:
        """Rows a..b as a writable CPU tensor sharing the store's memory (a receive can land there
        directly), or None when the rows live on a GPU."""
        if self.placement == "cpu":
            return self._data[a:b]
        if self.placement == "disk":
            return torch.from_numpy(self._mm[a:b]).view(self.dtype).reshape(b - a, *self.shape)
        return None

    def copy_from(self, other: "ActivationStore", batch: int = 8) -> None:
        for start in range(0, self.count, batch):
            idx = list(range(start, min(start + batch, self.count)))
            self.put(idx, other.get(idx))

    def close(self) -> None:
        if self._file:
            del self._mm
            os.unlink(self._file)
            self._file = None
        else:
            self._data = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def describe_memory(stores: dict[str, "ActivationStore"]) -> str:
    total = sum(s.nbytes for s in stores.values())
    parts = ", ".join(f"{name} {s.nbytes / 2**20:.1f} MiB" for name, s in stores.items())
    place = next(iter(stores.values())).placement if stores else "-"
    return f"activation stores on {place}: {parts}; total {total / 2**30:.3f} GiB"
