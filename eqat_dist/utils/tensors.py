"""Reading the tensors of a folder of safetensors files lazily, one tensor at a time.

Tensors are read with pread into fresh memory, not through a memory map: pages of a mapped checkpoint
stay in the process's resident set after the copy, so a rank that reads its blocks one by one would
grow by every block it has read (about 200 MB per block of a 1B model, measured), which hides real
memory use and, at 70B, looks like a leak of the checkpoint's size.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def _header(path: Path) -> tuple[dict, int]:
    """The safetensors header of `path` (name -> dtype, shape, data_offsets) and where the data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ValueError(f"header of {length} bytes in a file of {size}")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    start = 8 + length
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in DTYPES or start + end > size or begin > end:
            raise ValueError(f"tensor {name} lies outside the file or has an unknown dtype {info['dtype']}")
    return header, start


class LazyTensors(Mapping):
    """The tensors of a folder's .safetensors files, each read when asked for: a rank that feeds a
    partitioned model module by module never holds the whole checkpoint in memory."""

    def __init__(self, path: Path):
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} has no .safetensors weights.")
        self._index = {}  # name -> (file, dtype, shape, absolute offset, bytes)
        for f in files:
            try:
                header, start = _header(f)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{f} is corrupt or truncated ({err}); re-export the model.") from err
            for name, info in header.items():
                begin, end = info["data_offsets"]
                self._index[name] = (f, DTYPES[info["dtype"]], info["shape"], start + begin, end - begin)

    def __getitem__(self, key: str) -> torch.Tensor:
        f, dtype, shape, offset, nbytes = self._index[key]
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        try:
            with open(f, "rb", buffering=0) as handle:
                handle.seek(offset)
                while got < nbytes:  # one read returns at most about 2 GB on Linux
                    n = handle.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as err:
            raise CheckpointError(f"{f}: tensor {key} cannot be read ({err}); re-export the model.") from err
        if got != nbytes:
            raise CheckpointError(f"{f}: tensor {key} is cut short ({got} of {nbytes} bytes); re-export the model.")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)
