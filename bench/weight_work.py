"""What a Block-AP step spends on the block's weights, whatever the batch (issue 22): the work that a
data-parallel group repeats on every rank unless it is split (`--weight-work split`).

    OMP_NUM_THREADS=1 python bench/weight_work.py [--block 3] [--bits 2] [--group-size 64]
    python bench/weight_work.py --device cuda --amp --shape 8192,28672,64,8 --seqlen 2048   # a 70B-shaped block

On one block of the bundled SmolLM2-135M, or of a random one-layer Llama of the given shape (hidden,
intermediate, heads, kv heads; random inputs: timings only), median of 7 repeats of 5 calls each (on a
GPU timed with a device synchronization around each repeat): forward + backward at batch 2 and 1 (x 256 tokens), the same with the quantized weights
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
from eqat_dist.blockap.trainer import BlockAPSettings, adamw, clip_in_the_step, param_groups  # noqa: E402
from eqat_dist.models.blocks import run_block  # noqa: E402
from eqat_dist.models.lazy import LazyModel  # noqa: E402
from eqat_dist.models.quantize import quant_linears  # noqa: E402
from eqat_dist.quant import QuantConfig  # noqa: E402


def median_ms(f, calls: int = 5, repeats: int = 7, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    f(), f()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        sync()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def random_block(shape: str, seqlen: int, device: str):
    """(block, its call, hidden size, name) of a random one-layer Llama of shape 'hidden,inter,heads,kv'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eqat_dist.models import decoder_layers, record_block_calls

    hidden, inter, heads, kv = (int(v) for v in shape.split(","))
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(4096, seqlen))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    _, calls = record_block_calls(model, torch.randint(0, 256, (1, seqlen), device=device))
    # the recorded call (rotary tables, masks) is kept on the CPU: it goes where the block runs
    return decoder_layers(model)[0], calls[0].to(device), hidden, f"random Llama block {shape}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="the block's forward in bfloat16 autocast (a GPU run's default)")
    p.add_argument("--shape", help="hidden,intermediate,heads,kv_heads: a random one-layer Llama block instead")
    a = p.parse_args()
    if a.shape:
        fp_block, call, hidden, name = random_block(a.shape, a.seqlen, a.device)
    else:
        source = LazyModel("smollm2-135m")
        call = source.calls(torch.randint(0, 1000, (1, a.seqlen)))[a.block].to(a.device)
        fp_block, hidden, name = source.block(a.block), source.config.hidden_size, f"SmolLM2-135M block {a.block}"
    student = make_student(fp_block, QuantConfig(a.bits, a.group_size), a.device)
    del fp_block
    groups = param_groups(student, BlockAPSettings())
    optimizer, params = adamw(groups), [p for g in groups for p in g["params"]]
    linears = list(quant_linears(student).values())
    x, y = torch.randn(2, a.seqlen, hidden, device=a.device), torch.randn(2, a.seqlen, hidden, device=a.device)
    ms = lambda f: median_ms(f, device=a.device)  # noqa: E731

    def step(batch: int, given_weights: bool = False) -> None:
        optimizer.zero_grad(set_to_none=True)
        if given_weights:  # as under the split: the quantized weights arrive as plain tensors
            for lin in linears:
                lin.fixed_weight = lin.weight.detach().clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=a.amp):
            out = run_block(student, x[:batch], call)
        torch.nn.functional.mse_loss(out.float(), y[:batch]).backward()
        for lin in linears:
            lin.fixed_weight = None

    ones = [torch.ones_like(lin.weight) for lin in linears]

    def fake_quant() -> None:  # as in a step: the gradients set to None first, so nothing is accumulated
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward([lin.quantized_weight() for lin in linears], ones)

    flat = torch.zeros(sum(p.numel() for p in params), device=a.device)

    def grad_copies() -> None:  # into the all-reduce buffers and back (grad_sum.py)
        offset = 0
        for p in params:
            flat[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
            offset += p.numel()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    print(f"{name} on {a.device}{' (bfloat16 autocast)' if a.amp else ''}, w{a.bits}g{a.group_size}, {a.seqlen} tokens per window, "
          f"{torch.get_num_threads()} thread(s), {sum(p.numel() for p in params) / 1e6:.2f}M trained parameters")
    b2, b1 = ms(lambda: step(2)), ms(lambda: step(1))
    g2, g1 = ms(lambda: step(2, True)), ms(lambda: step(1, True))
    print(f"forward + backward, batch 2: {b2:.1f} ms; batch 1: {b1:.1f} ms")
    print(f"  the same with the quantized weights given: batch 2 {g2:.1f} ms, batch 1 {g1:.1f} ms")
    fq = ms(fake_quant)
    step(2)  # every parameter's gradient, for the clipping, the step and the copies
    clip = ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
    fused = bool(optimizer.defaults.get("fused"))
    # the trainer's way with a fused AdamW: the norm alone, the multiply inside the step's own pass
    norm = ms(lambda: clip_in_the_step(optimizer, params, 1.0)) if fused else clip
    adam, copies = ms(optimizer.step), ms(grad_copies)
    print(f"fake quantization forward + backward, all linears: {fq:.1f} ms")
    print(f"clipping: {clip:.1f} ms (its norm alone, the multiply in the fused step: {norm:.1f} ms); AdamW step: "
          f"{adam:.1f} ms; gradient copies (data-parallel groups only): {copies:.1f} ms")
    print(f"a step (forward + backward, clipping, AdamW): {b2 + norm + adam:.1f} ms, {(b2 + norm + adam) / g2:.2f}x "
          f"the forward + backward with the quantized weights given ({g2:.1f} ms)")
    # a rank of a group of 2 at per-rank batch 1: replicated, it does all the weight work; split, half
    # of it (the broadcast and reduce between the ranks not counted: they depend on the link)
    weight = fq + norm + adam
    replicated, split = g1 + weight, g1 + weight / 2
    print(f"weight work (fake quantization, clipping, AdamW): {weight:.1f} ms, {weight / (b2 + norm + adam):.0%} "
          f"of a batch-2 step; a rank of a group of 2 at batch 1, without communication: replicated "
          f"{replicated:.1f} ms, split {split:.1f} ms ({1 - split / replicated:.0%} less)")


if __name__ == "__main__":
    main()
