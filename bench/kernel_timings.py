"""The Triton kernels against the PyTorch paths they replace (issue 13).

    python bench/kernel_timings.py            # on a GPU: the timing table; on a CPU: interpreter checks only

On a GPU it prints: fake quantization fwd+bwd time and achieved memory bandwidth vs the PyTorch path;
packed linear fwd+bwd time and peak memory vs dequantize + matmul (an E2E-QP step's layer); GEMV at
batch 1 and 16 for 4096x4096 and 8192x28672 at 2/3/4 bits vs fp16 F.linear. Without a GPU the
kernels run in Triton's interpreter on small shapes against the reference (as tests/test_kernels.py
does) and the script says that timings need a GPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eqat_dist.kernels.fake_quant import fake_quantize as fused_fake_quantize  # noqa: E402
from eqat_dist.kernels.packed_linear import packed_linear  # noqa: E402
from eqat_dist.quant import QuantConfig  # noqa: E402
from eqat_dist.quant.fake_quant import fake_quantize, minmax_init  # noqa: E402
from eqat_dist.quant.packed_linear import PackedLinear  # noqa: E402


def packed_layer(bits: int, out_f: int, in_f: int, group: int = 64, device="cpu", dtype=torch.float16):
    cfg = QuantConfig(bits, group)
    g = cfg.effective_group(in_f)
    codes = torch.randint(0, 2**bits, (out_f, in_f), device=device)
    zeros = torch.randint(0, 2**bits, (out_f, in_f // g), device=device).float()
    scales = (torch.rand(out_f, in_f // g, device=device) * 0.02 + 0.001)
    return PackedLinear.from_int(codes, zeros, scales, cfg, dtype=dtype).to(device), g


@contextlib.contextmanager
def packed_way(way: str):
    """The packed layer's path inside the block: "dequant" or "fused" (EQAT_PACKED_LINEAR), or "pytorch"
    (EQAT_KERNELS=0, the environment override of --no-kernels: PackedLinear's own dequantize-then-matmul, the reference)."""
    name, value = ("EQAT_KERNELS", "0") if way == "pytorch" else ("EQAT_PACKED_LINEAR", way)
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name)
        else:
            os.environ[name] = before


def timed(fn, repeat: int = 20) -> float:
    """Median milliseconds of `fn` on the GPU (CUDA events, after warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def fresh_backward(out: torch.Tensor, grad: torch.Tensor, leaves) -> None:
    """out.backward(grad) as a training step runs it: the leaves' gradients set to None first (the
    trainer's zero_grad(set_to_none=True)), so autograd takes dW as the gradient. Without it every
    repeat after the first adds dW into W.grad: a read and a write of W's size more (12 bytes a weight
    over the kernels' 20), which the first GPU loan's 42% of the bandwidth included."""
    for leaf in leaves:
        leaf.grad = None
    out.backward(grad)


def gpu_table() -> None:
    dev = "cuda"
    print(f"GPU: {torch.cuda.get_device_name(0)}\n")
    print("| fake quantization fwd+bwd, w2g64 | rows x cols | PyTorch ms | Triton ms | Triton GB/s |")
    print("|---|---|---|---|---|")
    for rows, cols in ((4096, 4096), (8192, 28672)):
        cfg = QuantConfig(2, 64)
        w = torch.randn(rows, cols, device=dev, requires_grad=True)
        s, z = (t.requires_grad_() for t in minmax_init(w.detach(), cfg))
        grad = torch.randn(rows, cols, device=dev)
        ref = timed(lambda: fresh_backward(fake_quantize(w, s, z, cfg), grad, (w, s, z)))
        fused = timed(lambda: fresh_backward(fused_fake_quantize(w, s, z, cfg.qmax, 64), grad, (w, s, z)))
        moved = rows * cols * 4 * 5  # fwd: read W, write W_hat; bwd: read W and g, write dW
        print(f"| | {rows} x {cols} | {ref:.2f} | {fused:.2f} | {moved / fused / 1e6:.0f} |")
    print("\n| packed linear fwd+bwd (E2E-QP), 4 x 2048 tokens, bf16 | bits | shape | PyTorch ms / peak MiB | "
          "dequant + cuBLAS ms / peak MiB | fused tiles ms / peak MiB |")
    print("|---|---|---|---|---|---|")
    for bits in (2, 3, 4):
        for out_f, in_f in ((4096, 4096), (28672, 8192)):
            layer, g = packed_layer(bits, out_f, in_f, device=dev, dtype=torch.bfloat16)
            x = torch.randn(4, 2048, in_f, device=dev, dtype=torch.bfloat16, requires_grad=True)
            rows = []
            for way in ("pytorch", "dequant", "fused"):
                with packed_way(way):  # the layer's forward picks its path by these variables
                    torch.cuda.reset_peak_memory_stats()
                    ms = timed(lambda: layer(x).float().sum().backward(), repeat=5)
                rows.append(f"{ms:.1f} / {torch.cuda.max_memory_allocated() / 2**20:.0f}")
            print(f"| | {bits} | {out_f} x {in_f} | {' | '.join(rows)} |")
    print("\n| GEMV vs fp16 F.linear | bits | shape | batch | fp16 ms | dequant ms | fused ms | best speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for out_f, in_f in ((4096, 4096), (28672, 8192)):
        w16 = torch.randn(out_f, in_f, device=dev, dtype=torch.float16)
        for bits in (2, 3, 4):
            layer, g = packed_layer(bits, out_f, in_f, device=dev)
            for batch in (1, 16):
                x = torch.randn(batch, in_f, device=dev, dtype=torch.float16)
                fp16 = timed(lambda: torch.nn.functional.linear(x, w16))
                ours = {}
                for way in ("dequant", "fused"):
                    with packed_way(way), torch.no_grad():
                        ours[way] = timed(lambda: packed_linear(x, layer.qweight, layer.qzeros, layer.scales, None,
                                                                bits, g))
                print(f"| | {bits} | {out_f} x {in_f} | {batch} | {fp16:.3f} | {ours['dequant']:.3f} | "
                      f"{ours['fused']:.3f} | {fp16 / min(ours.values()):.2f}x |")


def interpreter_checks() -> None:
    torch.manual_seed(0)
    worst = 0.0
    for bits, group in ((2, 32), (3, 64), (4, 128), (8, -1)):
        cfg = QuantConfig(bits, group)
        w = torch.randn(37, 128)
        s, z = minmax_init(w, cfg)
        same = torch.equal(fake_quantize(w, s, z, cfg), fused_fake_quantize(w, s, z, cfg.qmax, cfg.effective_group(128)))
        layer, g = packed_layer(bits, 64, 128, group=group, dtype=torch.float32)
        x = torch.randn(5, 128)
        diff = (layer(x) - packed_linear(x, layer.qweight, layer.qzeros, layer.scales, None, bits, g)).abs().max().item()
        worst = max(worst, diff)
        print(f"w{bits}g{group}: fused fake quantization bit-identical: {same}; packed linear max |diff| {diff:.1e}")
    print("\nTriton interpreter on CPU tensors (tests/test_kernels.py checks gradients too). Timings need a GPU: "
          "run this script on one.")


if __name__ == "__main__":
    gpu_table() if torch.cuda.is_available() else interpreter_checks()
