"""Batches of rows from activation stores onto the compute device, the next batch read and copied
while the current one computes.

For host and disk stores on a GPU: a helper thread gathers (or reads from disk) the next batch's rows
into one of two pinned staging buffers per store and starts its host-to-device copy on a copy stream;
the compute stream waits for that copy only when it uses the batch. A staging buffer is refilled only
once the copy out of it has finished. GPU stores are indexed on the device directly, and so are the
rows a host store keeps on the device (stores.py: only its other rows are staged). Without a GPU the
rows are read in the calling thread, batch by batch: there the copies and the compute share the same
cores, and a helper thread only slows the compute's OpenMP threads down.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from .stores import ActivationStore


class Uploader:
    """Pinned staging buffers and a copy stream on one GPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def staging(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def on_copy_stream(self):
        return torch.cuda.stream(self.stream)  # (torch.cuda.stream also makes the stream's device current)

    def record(self):
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def upload(self, host: torch.Tensor):
        """(device tensor, event after its copy), the copy started on the copy stream."""
        with self.on_copy_stream():
            moved = host.to(self.device, non_blocking=True)  # from pinned memory: asynchronous
            return moved, self.record()

    def use(self, tensors, event) -> None:
        """Make the compute stream wait for the copy, and tell the allocator who uses the memory."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors:
            t.record_stream(current)

    def copied(self, event) -> None:
        """Block until the copy recorded by `event` is done (its staging buffer may be refilled)."""
        event.synchronize()


class Feed:
    """Iterate over `batches` (lists of row indices), yielding one tensor per store on `device` for
    each batch, in order. `uploader` (on a GPU: an Uploader) does the staging and copies.
    `before_read(index)`, called in the caller's thread before a batch's rows are read, may wait for
    them to arrive (a stream still being received); with a GPU it runs for batch j + 1 before batch j
    is handed out (batch j + 1 is read while batch j computes)."""

    def __init__(self, stores: list[ActivationStore], batches: list[list[int]], device, uploader=None,
                 before_read=None):
        self.stores, self.batches, self.device = stores, [list(b) for b in batches], torch.device(device)
        self.before_read = before_read or (lambda index: None)
        self.host = [s.on_host for s in stores]
        if uploader is None and self.device.type == "cuda" and any(self.host):
            uploader = Uploader(self.device)
        self.uploader = uploader
        self._slots = [[None] * len(stores) for _ in range(2)]  # staging buffers, two per host store
        self._slot_events = [None, None]  # copy out of each slot's buffers, to wait for before refilling

    def _prepare(self, j: int):
        """Batch j's host rows read (into staging buffers on a GPU) and their copies started. Runs in
        the helper thread."""
        index = self.batches[j]
        slot = j % 2
        if self._slot_events[slot] is not None:
            self.uploader.copied(self._slot_events[slot])
        moved, event = [], None
        for i, (store, host) in enumerate(zip(self.stores, self.host)):
            staged = store.rows_on_host(index) if host else []
            if not staged:
                moved.append(None)
                continue
            buffer = self._slots[slot][i]
            if buffer is None or buffer.shape[0] < len(index):
                buffer = self._slots[slot][i] = self.uploader.staging((len(index), *store.shape), store.dtype)
            rows = store.read_into(staged, buffer[:len(staged)])
            tensor, event = self.uploader.upload(rows)
            moved.append(tensor)
        self._slot_events[slot] = event
        return moved, event

    def __iter__(self):
        if not self.batches:
            return
        if self.uploader is None:  # no GPU: read in this thread. A helper thread's copies would take a core
            for index in self.batches:  # from the compute's OpenMP threads (measured 24% slower on 2 cores)
                self.before_read(index)
                yield tuple(store.get(index) for store in self.stores)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eqat-feed") as pool:
            self.before_read(self.batches[0])
            ahead = pool.submit(self._in_thread, 0)
            for j, index in enumerate(self.batches):
                ready = ahead.result()
                if j + 1 < len(self.batches):
                    self.before_read(self.batches[j + 1])
                    ahead = pool.submit(self._in_thread, j + 1)  # reads while batch j computes
                yield self._finish(ready, index)

    def _in_thread(self, j: int):
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # the current device is per thread
                return self._prepare(j)
        return self._prepare(j)

    def _finish(self, ready, index) -> tuple[torch.Tensor, ...]:
        moved, event = ready
        if event is not None:
            self.uploader.use([t for t in moved if t is not None], event)
        # a GPU store's rows (None here) are indexed on the device, a host store's device rows added
        return tuple(store.get(index) if tensor is None else store.with_device_rows(index, tensor)
                     for store, tensor in zip(self.stores, moved))


def batches_of(count: int, batch_size: int) -> list[list[int]]:
    """Rows 0..count in order, in batches of `batch_size` (the last may be smaller)."""
    return [list(range(s, min(s + batch_size, count))) for s in range(0, count, batch_size)]
