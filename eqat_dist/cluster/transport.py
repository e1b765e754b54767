"""Point-to-point tensor transport between ranks, one interface, three implementations:

- `LocalTransport`: one process (the paper's single-GPU mode);
- `MPITransport`: mpi4py buffer-based Isend/Recv, when the ranks form an MPI world
  (mpiexec/mpirun, or `deepspeed --launcher mpich|openmpi`);
- `TorchTransport`: torch.distributed isend/recv (gloo), under the plain `deepspeed` launcher,
  where each process sees an MPI world of size 1.

Tensors travel as raw bytes (any dtype, bf16 included). Sends are non-blocking: the caller keeps
the tensor unchanged until `wait_sends()`. The pipeline calls `poll()` between training steps so
that MPI rendezvous transfers progress while a rank computes.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time

import torch


class PeerFailure(RuntimeError):
    """Another rank died or failed; this rank stops."""


class Transport:
    rank: int = 0
    world: int = 1
    kind: str = "local"
    watchdog = None  # called about once a second while this rank waits on peers; raises PeerFailure

    def _watch(self, state: dict) -> None:
        now = time.monotonic()
        if self.watchdog is not None and now - state.setdefault("t", now) >= 1.0:
            state["t"] = now
            self.watchdog()

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        raise NotImplementedError

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> None:
        raise NotImplementedError

    def post_recv(self, tensor: torch.Tensor, src: int, tag: int):
        """Start receiving into `tensor` now (it fills while this rank computes); wait_recvs() ends it.
        A peer's send to a receive posted early completes at once, so the sender never waits on us."""
        raise NotImplementedError

    def wait_recvs(self, handles: list) -> None:
        raise NotImplementedError

    def poll(self) -> None:
        pass

    def wait_sends(self) -> None:
        pass

    def barrier(self) -> None:
        pass

    def allgather_object(self, obj) -> list:
        """Every rank's small picklable `obj`, in rank order (start-up checks, not activations)."""
        return [obj]

    def data_parallel_group(self, size: int, cuda: bool = False):
        """The `size` consecutive ranks this one trains each block with (ranks g*size .. g*size+size-1),
        as a group that sums tensors over its ranks; None when `size` is 1. Every rank calls it, once.
        `cuda`: the tensors summed are on GPUs (NCCL where the transport has it)."""
        if size == 1:
            return None
        raise NotImplementedError(f"{self.kind} transport: no data-parallel groups")

    def fail(self, message: str, code: int = 1) -> None:
        """Report a fatal error of this rank and bring the whole job down quickly, exiting with `code`."""
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)


class LocalTransport(Transport):
    pass


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("transport buffers must be contiguous CPU tensors")
    return tensor.view(torch.uint8).reshape(-1)


def _lost(ranks, doing: str):
    """The PeerFailure text for a failed transfer with `ranks`, made only when one fails."""
    return lambda: f"lost rank {', '.join(map(str, sorted(set(ranks))))} while {doing} it"


SPIN_S = 0.05  # MPI waits: how long to test without pausing first


class MPITransport(Transport):
    kind = "mpi"

    def __init__(self, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm or MPI.COMM_WORLD
        self.rank, self.world = self.comm.Get_rank(), self.comm.Get_size()
        self._pending = []  # (request, tensor kept alive, destination)
        self._posted = []  # receives posted early, tested in poll() so that MPI moves their data on

    def send(self, tensor, dst, tag):
        buf = _bytes(tensor).numpy()
        self._pending.append((self.comm.Isend([buf, self.MPI.BYTE], dest=dst, tag=tag), tensor, dst))

    def recv(self, tensor, src, tag):
        buf = _bytes(tensor).numpy()
        self._wait([self.comm.Irecv([buf, self.MPI.BYTE], source=src, tag=tag)], _lost([src], "receiving from"))

    def post_recv(self, tensor, src, tag):
        request = self.comm.Irecv([_bytes(tensor).numpy(), self.MPI.BYTE], source=src, tag=tag)
        self._posted.append((request, src))
        return request, tensor, src

    def wait_recvs(self, handles):
        self._wait([r for r, _, _ in handles], _lost([src for *_, src in handles], "receiving from"))
        done = {id(r) for r, _, _ in handles}
        self._posted = [(r, src) for r, src in self._posted if id(r) not in done]

    def _test(self, requests, what) -> bool:
        """Whether every request is done; a peer that died (its connection dropped) is a PeerFailure
        saying `what()` (built only then: poll() runs every training step)."""
        try:
            return self.MPI.Request.Testall(requests)
        except self.MPI.Exception as err:
            raise PeerFailure(f"{what()} ({' '.join(str(err).split())[:200]})") from err

    def _wait(self, requests, what) -> None:
        """Wait by polling, not inside a blocking MPI call: Python can then act on a signal (Ctrl-C
        raises KeyboardInterrupt here, and the run stops every rank) while a peer is slow. MPI moves a
        transfer on only inside its calls: the first SPIN_S are tested without a pause (a 14 MB
        gradient sum between two ranks: 4 ms so, 43 ms with pauses between tests), then less and less
        often."""
        delay, state, spin_until = 1e-4, {}, time.monotonic() + SPIN_S
        while not self._test(requests, what):
            if time.monotonic() < spin_until:
                continue
            time.sleep(delay)
            delay = min(2 * delay, 0.01)
            self._watch(state)

    def poll(self):
        if self._pending:
            self._test([r for r, _, _ in self._pending], _lost([d for *_, d in self._pending], "sending to"))
            self._pending = [p for p in self._pending if p[0] != self.MPI.REQUEST_NULL]
        if self._posted:
            self._test([r for r, _ in self._posted], _lost([s for _, s in self._posted], "receiving from"))

    def wait_sends(self):
        if self._pending:
            self._wait([r for r, _, _ in self._pending], _lost([d for *_, d in self._pending], "sending to"))
            self._pending = []

    def barrier(self):
        self._wait([self.comm.Ibarrier()], lambda: "a peer rank failed before the barrier")

    def allgather_object(self, obj):
        self.barrier()  # wait by polling (signals, the watchdog); the gather itself is then quick
        return self.comm.allgather(obj)

    def data_parallel_group(self, size, cuda=False):
        if size == 1:
            return None
        return MPIGroup(self, self.comm.Split(color=self.rank // size, key=self.rank % size), self.rank // size)

    def fail(self, message, code=1):
        print(message, file=sys.stderr, flush=True)
        self.comm.Abort(code)  # every rank stops now, not at a timeout


class SumGroup:
    """The ranks of a data-parallel group: sums tensors over them, in place. `start_sum_` begins a sum
    and returns at once where the backend allows (the backward goes on meanwhile), `finish` waits for
    sums begun; every rank must begin the same sums in the same order. `start_broadcast_` (the tensor of
    the group's rank `root` to every rank) and `start_reduce_` (the sum to `root` alone; the others'
    tensors are left undefined) serve the weight work split over the group (blockap/weight_shards.py)."""
    index: int = 0  # which group
    size: int = 1
    rank: int = 0  # place in the group
    overlaps_backward: bool = False  # sums may start inside the backward (from autograd's threads)
    role: str = "data-parallel group"  # what the group is, and what it exchanges, for a lost rank's message
    exchanges: str = "a step's exchange (gradients, weights or losses)"

    def start_sum_(self, tensor: torch.Tensor):
        raise NotImplementedError

    def finish(self, handles: list) -> None:
        raise NotImplementedError

    def start_broadcast_(self, tensor: torch.Tensor, root: int):
        raise NotImplementedError

    def start_reduce_(self, tensor: torch.Tensor, root: int):
        raise NotImplementedError

    def start_reduce_scatter_(self, tensor: torch.Tensor, counts: list[int]) -> list:
        """Each rank's segment of `tensor` (consecutive segments of `counts` elements, in the group's
        rank order) summed over the group into that rank's segment; the others' segments are left
        undefined. Returns the handles to `finish`. Here one reduce per segment; a backend with a
        reduce-scatter does it in one exchange."""
        return [self.start_reduce_(segment, root) for root, segment in enumerate(tensor.split(counts))
                if segment.numel()]  # a rank may own nothing (more ranks than linears)

    def allreduce_sum_(self, tensor: torch.Tensor) -> None:
        self.finish([self.start_sum_(tensor)])

    def _lost(self) -> str:
        first = self.index * self.size
        return f"lost a rank of {self.role} {self.index} (ranks {first}-{first + self.size - 1}) during {self.exchanges}"


HOST = torch.device("cpu")


def _staged(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor itself where a collective runs (MPI: host memory; a torch group: its backend's device),
    else a copy there, to be written back once the collective is done."""
    return tensor if tensor.device == device else tensor.detach().to(device).contiguous()


class MPIGroup(SumGroup):
    """A data-parallel group over an MPI sub-communicator: sums in host memory (a GPU tensor is copied
    through the host, which waits for it there), waited for by polling like every transfer (signals,
    the watchdog)."""

    def __init__(self, transport: MPITransport, comm, index: int):
        self.transport, self.comm, self.index = transport, comm, index
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def start_sum_(self, tensor):
        host = _staged(tensor, HOST)
        request = self.comm.Iallreduce(self.transport.MPI.IN_PLACE, host.numpy(), op=self.transport.MPI.SUM)
        return request, host, tensor

    def start_broadcast_(self, tensor, root):
        host = _staged(tensor, HOST)
        return self.comm.Ibcast(host.numpy(), root=root), host, tensor

    def start_reduce_(self, tensor, root):
        host = _staged(tensor, HOST)
        MPI = self.transport.MPI
        if self.rank == root:
            request = self.comm.Ireduce(MPI.IN_PLACE, host.numpy(), op=MPI.SUM, root=root)
        else:
            request = self.comm.Ireduce(host.numpy(), None, op=MPI.SUM, root=root)
        return request, host, tensor

    def start_reduce_scatter_(self, tensor, counts):
        # one MPI_Ireduce_scatter, not one reduce per segment: MPICH's reduces are slow at this size
        # (bench/group_exchange.py, a SmolLM2 block's 13.5 MiB over 2 ranks: 15.5 ms against 4.4 ms)
        host = _staged(tensor, HOST)
        mine = torch.empty(counts[self.rank], dtype=tensor.dtype)
        request = self.comm.Ireduce_scatter(host.numpy(), mine.numpy(), list(counts), op=self.transport.MPI.SUM)
        return [(request, mine, tensor.split(counts)[self.rank], host)]  # host: kept until done

    def finish(self, handles):
        self.transport._wait([request for request, *_ in handles], self._lost)
        for _, host, tensor, *_ in handles:
            if host is not tensor:
                tensor.copy_(host)


def backends(cuda: bool) -> tuple[str, str]:
    """(default process group, host activation transport). The default group is the one DeepSpeed's
    ZeRO-3 collectives use: NCCL on GPUs. Activations travel between host buffers: gloo."""
    return ("nccl" if cuda else "gloo"), "gloo"


class TorchTransport(Transport):
    kind = "torch.distributed"

    def __init__(self):
        import torch
        import torch.distributed as dist

        self.dist = dist
        default, host = backends(torch.cuda.is_available())
        if not dist.is_initialized():  # MASTER_ADDR/PORT: from the launcher (cluster/launch.py checked them)
            dist.init_process_group(default)
        # Its own group, with a timeout no export or evaluation outlasts: the other ranks wait in its
        # barrier while rank 0 exports and evaluates (hours at 70B). A dead peer still shows at once
        # (the connection drops); the default group's 30 minutes would fire on a slow but healthy rank 0.
        self.group = dist.new_group(backend=host, timeout=datetime.timedelta(days=7))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._pending = []

    def send(self, tensor, dst, tag):
        try:
            work = self.dist.isend(_bytes(tensor), dst=dst, tag=tag, group=self.group)
            self._pending.append((work, tensor, dst))
        except RuntimeError as err:
            raise PeerFailure(f"lost rank {dst} while sending to it ({str(err).splitlines()[0][:200]})") from err

    def recv(self, tensor, src, tag):
        self.wait_recvs([self.post_recv(tensor, src, tag)])

    def _wait(self, work, what: str) -> None:
        """Wait in a helper thread while this one watches the peers (the watchdog): gloo's send and
        receive works never report themselves completed (`is_completed()` stays False), so only
        `wait()` can be used, and it blocks."""
        failure = []

        def wait():
            try:
                work.wait()
            except RuntimeError as err:
                failure.append(err)
        waiter = threading.Thread(target=wait, name="eqat-wait", daemon=True)
        waiter.start()
        state = {}
        while waiter.is_alive():
            waiter.join(timeout=0.5)  # returns at once when the work is done
            self._watch(state)
        if failure:
            raise PeerFailure(f"{what} ({str(failure[0]).splitlines()[0][:200]})") from failure[0]

    def post_recv(self, tensor, src, tag):
        try:
            return self.dist.irecv(_bytes(tensor), src=src, tag=tag, group=self.group), tensor, src
        except RuntimeError as err:
            raise PeerFailure(f"lost rank {src} while receiving from it ({str(err).splitlines()[0][:200]})") from err

    def wait_recvs(self, handles):
        for work, _, src in handles:
            self._wait(work, f"lost rank {src} while receiving from it")

    def wait_sends(self):
        for work, _, dst in self._pending:
            self._wait(work, f"lost rank {dst} while sending to it")
        self._pending = []

    def barrier(self):
        try:
            work = self.dist.barrier(group=self.group, async_op=True)
        except RuntimeError as err:
            raise PeerFailure(f"a peer rank failed before the barrier ({str(err).splitlines()[0][:200]})") from err
        self._wait(work, "a peer rank failed before the barrier")

    def allgather_object(self, obj):
        self.barrier()
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def data_parallel_group(self, size, cuda=False):
        if size == 1:
            return None
        # NCCL refuses two ranks on one GPU: such a group sums over gloo, through host memory. Which GPU
        # a rank drives is asked of the driver (its UUID), not guessed from local ranks: a scheduler
        # may show each rank its own GPU as device 0.
        own_gpus = (groups_with_own_gpus(self.allgather_object(gpu_identity()), size) if cuda
                    else [False] * (self.world // size))
        mine = None
        for index, first in enumerate(range(0, self.world, size)):  # every rank makes every group, in order
            nccl = own_gpus[index]
            # the default timeout: members meet every step, so a long wait is a lost rank
            group = self.dist.new_group(ranks=list(range(first, first + size)), backend="nccl" if nccl else "gloo")
            if first <= self.rank < first + size:
                device = torch.device("cuda", torch.cuda.current_device()) if nccl else HOST
                mine = TorchGroup(self, group, index, size, device)
                if cuda and not nccl and self.rank == first:
                    print(f"[launch] ranks {first}-{first + size - 1} (data-parallel group {index}) share a GPU: "
                          "their sums go over gloo through host memory (NCCL needs one GPU per rank)", flush=True)
        return mine

    def fail(self, message, code=1):
        print(message, file=sys.stderr, flush=True)
        os._exit(code)  # peers blocked on us see the connection drop and stop too


class TorchGroup(SumGroup):
    """A data-parallel group over a torch.distributed group: NCCL when each rank has its own GPU, gloo on
    the CPU or when ranks share a GPU. A tensor held elsewhere than where the collectives run (a count on
    the host under NCCL, a GPU gradient under gloo) is summed through a copy, written back in `finish`."""
    overlaps_backward = True

    def __init__(self, transport: TorchTransport, group, index: int, size: int, device: torch.device):
        self.transport, self.group, self.index, self.size, self.device = transport, group, index, size, device
        self.rank = transport.rank % size

    def _start(self, collective, tensor, **kw):
        staged = _staged(tensor, self.device)
        try:
            return collective(staged, group=self.group, async_op=True, **kw), staged, tensor
        except RuntimeError as err:
            raise PeerFailure(f"{self._lost()} ({str(err).splitlines()[0][:200]})") from err

    def start_sum_(self, tensor):
        return self._start(self.transport.dist.all_reduce, tensor)

    def start_broadcast_(self, tensor, root):
        return self._start(self.transport.dist.broadcast, tensor, src=self.index * self.size + root)

    def start_reduce_(self, tensor, root):
        return self._start(self.transport.dist.reduce, tensor, dst=self.index * self.size + root)

    def finish(self, handles):
        for work, staged, tensor in handles:
            if self.device.type == "cuda":
                work.wait()  # NCCL: orders the compute stream after the sum; the host does not block
            else:
                self.transport._wait(work, self._lost())
            if staged is not tensor:
                tensor.copy_(staged)


def gpu_identity() -> str:
    """The GPU this process drives, the same string on every rank that drives it: the driver's UUID, or
    (a build without it) the host and the device index, right unless the ranks see different devices."""
    index = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else f"{socket.gethostname()}:{index}"


def groups_with_own_gpus(gpus: list[str], size: int) -> list[bool]:
    """For each group of `size` consecutive ranks (`gpus[r]`: rank r's GPU), whether no two of its ranks
    share a GPU (NCCL's condition)."""
    return [len(set(gpus[first:first + size])) == size for first in range(0, len(gpus), size)]


def make_transport(launch) -> Transport:
    """MPI when an MPI launcher started several ranks, torch.distributed under the deepspeed/torchrun
    launcher, else one local process. `launch` (cluster/launch.py) is already exported to the environment."""
    if launch.world == 1:
        return LocalTransport()
    if launch.uses_mpi:
        return MPITransport()
    return TorchTransport()
