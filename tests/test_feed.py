"""The activation path: stores (blockap/stores.py) and the read-ahead feed (blockap/feed.py)."""
import contextlib
import threading
import time
from pathlib import Path

import pytest
import torch

from eqat_dist.blockap.feed import Feed, Uploader
from eqat_dist.blockap.stores import ActivationStore, describe_memory, remove_stale_stores
from eqat_dist.run_folder import RunFolder


def _filled(placement, tmp_path, count=12, dtype=torch.float32, name="s", device_rows=0):
    store = ActivationStore(count, 4, 8, dtype, placement, torch.device("cpu"), tmp_path, name, device_rows)
    data = torch.randn(count, 4, 8).to(dtype)
    store.put(list(range(count)), data)
    return store, data


@pytest.mark.parametrize("placement", ["cpu", "disk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_stores_read_any_rows_in_the_order_asked(placement, dtype, tmp_path):
    """Runs of consecutive rows are read at once (disk: one positioned read per run); the rows come
    back in the order asked, bit-exact, whatever the order."""
    store, data = _filled(placement, tmp_path, dtype=dtype)
    for index in ([3, 4, 5, 9], [11, 0, 1, 2, 7], [6], [5, 4, 3]):
        out = torch.empty(len(index), 4, 8, dtype=dtype)
        assert torch.equal(store.read_into(index, out), data[index])
        assert torch.equal(store.get(index), data[index])
    store.put([2, 8], data[[2, 8]] * 2)  # scattered writes
    assert torch.equal(store.get([2, 8]), data[[2, 8]] * 2)
    store.close()


@pytest.mark.parametrize("placement", ["cpu", "disk"])
def test_a_store_with_rows_on_the_device_reads_and_writes_as_one(placement, tmp_path):
    """Its first rows live on the compute device (a CPU tensor here), the others in host memory or on
    disk, which hold only those (host memory / the file shrink by the device rows); every read and write
    across the boundary is bit-exact, in the order asked, and a transfer's host view is refused (None)
    where it would span device rows."""
    store, data = _filled(placement, tmp_path, device_rows=5)
    assert store.device_nbytes == 5 * 4 * 8 * 4 and store.on_host
    if placement == "cpu":
        assert store._data.shape[0] == 7
    else:
        assert store._file.stat().st_size == 7 * 4 * 8 * 4
    for index in ([3, 4, 5, 9], [11, 0, 1, 2, 7], [6], [5, 4, 3], [1, 0]):
        assert torch.equal(store.get(index), data[index])
        host = store.rows_on_host(index)
        assert host == [r for r in index if r >= 5]
        staged = store.read_into(host, torch.empty(len(host), 4, 8)) if host else None
        assert torch.equal(store.with_device_rows(index, staged), data[index])
    with pytest.raises(ValueError, match="host rows only"):
        store.read_into([4, 5], torch.empty(2, 4, 8))
    assert store.host_rows(3, 8) is None and torch.equal(store.host_rows(5, 9), data[5:9])
    store.host_rows(6, 8).copy_(data[6:8] + 1)  # a receive lands in the host view
    store.put([0, 9, 4, 5], data[[0, 9, 4, 5]] * 3)  # scattered writes on both sides
    data[6:8] += 1
    data[[0, 9, 4, 5]] *= 3
    assert torch.equal(store.get(list(range(12))), data)
    feed = Feed([store], [[4, 5, 6], [0, 1], [11, 2, 7]], "cpu", uploader=SpyUploader())
    assert all(torch.equal(xb, data[b]) for (xb,), b in zip(feed, [[4, 5, 6], [0, 1], [11, 2, 7]]))
    assert describe_memory({"x": store}).endswith("(0.0 MiB of it on the GPU)")
    store.close()


class SpyUploader(Uploader):
    """The GPU's staging and copies on the CPU: records what the feed stages, uploads and when."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.staged, self.events = set(), []
        self.lock = threading.Lock()

    def staging(self, shape, dtype):
        buffer = torch.empty(shape, dtype=dtype)
        self.staged.add(buffer.untyped_storage().data_ptr())
        return buffer

    def on_copy_stream(self):
        return contextlib.nullcontext()

    def record(self):
        return "event"

    def use(self, tensors, event):
        assert event == "event"

    def copied(self, event):
        assert event == "event"


def test_the_feed_stages_in_pinned_buffers_copies_non_blocking_and_reads_the_next_batch_ahead(monkeypatch):
    """Batch j+1 is staged and its copy started while the consumer still holds batch j; each copy goes
    from a staging buffer with non_blocking=True, and only two buffers per store are ever made."""
    inputs, x = _filled("cpu", None)
    targets, y = _filled("cpu", None)
    spy = SpyUploader()
    copies, real_to = [], torch.Tensor.to

    def to(self, *args, **kwargs):
        if spy.staged and self.untyped_storage().data_ptr() in spy.staged:
            with spy.lock:
                copies.append((self[0, 0, 0].item(), kwargs.get("non_blocking", False)))
            return real_to(self, *args, **kwargs).clone()  # the device's own copy
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    batches = [[5, 1], [0, 7], [3, 2], [11, 4], [9]]
    seen = []
    for j, (xb, yb) in enumerate(Feed([inputs, targets], batches, "cpu", uploader=spy)):
        assert torch.equal(xb, x[batches[j]]) and torch.equal(yb, y[batches[j]])
        if j + 1 < len(batches):  # the next batch's copy starts while this one is in use
            deadline = time.time() + 10
            while (x[batches[j + 1][0], 0, 0].item(), True) not in copies:
                assert time.time() < deadline, f"batch {j + 1} was not read ahead while batch {j} was in use"
                time.sleep(0.01)
        seen.append(j)
    assert seen == list(range(len(batches)))
    assert all(non_blocking for _, non_blocking in copies) and len(copies) == 2 * len(batches)
    assert len(spy.staged) == 4  # two staging buffers per store, reused


def test_the_feed_without_a_gpu_reads_each_batch_in_order(tmp_path):
    store, data = _filled("disk", tmp_path)
    batches = [[0, 1, 2], [9, 10], [4]]
    got = [xb for (xb,) in Feed([store], batches, "cpu")]
    assert all(torch.equal(g, data[b]) for g, b in zip(got, batches))
    store.close()


def test_disk_stores_of_a_stopped_run_are_reused_not_added(tmp_path):
    """A killed run leaves its stores behind (nothing closes them). Their names are fixed per run and
    rank, so a resumed run opens the same files, and the run's stale files (a run on more ranks) are
    removed before any rank opens its own: acts/ does not grow with every restart."""
    def store(run, rank):
        return ActivationStore(4, 4, 8, torch.float32, "disk", torch.device("cpu"), tmp_path,
                               f"{RunFolder(tmp_path / run).store_prefix()}-fp-train-r{rank}")

    killed = [store("run", r) for r in range(3)]  # a run of 3 ranks, killed: never closed
    assert len(list(tmp_path.glob("*.bin"))) == 3
    twice = store("run", 0)  # the same run and rank: the same file
    assert len(list(tmp_path.glob("*.bin"))) == 3
    other = store("other-run", 0)  # another run sharing the folder
    removed = remove_stale_stores(tmp_path, RunFolder(tmp_path / "run").store_prefix())
    assert len(removed) == 3 and list(tmp_path.glob("*.bin")) == [Path(other._file)]
    resumed = store("run", 0)
    assert len(list(tmp_path.glob("*.bin"))) == 2
    for s in (resumed, other):
        s.close()
    assert not list(tmp_path.glob("*.bin"))
    del killed, twice


@pytest.mark.parametrize("staged", [False, True])
def test_the_feed_reads_no_row_before_before_read_has_let_it_in(staged):
    """A stream still arriving (pipelines/round_robin.py: the quantized stream in reading order): rows
    land in the store only when before_read asks for them, in the caller's thread. Every batch must then
    hold the arrived rows, never the stale ones, on the CPU path and on the GPU's staged path (the next
    batch read ahead), and before_read must be called in order, once per batch."""
    store, data = _filled("cpu", None)
    stale = torch.zeros_like(data)
    store.put(list(range(len(data))), stale)
    batches = [[5, 1], [0, 7], [3, 2], [11, 4], [9]]
    asked, caller = [], threading.get_ident()

    def arrive(index):
        assert threading.get_ident() == caller
        asked.append(list(index))
        store.put(list(index), data[list(index)])

    feed = Feed([store], batches, "cpu", uploader=SpyUploader() if staged else None, before_read=arrive)
    for (xb,), b in zip(feed, batches):  # checked while held (on the CPU a staged batch is its staging buffer)
        assert torch.equal(xb, data[b])
    assert asked == batches
    store.close()
