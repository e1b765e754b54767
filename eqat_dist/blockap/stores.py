"""Activation stores for the teacher (full-precision) and student streams: on the accelerator, in host
memory, or on disk. Same interface, same bits.

Host and disk stores are plain (pageable) memory or files. A GPU never reads them directly: rows go
through small pinned staging buffers (blockap/feed.py), which is what makes copies asynchronous, and
keeps the big stores out of PyTorch's pinned allocator (it rounds every block up to a power of two: a
65 GB store would pin 128 GB). Writes from a GPU are written behind: the rows are copied to a pinned
slot on the compute stream and stored by a helper thread while the GPU goes on; every read waits for
the writes before it (`flush`).

Disk stores have fixed file names per run and rank, so a resumed run reuses the files of the run it
resumes instead of adding new ones (at 70B a node's stores are terabytes).

A host or disk store may keep its first `device_rows` rows on the compute device (`activations_on_gpu`):
the GPU memory a block's training leaves free holds part of the stores, and host memory the rest (at 70B
on 8 x 80 GB with 1 TiB that is what keeps the stores out of disk). Those rows are read and written on
the device; a batch is put together from both parts.
"""
from __future__ import annotations

import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

PLACEMENTS = ("gpu", "cpu", "disk")


def _runs(index: list[int]) -> list[tuple[int, int, int]]:
    """(first row, rows, position in `index`) for each run of consecutive rows: one read per run."""
    runs = []
    for pos, row in enumerate(index):
        if runs and row == runs[-1][0] + runs[-1][1] and pos == runs[-1][2] + runs[-1][1]:
            first, count, start = runs[-1]
            runs[-1] = (first, count + 1, start)
        else:
            runs.append((row, 1, pos))
    return runs


def remove_stale_stores(folder: str | os.PathLike, prefix: str) -> list[Path]:
    """Delete this run's store files left by a killed run (called before any rank opens its own)."""
    folder = Path(folder)
    stale = sorted(folder.glob(f"{prefix}-*.bin")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class ActivationStore:
    """`count` activations of shape [seqlen, hidden], read and written by rows."""

    def __init__(self, count: int, seqlen: int, hidden: int, dtype: torch.dtype, placement: str,
                 device: torch.device, disk_dir: str | os.PathLike | None = None, name: str = "store",
                 device_rows: int = 0):
        if placement not in PLACEMENTS:
            raise ValueError(f"activation placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
        if placement == "gpu" and torch.device(device).type == "cpu":
            raise ValueError("activations on the GPU need a GPU; keep them in host memory or on disk on this machine")
        self.count, self.shape, self.dtype, self.placement = count, (seqlen, hidden), dtype, placement
        self.device = torch.device(device)
        self._item_bytes = seqlen * hidden * torch.tensor([], dtype=dtype).element_size()
        self._file = self._fd = None
        self._writes: list[Future] = []  # rows written behind, not yet known to be stored
        self._writes_lock = threading.Lock()  # a feed's helper thread flushes while this one writes
        self._writer = None  # the helper thread of written-behind rows (GPU -> host), made on first use
        self._slots: list[torch.Tensor | None] = [None, None]  # pinned buffers the rows are copied into
        self._slot_writes: list[Future | None] = [None, None]  # each buffer's last store
        self._next_slot = 0
        # rows 0 .. device_rows - 1 live on the device (host stores only); the host holds the others, from 0
        self.device_rows = 0 if placement == "gpu" else max(0, min(int(device_rows), count))
        self._head = (torch.empty(self.device_rows, seqlen, hidden, dtype=dtype, device=device)
                      if self.device_rows else None)
        host_count = count - self.device_rows
        if placement == "gpu":
            self._data = torch.empty(count, seqlen, hidden, dtype=dtype, device=device)
        elif placement == "cpu":
            self._data = torch.empty(host_count, seqlen, hidden, dtype=dtype)
        else:
            folder = Path(disk_dir or tempfile.gettempdir())
            folder.mkdir(parents=True, exist_ok=True)
            self._file = folder / f"{name}.bin"
            self._fd = os.open(self._file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, max(host_count, 1) * self._item_bytes)  # sparse until written
            self._mm = np.memmap(self._file, dtype=np.uint8, mode="r+", shape=(max(host_count, 1), self._item_bytes))

    @property
    def nbytes(self) -> int:
        return self.count * self._item_bytes

    @property
    def on_host(self) -> bool:
        """Whether any of its rows live in host memory or on disk (read through staging buffers)."""
        return self.placement != "gpu" and self.device_rows < self.count

    @property
    def device_nbytes(self) -> int:
        return (self.count if self.placement == "gpu" else self.device_rows) * self._item_bytes

    def _positions(self, index: list[int]) -> tuple[list[int], list[int]]:
        """(positions in `index` of rows kept on the device, positions of rows kept on the host)."""
        on_device = [p for p, r in enumerate(index) if r < self.device_rows]
        return on_device, [p for p, r in enumerate(index) if r >= self.device_rows]

    def rows_on_host(self, index: list[int]) -> list[int]:
        """The rows of `index` kept in host memory or on disk, in order."""
        return [r for r in index if r >= self.device_rows] if self.device_rows else list(index)

    def with_device_rows(self, index: list[int], host_part: torch.Tensor | None) -> torch.Tensor:
        """Rows `index` on the device, from `host_part` (rows_on_host(index), already on the device) and
        the rows kept there."""
        on_device, on_host = self._positions(index) if self.device_rows else ([], index)
        if not on_device:
            return host_part  # every row came from the host: nothing to put together
        out = torch.empty(len(index), *self.shape, dtype=self.dtype, device=self._head.device)
        out[on_device] = self._head[[index[p] for p in on_device]]
        if on_host:
            out[on_host] = host_part.to(out.device)
        return out

    def __len__(self) -> int:
        return self.count

    # -- reading ---------------------------------------------------------------------------------
    def read_into(self, index: list[int], out: torch.Tensor) -> torch.Tensor:
        """Host rows `index` into the host tensor `out` ([len(index), seqlen, hidden], contiguous):
        a gather for memory stores, one positioned read per run of consecutive rows for disk stores.
        Every row must be one the host holds (rows_on_host)."""
        self.flush()
        if self.device_rows:
            if index and min(index) < self.device_rows:
                raise ValueError("read_into reads host rows only; rows below device_rows live on the device")
            index = [r - self.device_rows for r in index]
        if self.placement == "cpu":
            torch.index_select(self._data, 0, torch.tensor(index, dtype=torch.long), out=out)
        elif self.placement == "disk":
            raw = out.view(torch.uint8).reshape(len(index), self._item_bytes).numpy()
            for first, count, pos in _runs(index):
                view, offset = memoryview(raw[pos:pos + count]).cast("B"), first * self._item_bytes
                done = 0
                while done < len(view):  # one read returns at most about 2 GB on Linux
                    n = os.preadv(self._fd, [view[done:]], offset + done)
                    if n <= 0:
                        raise OSError(f"{self._file}: short read at row {first}")
                    done += n
        else:
            raise ValueError("read_into is for host stores")
        return out

    def get(self, index) -> torch.Tensor:
        """Rows `index` (list of ints) on the compute device (synchronous: training reads through
        blockap/feed.py, which overlaps the copies with compute)."""
        index = list(index)
        if self.placement == "gpu":
            self.flush()
            return self._data[index]
        host = self.rows_on_host(index)
        rows = self.read_into(host, torch.empty(len(host), *self.shape, dtype=self.dtype)).to(self.device)
        return self.with_device_rows(index, rows)

    def host_rows(self, a: int, b: int) -> torch.Tensor | None:
        """Rows a..b as a CPU tensor sharing the store's memory (a receive lands there directly, a send
        reads from there), or None when any of them lives on a GPU. Pending writes are finished first."""
        self.flush()
        if a < self.device_rows:
            return None
        a, b = a - self.device_rows, b - self.device_rows
        if self.placement == "cpu":
            return self._data[a:b]
        if self.placement == "disk":
            return torch.from_numpy(self._mm[a:b]).view(self.dtype).reshape(b - a, *self.shape)
        return None

    # -- writing ---------------------------------------------------------------------------------
    def put(self, index, values: torch.Tensor) -> None:
        index = list(index)
        values = values.detach().to(self.dtype)
        if self.placement == "gpu":
            self._data[index] = values.to(self._data.device)
            return
        if self.device_rows:
            on_device, on_host = self._positions(index)
            if on_device:
                self._head[[index[p] for p in on_device]] = values[on_device].to(self._head.device)
                if not on_host:
                    return
                index, values = [index[p] for p in on_host], values[on_host]
            index = [r - self.device_rows for r in index]  # host positions from here on
        if values.is_cuda:
            self._write_behind(index, values)
        else:
            self._write(index, values.contiguous())

    def _write(self, index: list[int], rows: torch.Tensor) -> None:
        if not index:
            return
        if self.placement == "cpu":
            if index == list(range(index[0], index[0] + len(index))):
                self._data[index[0]:index[0] + len(index)].copy_(rows)
            else:
                self._data[index] = rows
            return
        raw = rows.view(torch.uint8).reshape(len(index), self._item_bytes).numpy()
        for first, count, pos in _runs(index):
            view, offset = memoryview(raw[pos:pos + count]).cast("B"), first * self._item_bytes
            done = 0
            while done < len(view):
                done += os.pwritev(self._fd, [view[done:]], offset + done)

    def _write_behind(self, index: list[int], values: torch.Tensor) -> None:
        """Copy the rows to a free pinned slot on the compute stream (asynchronous), and have the helper
        thread store them once the copy is done. Two slots: the GPU copies into one while the thread
        stores the other."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eqat-store-write")
        slot, self._next_slot = self._next_slot, 1 - self._next_slot
        if self._slot_writes[slot] is not None:
            self._slot_writes[slot].result()  # that slot's last rows are stored: its buffer is free
        buffer = self._slots[slot]
        if buffer is None or buffer.shape[0] < len(index):
            buffer = self._slots[slot] = torch.empty(len(index), *self.shape, dtype=self.dtype, pin_memory=True)
        rows = buffer[:len(index)]
        rows.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        write = self._slot_writes[slot] = self._writer.submit(self._store_when_copied, index, rows, event)
        with self._writes_lock:
            self._writes.append(write)

    def _store_when_copied(self, index, rows, event) -> None:
        event.synchronize()
        self._write(index, rows)

    def flush(self) -> None:
        """Wait for the rows written behind (a failed write raises here)."""
        with self._writes_lock:
            writes, self._writes = self._writes, []
        for write in writes:
            write.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self._slots = [None, None]
            self._head = None
            if self._file is not None:
                del self._mm
                os.close(self._fd)
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
    on_device = sum(s.device_nbytes for s in stores.values())
    split = f" ({on_device / 2**20:.1f} MiB of it on the GPU)" if on_device and place != "gpu" else ""
    return f"activation stores on {place}: {parts}; total {total / 2**30:.3f} GiB{split}"
