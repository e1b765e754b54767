"""How long a data-parallel group's gradient sum takes over MPI (issue 22): our wait (tests without a
pause for the first 50 ms, then with growing pauses), a blocking Allreduce, and a pure spin.

    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/group_sum.py --elements 3650000   # a SmolLM2 block's parameters
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eqat_dist.cluster.transport import MPITransport  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--elements", type=int, default=3_650_000)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    transport = MPITransport()
    group = transport.data_parallel_group(transport.world)
    mpi, x = transport.MPI, torch.ones(a.elements)
    ways = {"ours (SumGroup.allreduce_sum_)": lambda: group.allreduce_sum_(x),
            "blocking Allreduce": lambda: group.comm.Allreduce(mpi.IN_PLACE, x.numpy(), op=mpi.SUM)}
    for name, way in ways.items():
        times = []
        for _ in range(a.repeats):
            transport.barrier()
            t0 = time.perf_counter()
            way()
            times.append(time.perf_counter() - t0)
        if transport.rank == 0:
            print(f"{name}: median {1000 * statistics.median(times):.1f} ms for {a.elements * 4 / 2**20:.1f} MiB "
                  f"over {transport.world} ranks")


if __name__ == "__main__":
    main()
