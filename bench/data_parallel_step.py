"""Where a data-parallel Block-AP step's time goes (issue 22): one block trained for one epoch on D
ranks, the step's pieces timed on each rank.

    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/data_parallel_step.py [--weight-work split|replicated]
    OMP_NUM_THREADS=1 python bench/data_parallel_step.py          # one rank at the same global batch

SmolLM2-135M block 3, w2g64, 64 random windows x 256 tokens (timings only), global batch 2, no
validation windows (the loss before and after training are passes over the training windows). Per step:
the wall time (those two passes included), and the pieces of the split weight work (`begin_step`: this
rank's fake quantization and the broadcast; `finish_step`: the reduce of the gradients and this rank's
quantizer backward; `clip`; `adam`) with `waits`, the time inside the group's waits (every exchange:
the broadcast, the reduce, the sums, the clipping norm's).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eqat_dist.blockap import weight_shards  # noqa: E402
from eqat_dist.blockap.lanes import Lanes  # noqa: E402
from eqat_dist.blockap.steps import make_student  # noqa: E402
from eqat_dist.blockap.stores import ActivationStore  # noqa: E402
from eqat_dist.blockap.trainer import BlockAPSettings, train_block  # noqa: E402
from eqat_dist.cluster import transport  # noqa: E402
from eqat_dist.models.lazy import LazyModel  # noqa: E402
from eqat_dist.quant import QuantConfig  # noqa: E402

SPENT: dict[str, float] = collections.defaultdict(float)


def timed(owner, name: str, label: str) -> None:
    """Wrap owner.name so that its calls add their seconds to SPENT[label]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - t0
    setattr(owner, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weight-work", choices=("split", "replicated"), default="split")
    p.add_argument("--windows", type=int, default=64)
    a = p.parse_args()
    launched = "PMI_RANK" in os.environ
    comm = transport.MPITransport() if launched else None
    ranks, rank = (comm.world, comm.rank) if comm else (1, 0)
    timed(transport.MPIGroup, "finish", "waits")
    for name in ("begin_step", "finish_step", "clip_grad_norm_"):
        timed(weight_shards.WeightShards, name, name.replace("_grad_norm_", ""))
    timed(torch.optim.AdamW, "step", "adam")

    source = LazyModel("smollm2-135m")
    seqlen, hidden = 256, source.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.windows, seqlen, hidden, generator=gen)
    y = torch.randn(a.windows, seqlen, hidden, generator=gen)
    call = source.calls(torch.randint(0, 1000, (1, seqlen)))[3]
    settings = BlockAPSettings(epochs=1, batch_size=2, shard_weights=a.weight_work == "split")
    lanes = Lanes(a.windows, settings.batch_size, ranks, rank)
    mine = lanes.windows()

    def store(rows: torch.Tensor) -> ActivationStore:
        s = ActivationStore(len(rows), seqlen, hidden, torch.float32, "cpu", torch.device("cpu"))
        s.put(list(range(len(rows))), rows)
        return s
    student = make_student(source.block(3), QuantConfig(2, 64), "cpu")
    group = comm.data_parallel_group(ranks) if ranks > 1 else None
    t0 = time.perf_counter()
    report = train_block(student, 3, store(x[mine]), store(y[mine]), store(x[:0]), store(y[:0]), call, settings,
                         "cpu", lanes=lanes, group=group)
    wall = time.perf_counter() - t0
    pieces = ", ".join(f"{k} {v / report.steps * 1e3:.1f}" for k, v in SPENT.items())
    print(f"rank {rank} of {ranks} ({a.weight_work if ranks > 1 else 'one rank'}): {report.steps} steps, "
          f"{wall / report.steps * 1e3:.1f} ms a step; ms a step: {pieces}", flush=True)


if __name__ == "__main__":
    main()
