"""The exchanges of a data-parallel Block-AP step, timed on their own (issue 22): the owners' broadcasts
of the quantized weights, the gradients summed to their owners by one reduce per owner (before) or by
one reduce-scatter (now), and an all-reduce of everything for comparison, through the product's own
group (cluster/transport.py); and a sequence-parallel step's (issue 40): the split attention's keys and
values of every window gathered over the group and their gradients sent back (models/sequence_split.py),
at the shape `--kv ROWS,TOKENS,WIDTH` (a step's windows on this rank, a window's tokens, the keys' width).

    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/group_exchange.py [--elements N] [--repeats R] [--kv 4,256,192]

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
    p.add_argument("--kv", nargs="*", default=["4,256,192", "2,2048,1024"], metavar="ROWS,TOKENS,WIDTH",
                   help="key/value exchanges to time (default: the bench's SmolLM2 step at batch 4, and a "
                        "Llama-2-70B step at the paper's batch 2: 8 key-value heads of 128)")
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
    for shape in a.kv:
        kv_exchange(transport, group, *map(int, shape.split(",")), a.repeats)


def kv_exchange(transport, group, rows: int, tokens: int, width: int, repeats: int) -> None:
    """A sequence-parallel step's exchanges in the split attention: the keys and the values of this rank's
    tokens gathered into the window's (forward), and the gathered gradients summed back (backward)."""
    from eqat_dist.models.sequence_split import TokenSplit, gather_tokens

    split = TokenSplit(tokens, group.size, group.rank, group)
    heads = width // 64
    local = torch.randn(2, rows, heads, split.local_tokens, 64, requires_grad=True)  # keys and values, stacked
    times = {"forward": [], "backward": []}
    for _ in range(repeats):
        transport.barrier()
        t0 = time.perf_counter()
        gathered = gather_tokens(local, split)  # one exchange for both, as the split attention does
        t1 = time.perf_counter()
        gathered.backward(torch.ones_like(gathered))
        times["forward"].append(t1 - t0)
        times["backward"].append(time.perf_counter() - t1)
    if group.rank == 0:
        whole = 2 * rows * tokens * width * 4
        print(f"key/value exchange, {rows} window(s) x {tokens} tokens x {width} wide (keys and values of the whole "
              f"windows: {whole / 2**20:.1f} MiB float32, over {group.size} ranks): forward "
              f"{statistics.median(times['forward']) * 1e3:.1f} ms, backward {statistics.median(times['backward']) * 1e3:.1f} ms",
              flush=True)


if __name__ == "__main__":
    main()
