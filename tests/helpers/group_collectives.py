"""One rank of tests/test_distributed.py's check of a data-parallel group's collectives (MPI under
mpiexec, else torch.distributed over gloo from RANK/WORLD_SIZE/MASTER_*): every rank of one group of
all the ranks sums, broadcasts and reduce-scatters tensors of known values, with segments of uneven
sizes and one of none (a rank that owns no linear), and prints what it found."""
import faulthandler
import os
import sys
from pathlib import Path

faulthandler.dump_traceback_later(120, exit=True)  # a hang fails in minutes, with the stacks
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from eqat_dist.cluster.transport import MPITransport, TorchTransport  # noqa: E402

transport = MPITransport() if "PMI_RANK" in os.environ else TorchTransport()
group = transport.data_parallel_group(transport.world)
rank, size = group.rank, group.size
counts = [5, 0, 7, 3][:size]  # rank 1 owns nothing
total = sum(counts)

# integers in float32: every summation order gives the same bits
values = torch.arange(total, dtype=torch.float32) * (rank + 1)
handles = group.start_reduce_scatter_(values, counts)
summed = torch.arange(total, dtype=torch.float32) * 10  # started while a reduce-scatter is on
handles.append(group.start_sum_(summed))
group.finish(handles)
first = sum(counts[:rank])
expected = torch.arange(first, first + counts[rank], dtype=torch.float32) * sum(range(1, size + 1))
assert torch.equal(values[first:first + counts[rank]], expected), (rank, values, expected)
assert torch.equal(summed, torch.arange(total, dtype=torch.float32) * 10 * size)

shared = torch.full((4,), float(rank))
group.finish([group.start_broadcast_(shared, size - 1)])
assert torch.equal(shared, torch.full((4,), float(size - 1)))
print(f"group collectives OK on rank {rank} of {size} over {transport.kind}", flush=True)
transport.barrier()
