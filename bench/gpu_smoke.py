"""The first thing to run on a GPU machine: does the CUDA path work, and what does it cost? One table.

    python bench/gpu_smoke.py                 # on a GPU (under 10 minutes on one H100)
    python bench/gpu_smoke.py --cpu-check     # every section at toy sizes on the CPU (the script's own test)
    python bench/gpu_smoke.py --only kernels,block70b --out smoke.md
    python bench/gpu_smoke.py --quick         # a short loan: half the runs (see --help)

Sections (each says PASS, FAIL or SKIP and its figures; the script goes on after a failure):
- scale7b:    a Llama-2-7B-shaped model (random bf16 weights, all 32 blocks) through the whole --single-gpu
              pipeline: Block-AP on 64 x 2048 tokens (1 epoch, batch 2), 4 E2E-QP steps of 2 x 2048 tokens on
              ZeRO-3 with CPU offload, the export and a short evaluation; each phase's time and peaks
              next to `eqat-dist plan`'s, a block's turn in parts, the Block-AP efficiency on this GPU;
- kernels:    the Triton kernels on CUDA tensors at Llama-2-70B shapes (hidden 8192, intermediate 28672;
              g64/g128; 2/3/4 bits; 1/16/4096 tokens) against the PyTorch reference, with times, and one
              launch past 2^31 elements (80k tokens x 28672) that int32 offsets would get wrong;
- bench:      bench/kernel_timings.py's own tables;
- pipeline:   the whole --single-gpu run on the bundled model with and without the kernels (perplexities
              within 1%), step times, and each phase's GPU peak next to `eqat-dist plan --json`;
- block70b:   one Llama-2-70B-shaped block (1-layer config, random weights) trained 32 steps at 2 x 2048
              tokens with --activations cpu, gpu, and cpu with half the stores kept on the GPU
              (--activations-on-gpu): the ratio is the cost of the host path (goal <= 1.1x);
              then on the GPU stores with --compile (torch.compile of the block step; on CPUs it was slower);
- weight_work: bench/weight_work.py on a 70B-shaped block at 2 x 2048 tokens: what a step spends on the
              block's weights (fake quantization, clipping, AdamW), the work `--weight-work split` shares
              over a group (on GPUs the plan decides, from the bandwidths it assumes);
- two_ranks:  Block-AP on two ranks sharing one GPU (torchrun; data parallel, then sequence parallel; their sums
              over gloo since NCCL needs a GPU per rank) against one rank, up to float summation order.
Without a GPU (and without --cpu-check) it says so in one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("scale7b", "kernels", "bench", "pipeline", "block70b", "weight_work", "two_ranks")


class Skip(Exception):
    """A section that cannot run here (a package missing): reported, not a failure."""


def needs(*modules: str) -> None:
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"not installed: {', '.join(missing)} (carry their wheels to this machine)")


def timed_ms(fn, repeat: int = 10) -> float:
    """Median milliseconds of fn: bench/kernel_timings.py's CUDA-event timer on a GPU, the wall clock on the CPU."""
    import torch

    if torch.cuda.is_available():
        sys.path.insert(0, str(ROOT / "bench"))
        from kernel_timings import timed
        return timed(fn, repeat)
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


# -- kernels -------------------------------------------------------------------------------------------
def section_kernels(ctx) -> list[str]:
    import torch

    from eqat_dist.kernels.fake_quant import fake_quantize as fused
    from eqat_dist.kernels.packed_linear import packed_linear
    from eqat_dist.quant import QuantConfig
    from eqat_dist.quant.fake_quant import dequantize, fake_quantize, minmax_init
    from eqat_dist.quant.packed_linear import PackedLinear

    sys.path.insert(0, str(ROOT / "bench"))
    from kernel_timings import fresh_backward, packed_way

    dev, rows = ctx.device, []
    hidden, inter = (8192, 28672) if not ctx.cpu else (64, 96)
    token_counts = (1, 16, 4096) if not ctx.cpu else (1, 16, 33)
    worst = {"fq": 0.0, "y": 0.0, "dx": 0.0, "ds": 0.0}
    for bits in (2, 3, 4):
        for group in (64, 128) if not ctx.cpu else (32,):
            cfg = QuantConfig(bits, group)
            for out_f, in_f in ((hidden, hidden), (inter, hidden), (hidden, inter)):
                w = torch.randn(out_f, in_f, device=dev) * 0.02
                s, z = minmax_init(w, cfg)
                refs = [t.clone().requires_grad_() for t in (w, s, z)]
                mine = [t.clone().requires_grad_() for t in (w, s, z)]
                want, got = fake_quantize(*refs, cfg), fused(*mine, cfg.qmax, group)
                assert torch.equal(want, got), f"fake quantization w{bits}g{group} {out_f}x{in_f} differs"
                grad = torch.randn_like(want)
                want.backward(grad)
                got.backward(grad)
                for a, b in zip(refs, mine):
                    worst["fq"] = max(worst["fq"], ((a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-12)).item())
                # W.grad cleared before each call: as in training, no accumulation timed
                ms = timed_ms(lambda: fresh_backward(fused(*mine, cfg.qmax, group), grad, mine), repeat=3)
                rows.append(f"| fake-quant fwd+bwd | w{bits}g{group} | {out_f} x {in_f} | | {ms:.2f} ms |")
                layer = PackedLinear.from_int(torch.randint(0, 2**bits, (out_f, in_f), device=dev),
                                              torch.randint(0, 2**bits, (out_f, in_f // group), device=dev).float(),
                                              torch.rand(out_f, in_f // group, device=dev) * 0.002 + 0.0005, cfg,
                                              dtype=torch.float32).to(dev)
                weight = layer.dequantized_weight().to(torch.bfloat16)
                for tokens in token_counts:
                    x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    scales = layer.scales.detach().clone().requires_grad_()
                    y = packed_linear(x, layer.qweight, layer.qzeros, scales, None, bits, group)
                    ref = torch.nn.functional.linear(x.float(), weight.float())
                    worst["y"] = max(worst["y"], ((y.float() - ref).norm() / ref.norm()).item())
                    if tokens == token_counts[-1]:
                        dy = torch.randn_like(y)
                        y.backward(dy)
                        ref_x = x.detach().float().requires_grad_()
                        ref_s = layer.scales.detach().clone().requires_grad_()  # PyTorch's dequantize-then-matmul
                        w_ref = dequantize(layer.int_codes(), ref_s.t(), layer.int_zeros(), group)
                        torch.nn.functional.linear(ref_x, w_ref).backward(dy.float())
                        worst["dx"] = max(worst["dx"], ((x.grad.float() - ref_x.grad).norm() / ref_x.grad.norm()).item())
                        worst["ds"] = max(worst["ds"], ((scales.grad - ref_s.grad).norm() / ref_s.grad.norm()).item())
                    ms = {}
                    for way in ("dequant", "fused"):  # EQAT_PACKED_LINEAR: the default, and the tiled kernels
                        with packed_way(way), torch.no_grad():
                            ms[way] = timed_ms(lambda: packed_linear(x, layer.qweight, layer.qzeros, layer.scales,
                                                                     None, bits, group), repeat=5)
                            if way == "fused":
                                y = packed_linear(x, layer.qweight, layer.qzeros, layer.scales, None, bits, group)
                                worst["y"] = max(worst["y"], ((y.float() - ref).norm() / ref.norm()).item())
                    rows.append(f"| packed linear fwd | w{bits}g{group} | {in_f} -> {out_f} | {tokens} | "
                                f"dequant {ms['dequant']:.3f} ms, fused {ms['fused']:.3f} ms |")
                    if tokens == token_counts[-1] and bits == 2:  # an E2E-QP training step's layer
                        xs = x.detach().requires_grad_()
                        ss = layer.scales.detach().clone().requires_grad_()
                        step = timed_ms(lambda: packed_linear(xs, layer.qweight, layer.qzeros, ss, None, bits,
                                                              group).backward(dy), repeat=3)
                        rows.append(f"| packed linear fwd+bwd (dx, ds) | w{bits}g{group} | {in_f} -> {out_f} | "
                                    f"{tokens} | dequant {step:.3f} ms |")
                del layer, weight
    assert worst["y"] < 2e-2 and worst["dx"] < 2e-2 and worst["ds"] < 5e-2 and worst["fq"] < 1e-4, worst
    rows.append(f"| worst relative error | | | | fq grads {worst['fq']:.1e}, y {worst['y']:.1e}, dx {worst['dx']:.1e}, "
                f"ds {worst['ds']:.1e} |")
    rows += overflow_check(ctx)
    return rows


def overflow_check(ctx) -> list[str]:
    """80k tokens x 28672: tokens x width passes 2^31; the last rows must equal the reference."""
    import torch

    from eqat_dist.kernels.packed_linear import packed_linear
    from eqat_dist.quant import QuantConfig
    from eqat_dist.quant.packed_linear import PackedLinear

    if ctx.cpu:
        return ["| past 2^31 elements | | | | needs a GPU (checked on the CPU by tests/test_kernels.py's offsets test) |"]
    dev, tokens, in_f, out_f, cfg = ctx.device, 80_000, 28672, 256, QuantConfig(4, 128)
    layer = PackedLinear.from_int(torch.randint(0, 16, (out_f, in_f), device=dev),
                                  torch.randint(0, 16, (out_f, in_f // 128), device=dev).float(),
                                  torch.rand(out_f, in_f // 128, device=dev) * 0.002 + 0.0005, cfg).to(dev)
    x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        y = packed_linear(x, layer.qweight, layer.qzeros, layer.scales, None, 4, 128)
        tail = torch.nn.functional.linear(x[-64:].float(), layer.dequantized_weight().float())
    err = ((y[-64:].float() - tail).norm() / tail.norm()).item()
    assert err < 2e-2, f"rows past 2^31 elements are wrong (relative error {err:.2e})"
    return [f"| past 2^31 elements | w4g128 | {in_f} -> {out_f} | {tokens} | last rows rel. error {err:.1e} |"]


# -- bench/kernel_timings.py ----------------------------------------------------------------------------------
def section_bench(ctx) -> list[str]:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_timings.py")], capture_output=True, text=True,
                          timeout=300, env=ctx.env)
    ctx.appendix.append("## bench/kernel_timings.py\n\n" + done.stdout)
    assert done.returncode == 0, done.stderr[-1500:]
    return ["| bench/kernel_timings.py | | | | tables below |"]


# -- the whole pipeline on one GPU ---------------------------------------------------------------------
def _run(ctx, args: list[str], timeout: int, name: str) -> None:
    """One launch/run.py; its log is written as it goes (a run killed midway still leaves what it printed)."""
    log = ctx.work / f"{name}.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *args], stdout=out,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, env=ctx.env)
    if done.returncode != 0:
        last = log.read_text().strip().splitlines()
        raise AssertionError(f"{name} failed: {last[-1][:300] if last else '?'} (log: {log})")


def section_pipeline(ctx) -> list[str]:
    needs("transformers", "datasets", "safetensors", "gguf")
    e2e = ["--e2e-train-size", "16" if not ctx.cpu else "8", "--e2e-seqlen", "256", "--e2e-global-batch", "4",
           "--e2e-micro-batch", "2", "--e2e-lr", "2e-4"]
    try:
        needs("deepspeed")
    except Skip:
        e2e = ["--e2e-epochs", "0"]
    budget = (["--train-size", "32", "--val-size", "4", "--epochs", "2"] if not ctx.cpu else
              ["--train-size", "4", "--val-size", "1", "--epochs", "1"])
    # on the CPU a 4-block model of width 64 stands in for the bundled one: the same run, flags and rows
    model = ctx.model if not ctx.cpu else str(_shaped_model(ctx, ctx.work / "tiny-pipeline", (64, 128, 4, 2), layers=4))
    flags = ["--model", model, "--wbits", "2", "--group-size", "64", "--seqlen", "256", "--quant-lr", "2e-2",
             "--weight-lr", "2e-3", *budget, *e2e, "--eval-datasets", "wiki", "--eval-seqlen", "512",
             "--eval-max-windows", "8" if not ctx.cpu else "1", "--zeroshot-tasks", "", "--no-tensorboard"]
    plan = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "plan", *flags, "--ranks", "1",
                           "--gpu-memory", "80" if not ctx.cpu else "0", "--json"],
                          capture_output=True, text=True, env=ctx.env)
    planned = json.loads(plan.stdout)["phases"] if plan.stdout.strip() else {}
    rows, ppl = [], {}
    runs = (("kernels", []),) if ctx.quick else (("kernels", []), ("no-kernels", ["--no-kernels"]))
    for name, extra in runs:
        t0 = time.time()
        _run(ctx, ["--single-gpu", *flags, *extra, "--output", str(ctx.work / name), "--overwrite", "--discard-unfinished"], 600, name)
        r = json.loads((ctx.work / name / "results.json").read_text())
        ppl[name] = r.get("quantized_e2e", r["quantized"])["perplexity"]["wiki"]["ppl"]
        blocks = r.get("blocks", [])
        step_ms = 1e3 * sum(b["seconds"] for b in blocks) / max(1, sum(b["steps"] for b in blocks))
        e2e_report = r.get("e2e", {})
        peaks = {"block-ap": max((b["peak_mem_mib"] for b in blocks), default=0),
                 "e2e": max((m.get("device", 0) for m in e2e_report.get("peak_memory_mib_per_rank", [])), default=0),
                 "eval": r["quantized"].get("peak_memory_mib", {}).get("device", 0)}
        plan_text = ", ".join(f"{k} {peaks[k] / 1024:.1f} (plan {planned.get(k, {}).get('gpu_peak_gib', 0):.1f})"
                              for k in peaks)
        rows.append(f"| pipeline --single-gpu | {name} | ppl {ppl[name]:.2f} | Block-AP {step_ms:.1f} ms/step, "
                    f"E2E {e2e_report.get('step_seconds_median') or 0:.2f} s/step, {time.time() - t0:.0f} s | "
                    f"GPU peak GiB: {plan_text} |")
        print(rows[-1], flush=True)  # a run's row as soon as it is in: a loan can end before the next
    if ctx.quick:  # the kernels' numerics are the kernels section's; the same run without them is left out
        return rows
    gap = abs(ppl["kernels"] / ppl["no-kernels"] - 1)
    assert gap < 0.01, f"perplexity with kernels {ppl['kernels']:.3f} vs without {ppl['no-kernels']:.3f}"
    return rows


# -- one Llama-2-70B-shaped block ----------------------------------------------------------------------
def _shaped_model(ctx, folder: Path, shape, layers: int | None = None) -> Path:
    """A random-weight bfloat16 model of that shape (bench/synthetic_models.py), built on the GPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic_models import shaped_model
    return shaped_model(folder, shape, tokenizer_from=ctx.model, layers=layers, device=ctx.device.type)


def section_block70b(ctx) -> list[str]:
    needs("transformers", "datasets", "safetensors", "gguf")
    shape = (8192, 28672, 64, 8) if not ctx.cpu else (64, 96, 4, 2)
    folder = ctx.work / "llama70b-1layer"
    _shaped_model(ctx, folder, shape, layers=1)
    seqlen, windows = ("2048", "64") if not ctx.cpu else ("64", "8")
    flags = ["--model", str(folder), "--wbits", "2", "--group-size", "64" if not ctx.cpu else "32",
             "--epochs", "1", "--train-size", windows, "--val-size", "0", "--batch-size", "2", "--seqlen", seqlen,
             "--phase", "block-ap", "--eval-datasets", "", "--zeroshot-tasks", "", "--skip-fp-eval",
             "--no-tensorboard", "--single-gpu", "--ignore-plan"]
    seconds, losses = {}, {}
    # half of the stores' rows on the GPU, half in host memory (--activations-on-gpu: 2 of the 4 GiB)
    placements = {"cpu": ["--activations", "cpu"], "gpu": ["--activations", "gpu"],
                  "cpu, 2 GiB on the GPU": ["--activations", "cpu", "--activations-on-gpu", "2"]}
    if ctx.cpu:
        placements = {"cpu": ["--activations", "cpu"], "disk": ["--activations", "disk"]}
    elif ctx.quick:  # the host path against stores on the GPU: the ratio the section exists for
        placements = {"cpu": placements["cpu"], "gpu": placements["gpu"]}
    for placement, chosen in placements.items():
        out = ctx.work / f"block70b-{placement.split(',')[0]}{'-split' if ',' in placement else ''}"
        _run(ctx, [*flags, *chosen, "--output", str(out), "--overwrite", "--discard-unfinished"], 600, f"block70b-{placement}")
        block = json.loads((out / "results.json").read_text())["blocks"][0]
        seconds[placement] = (block["seconds"], block["steps"], block["peak_mem_mib"])
        losses[placement] = block["loss_after"]
        print(f"| 70B-shaped block | --activations {placement} | {block['steps']} steps | "
              f"{1e3 * block['seconds'] / block['steps']:.0f} ms/step | (as it comes) |", flush=True)
    base = "gpu" if "gpu" in seconds else "disk"
    ratio = {p: s[0] / seconds[base][0] for p, s in seconds.items()}
    rows = [f"| 70B-shaped block, 2 x {seqlen} tokens | --activations {p} | {s[1]} steps | {1e3 * s[0] / s[1]:.0f} ms/step, "
            f"peak {s[2] / 1024:.1f} GiB, loss after {losses[p]:.6g} | "
            f"{'' if p == base else f'{p} / {base} = {ratio[p]:.2f}x (goal <= 1.1x)'} |"
            for p, s in seconds.items()]
    if ctx.quick:
        return rows
    # --compile: the block step through torch.compile; a one-block model pays the compile inside its only
    # block, so the ratio understates what a many-block run gains
    out = ctx.work / "block70b-compile"
    _run(ctx, [*flags, "--activations", base, "--compile", "--output", str(out), "--overwrite", "--discard-unfinished"], 600, "block70b-compile")
    block = json.loads((out / "results.json").read_text())["blocks"][0]
    rows.append(f"| 70B-shaped block, 2 x {seqlen} tokens | --activations {base} --compile | {block['steps']} steps | "
                f"{1e3 * block['seconds'] / block['steps']:.0f} ms/step with the compile, peak "
                f"{block['peak_mem_mib'] / 1024:.1f} GiB | plain / compiled = {seconds[base][0] / block['seconds']:.2f}x "
                "(the compile included) |")
    return rows


# -- a Llama-2-7B-shaped model through the whole --single-gpu pipeline --------------------------------------
def section_scale7b(ctx) -> list[str]:
    """All 32 blocks of a random Llama-2-7B-shaped model: Block-AP (64 x 2048 tokens, 1 epoch, batch 2),
    4 E2E-QP steps of 2 x 2048 tokens on ZeRO-3 with CPU offload, the export and a short evaluation; each
    phase's wall time and peaks next to `eqat-dist plan` for the same flags, and the Block-AP efficiency
    the planner should use on this GPU."""
    needs("transformers", "datasets", "safetensors", "gguf", "deepspeed")
    t0 = time.time()
    folder = _shaped_model(ctx, ctx.work / "llama-2-7b-shaped", "llama-2-7b" if not ctx.cpu else (64, 96, 4, 4),
                           layers=None if not ctx.cpu else 4)
    made_s = time.time() - t0
    seqlen, windows, group = ("2048", "64", "64") if not ctx.cpu else ("64", "8", "32")
    flags = ["--model", str(folder), "--wbits", "2", "--group-size", group, "--epochs", "1", "--train-size", windows,
             "--val-size", "8" if not ctx.cpu else "2", "--batch-size", "2", "--seqlen", seqlen,
             "--e2e-train-size", "8" if not ctx.cpu else "4", "--e2e-seqlen", seqlen, "--e2e-global-batch", "2",
             "--e2e-micro-batch", "1", "--e2e-lr", "2e-5", "--eval-datasets", "wiki", "--eval-seqlen", seqlen,
             "--eval-max-windows", "4" if not ctx.cpu else "1", "--zeroshot-tasks", "", "--skip-fp-eval",
             "--no-tensorboard", "--single-gpu"]
    # on a GPU machine the plan is for its GPU and memory (`eqat-dist plan` finds them itself)
    plan = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "plan", *flags, "--ranks", "1", "--json"],
                          capture_output=True, text=True, env=ctx.env)
    assert plan.returncode == 0, f"eqat-dist plan failed: {plan.stderr.strip()[-300:]}"
    plan_json = json.loads(plan.stdout)
    planned = plan_json["phases"]
    t_run = time.time()
    _run(ctx, [*flags, "--output", str(ctx.work / "scale7b"), "--overwrite", "--discard-unfinished"], 560, "scale7b")
    run_s = time.time() - t_run
    r = json.loads((ctx.work / "scale7b" / "results.json").read_text())
    blocks, e2e = r["blocks"], r["e2e"]
    turns = {k: sum(b.get(k, 0.0) for b in blocks) for k in ("fp_stream_s", "start_s", "wall_s", "pack_s")}
    e2e_peaks = e2e["peak_memory_mib_per_rank"]
    evals = [r["quantized"]["peak_memory_mib"], r["quantized_e2e"]["peak_memory_mib"]]
    gib = lambda mib: None if ctx.cpu else mib / 1024  # noqa: E731  a GPU's peak; a CPU run has none
    measured = {  # phase: (seconds, GPU peak GiB, host peak GiB), as the run recorded them; None where it did not
        "block-ap": (r["blockap_wall_s"], gib(max(b["peak_mem_mib"] for b in blocks)),
                     max(b["host_peak_mib"] for b in blocks) / 1024),
        "e2e": (e2e["seconds"], gib(max(m.get("device", 0) for m in e2e_peaks)),
                max(m["host_rss"] for m in e2e_peaks) / 1024),
        "export": (r.get("export_s", 0.0) + e2e.get("export_s", 0.0), None, None),
        "eval": (sum(e["seconds"] for e in (r["quantized"], r["quantized_e2e"])),
                 gib(max(e.get("device", 0) for e in evals)), max(e["host_rss"] for e in evals) / 1024)}
    host_peak_gib = max(m[2] for m in measured.values() if m[2] is not None)
    rows = [f"| scale7b: the model | {len(blocks)} blocks, random bf16 | written in {made_s:.0f} s | | "
            f"run {run_s:.0f} s in all, host peak {host_peak_gib:.1f} GiB (plan "
            f"{max(p['host_peak_gib'] for p in planned.values()):.1f}) |"]
    for phase, (seconds, gpu_gib, host_gib) in measured.items():
        p = planned.get(phase, {})
        peaks = ", ".join(f"{name} {got:.1f} GiB (plan {p.get(key, 0):.1f})" for name, got, key in
                          (("GPU", gpu_gib, "gpu_peak_gib"), ("host", host_gib, "host_peak_gib")) if got is not None)
        rows.append(f"| scale7b: {phase} | w2g{group} | {seqlen} tokens | | {seconds:.1f} s (plan "
                    f"{3600 * p.get('hours', 0):.1f} s){', ' + peaks if peaks else ''} |")
        print(rows[-1], flush=True)
    n = len(blocks)
    turn = r["blockap_wall_s"] / n
    rest = turn - sum(turns.values()) / n
    rows.append(f"| scale7b: a block's turn | mean of {n} | | | {turn:.2f} s: fp stream {turns['fp_stream_s'] / n:.2f} s, "
                f"start {turns['start_s'] / n:.2f} s, training {turns['wall_s'] / n:.2f} s, packing "
                f"{turns['pack_s'] / n:.2f} s, the rest (saving, the student stream, set-up) {rest:.2f} s |")
    if not ctx.cpu:  # what the planner's fitted efficiency (28% on the paper's A100 times) is on this GPU
        from eqat_dist.planning.estimate import EFFICIENCY, PEAK_TFLOPS
        kind = plan_json["settings"]["gpu"]
        plan_s = 3600 * planned["block-ap"]["hours"]
        measured_eff = EFFICIENCY["block-ap"] * plan_s / r["blockap_wall_s"]  # the plan's time is FLOPs / efficiency
        rows.append(f"| scale7b: Block-AP efficiency | {kind} | | | measured {measured_eff:.0%} of bf16 peak, "
                    f"{measured_eff * PEAK_TFLOPS[kind]:.0f} TFLOP/s (`plan --tflops`); the plan assumes "
                    f"{EFFICIENCY['block-ap']:.0%} |")
    return rows


# -- the weight work of a step -------------------------------------------------------------------------
def section_weight_work(ctx) -> list[str]:
    needs("transformers")
    shape, seqlen, group = ("8192,28672,64,8", "2048", "64") if not ctx.cpu else ("64,96,4,2", "64", "32")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "weight_work.py"), "--device", ctx.device.type,
                           "--shape", shape, "--seqlen", seqlen, "--group-size", group, "--amp"], capture_output=True,
                          text=True, timeout=500, env=ctx.env)
    ctx.appendix.append("## bench/weight_work.py\n\n```\n" + done.stdout + "```\n")
    assert done.returncode == 0, done.stderr[-1500:]
    summary = done.stdout.strip().splitlines()[-1]
    return [f"| weight work of a step | w2g{group} | {shape} | 2 x {seqlen} | {summary} |"]


# -- two ranks on one GPU ------------------------------------------------------------------------------
def section_two_ranks(ctx) -> list[str]:
    needs("transformers", "datasets", "safetensors", "gguf")
    folder = ctx.work / "tiny-4layer"
    _shaped_model(ctx, folder, (64, 128, 4, 2), layers=4)
    flags = ["--model", str(folder), "--wbits", "2", "--group-size", "32", "--epochs", "2", "--train-size", "8",
             "--val-size", "2", "--seqlen", "32", "--phase", "block-ap", "--student-input", "student",
             "--eval-datasets", "", "--zeroshot-tasks", "", "--skip-fp-eval", "--no-tensorboard"]
    _run(ctx, [*flags, "--output", str(ctx.work / "one-rank"), "--overwrite", "--discard-unfinished"], 300, "one-rank")
    rows = []
    for name, layout in (("data parallel", []), ("sequence parallel", ["--data-parallel", "1", "--sequence-parallel", "2"])):
        rows.append(_two_ranks_against_one(ctx, flags, name, layout))
    return rows


def _two_ranks_against_one(ctx, flags: list[str], name: str, layout: list[str]) -> str:
    """torchrun of 2 ranks on the one GPU in `layout` against one rank: one rank's steps up to float
    summation order (tests/test_distributed.py::_same_steps, _same_losses), bit-identical by luck."""
    import torch

    from eqat_dist.export.gptq_v2 import LazyTensors

    out = ctx.work / f"two-ranks-{name.split()[0]}"
    env = dict(ctx.env, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29400 + os.getpid() % 500), str(ROOT / "launch" / "run.py"), *flags, *layout, "--output",
                          str(out), "--overwrite", "--discard-unfinished"], capture_output=True, text=True, timeout=300,
                         env=env)
    (ctx.work / f"{out.name}.log").write_text(two.stdout + two.stderr)
    assert two.returncode == 0, two.stderr[-1500:]
    a, b = dict(LazyTensors(ctx.work / "one-rank")), dict(LazyTensors(out))
    assert a.keys() == b.keys(), "two ranks exported other tensors than one rank"
    if all(torch.equal(a[k], b[k]) for k in a):
        return f"| Block-AP, 2 ranks on 1 GPU vs 1 rank | student, {name} | | | bit-identical export |"
    block0 = [json.loads((run / "results.json").read_text())["blocks"][0]["val_losses"][-1]
              for run in (ctx.work / "one-rank", out)]
    gap = abs(block0[1] / block0[0] - 1)
    packed = [k for k in a if not a[k].is_floating_point()]
    flipped = sum((a[k] != b[k]).sum().item() for k in packed) / sum(a[k].numel() for k in packed)
    assert gap < 1e-3 and flipped < 1e-2, f"two ranks on one GPU ({name}) differ from one rank: block 0 val loss " \
                                          f"{gap:.1e}, packed integers {100 * flipped:.2f}% different"
    return (f"| Block-AP, 2 ranks on 1 GPU vs 1 rank | student, {name} | | | block 0 val loss within {gap:.1e}, "
            f"{100 * flipped:.3f}% of packed integers differ (float summation order) |")


# -- driver --------------------------------------------------------------------------------------------
class Context:
    def __init__(self, cpu: bool, work: Path, model: str = "smollm2-135m", quick: bool = False):
        import torch

        self.cpu = cpu
        self.model = model
        self.quick = quick
        self.device = torch.device("cpu" if cpu else "cuda")
        self.work = work
        self.appendix: list[str] = []
        self.env = dict(os.environ)
        if cpu:
            self.env |= {"TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-check", action="store_true", help="run every section at toy sizes on the CPU")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections ({', '.join(SECTIONS)})")
    parser.add_argument("--out", help="also write the table (and bench/kernel_timings.py's tables) to this Markdown file")
    parser.add_argument("--model", default="smollm2-135m",
                        help="the pipeline section's model, and the tokenizer of the synthetic ones (a bundled name or "
                             "a folder; default: the bundled smollm2-135m)")
    parser.add_argument("--quick", action="store_true",
                        help="fit a short GPU loan: the pipeline with kernels only, block70b on cpu and gpu stores "
                             "only (no --compile); about half the time")
    parser.add_argument("--work", help="folder for the runs (default: a temporary folder, removed afterwards)")
    args = parser.parse_args(argv)
    if args.cpu_check:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.cpu_check and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device on this machine; nothing to check here (run it on a GPU, or --cpu-check)")
        return 0
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.cpu_check, work, args.model, args.quick)
    device = "CPU (--cpu-check, Triton interpreter)" if args.cpu_check else torch.cuda.get_device_name(0)
    lines = [f"# gpu_smoke on {device}, torch {torch.__version__}, model {args.model}", "",
             "| check | setting | shape | tokens | result |", "|---|---|---|---|---|"]
    failed = False
    for name in wanted:
        t0 = time.time()
        try:
            rows = globals()[f"section_{name}"](ctx)
            verdict = "PASS"
        except Skip as why:
            rows, verdict = [], f"SKIP ({why})"
        except Exception as err:  # noqa: BLE001 - one section's failure must not hide the others
            rows, verdict, failed = [], f"FAIL: {type(err).__name__}: {' '.join(str(err).split())[:300]}", True
            (work / f"{name}.traceback").write_text(traceback.format_exc())
        lines += rows + [f"| **{name}** | | | | {verdict} ({time.time() - t0:.0f} s) |"]
        print(lines[-1], flush=True)
    report = "\n".join(lines + [""] + ctx.appendix)
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True) if not failed else print(f"logs of the failed runs kept in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
