"""What a Block-AP step spends on the block's weights, whatever the batch (issue 22): the work that a
data-parallel group repeats on every rank unless it is split (`--weight-work split`).

    OMP_NUM_THREADS=1 python bench/weight_work.py [--block 3] [--bits 2] [--group-size 64]

On one block of the bundled SmolLM2-135M (random inputs: timings only), one thread, median of 7 repeats
of 5 calls each: forward + backward at batch 2 and 1 (x 256 tokens), the same with the quantized weights
given as plain tensors (what a rank computes under the split), the fake quantization's forward and
backward over the block's linears alone, clipping, the fused AdamW step, and the gradient copies of the
replicated path's all-reduce buffers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eqat_dist.blockap.steps import make_student  # noqa: E402
from eqat_dist.blockap.trainer import BlockAPSettings, adamw, param_groups  # noqa: E402
from eqat_dist.models.blocks import run_block  # noqa: E402
from eqat_dist.models.lazy import LazyModel  # noqa: E402
from eqat_dist.models.quantize import quant_linears  # noqa: E402
from eqat_dist.quant import QuantConfig  # noqa: E402


def median_ms(f, calls: int = 5, repeats: int = 7) -> float:
    f(), f()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    a = p.parse_args()
    source = LazyModel("smollm2-135m")
    call = source.calls(torch.randint(0, 1000, (1, a.seqlen)))[a.block]
    student = make_student(source.block(a.block), QuantConfig(a.bits, a.group_size), "cpu")
    groups = param_groups(student, BlockAPSettings())
    optimizer, params = adamw(groups), [p for g in groups for p in g["params"]]
    linears = list(quant_linears(student).values())
    hidden = source.config.hidden_size
    x, y = torch.randn(2, a.seqlen, hidden), torch.randn(2, a.seqlen, hidden)

    def step(batch: int, given_weights: bool = False) -> None:
        optimizer.zero_grad(set_to_none=True)
        if given_weights:  # as under the split: the quantized weights arrive as plain tensors
            for lin in linears:
                lin.fixed_weight = lin.weight.detach().clone().requires_grad_()
        out = run_block(student, x[:batch], call)
        torch.nn.functional.mse_loss(out, y[:batch]).backward()
        for lin in linears:
            lin.fixed_weight = None

    def fake_quant() -> None:
        weights = [lin.quantized_weight() for lin in linears]
        torch.autograd.backward(weights, [torch.ones_like(w) for w in weights])

    flat = torch.zeros(sum(p.numel() for p in params))

    def grad_copies() -> None:  # into the all-reduce buffers and back (grad_sum.py)
        offset = 0
        for p in params:
            flat[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
            offset += p.numel()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    print(f"SmolLM2-135M block {a.block}, w{a.bits}g{a.group_size}, {a.seqlen} tokens per window, "
          f"{torch.get_num_threads()} thread(s), {sum(p.numel() for p in params) / 1e6:.2f}M trained parameters")
    print(f"forward + backward, batch 2: {median_ms(lambda: step(2)):.1f} ms; "
          f"batch 1: {median_ms(lambda: step(1)):.1f} ms")
    print(f"  the same with the quantized weights given: batch 2 {median_ms(lambda: step(2, True)):.1f} ms, "
          f"batch 1 {median_ms(lambda: step(1, True)):.1f} ms")
    step(2)
    print(f"fake quantization forward + backward, all linears: {median_ms(fake_quant):.1f} ms")
    print(f"clipping: {median_ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)):.1f} ms; "
          f"AdamW step: {median_ms(optimizer.step):.1f} ms; gradient copies: {median_ms(grad_copies):.1f} ms")


if __name__ == "__main__":
    main()
