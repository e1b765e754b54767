"""The exchanges of a data-parallel Block-AP step, timed on their own (issue 22): the owners' broadcasts
of the quantized weights, the gradients summed to their owners by one reduce per owner (before) or by
one reduce-scatter (now), and an all-reduce of everything for comparison, through the product's own
group (cluster/transport.py).

    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/group_exchange.py [--elements N] [--repeats R]

The default size is a SmolLM2-135M block's quantized linear weights (3,538,944 float32), dealt out to
the ranks by size as blockap/weight_shards.py does. Prints each exchange's median over the repeats
(every repeat starts from a barrier, so a figure is the exchange, not a late peer).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eqat_dist.cluster.transport import MPITransport, SumGroup  # noqa: E402
from eqat_dist.models.family import block_linear_shapes  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads, 3 kv heads of 64
SMOLLM2_BLOCK = [out * inp for out, inp in block_linear_shapes(576, 1536, 9, 3, 64).values()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", type=int, default=sum(SMOLLM2_BLOCK))
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    from eqat_dist.blockap.weight_shards import deal_out

    transport = MPITransport()
    group = transport.data_parallel_group(transport.world)
    scale = a.elements / sum(SMOLLM2_BLOCK)
    sizes = [int(n * scale) for n in SMOLLM2_BLOCK]
    owner = deal_out(sizes, group.size)
    counts = [sum(n for n, o in zip(sizes, owner) if o == r) for r in range(group.size)]
    buffer = torch.ones(sum(counts))
    segments = buffer.split(counts)

    ways = {
        "broadcast from each owner": lambda: [group.start_broadcast_(s, r) for r, s in enumerate(segments) if s.numel()],
        # SumGroup's own reduce-scatter is one reduce per owner: the way before MPI's
        "reduce to each owner (before)": lambda: SumGroup.start_reduce_scatter_(group, buffer, counts),
        "one reduce-scatter (now)": lambda: group.start_reduce_scatter_(buffer, counts),
        "all-reduce of everything": lambda: [group.start_sum_(buffer)],
    }
    for name, start in ways.items():
        times = []
        for _ in range(a.repeats):
            transport.barrier()
            t0 = time.perf_counter()
            group.finish(start())
            times.append(time.perf_counter() - t0)
        if group.rank == 0:
            print(f"{name}: {statistics.median(times) * 1e3:.1f} ms ({sum(counts) * 4 / 2**20:.1f} MiB over "
                  f"{group.size} ranks, owners' shares {counts})", flush=True)


if __name__ == "__main__":
    main()
