"""Block-AP vs round-to-nearest on the bundled SmolLM2-135M, at a fixed, stated CPU budget.

    OMP_NUM_THREADS=2 python bench/blockap_quality.py --bits 4 3 2 --out docs/bench_blockap.json

Prints a Markdown table: held-out Wikipedia perplexity for fp, RTN and Block-AP at each bit width,
with Block-AP's step throughput (tokens/s) and peak memory. The budget (windows x length x epochs)
is far below the paper's (4096 x 2048 x 2): quality claims hold for the budget printed.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eqat_dist.blockap.trainer import BlockAPSettings  # noqa: E402
from eqat_dist.data.windows import calibration_windows, eval_windows  # noqa: E402
from eqat_dist.eval import perplexity  # noqa: E402
from eqat_dist.models import load_model  # noqa: E402
from eqat_dist.models.quantize import quantize_rtn  # noqa: E402
from eqat_dist.models.lazy import LazyModel  # noqa: E402
from eqat_dist.blockap.steps import assemble  # noqa: E402
from eqat_dist.pipelines.round_robin import StreamSpec, run_blockap  # noqa: E402
from eqat_dist.quant import QuantConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=32)
    p.add_argument("--val-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--quant-lr", type=float, default=1e-3)
    p.add_argument("--weight-lr", type=float, default=1e-4)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--student-input", default="student", choices=["student", "teacher"])
    p.add_argument("--out", default=None)
    args = p.parse_args()

    model, tok = load_model("smollm2-135m")
    windows = eval_windows(tok, "wiki", args.eval_seqlen, args.eval_windows)
    train_ids, val_ids = calibration_windows(tok, "boolq", args.seqlen, args.train_size, args.val_size, seed=0)
    rows = {"fp": perplexity(model, windows)}
    print(f"budget: {args.train_size} x {args.seqlen} calibration tokens, {args.epochs} epochs, batch 2, "
          f"quant-lr {args.quant_lr}, weight-lr {args.weight_lr}; eval: wiki {len(windows)} x {args.eval_seqlen}; "
          f"threads {torch.get_num_threads()}", flush=True)
    print(f"fp: {rows['fp']:.2f}", flush=True)
    for bits in args.bits:
        cfg = QuantConfig(bits, args.group_size)
        rtn = perplexity(quantize_rtn(copy.deepcopy(model), cfg), windows)
        settings = BlockAPSettings(epochs=args.epochs, batch_size=2, quant_lr=args.quant_lr,
                                   weight_lr=args.weight_lr, seed=0)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            run_blockap(LazyModel("smollm2-135m"), cfg, train_ids, val_ids, settings, Path(tmp), {}, "cpu",
                        StreamSpec(dtype=torch.float32), args.student_input, log=lambda *a: None)
            wall = time.time() - t0
            student, reports = assemble(LazyModel("smollm2-135m"), cfg, Path(tmp))
        bap = perplexity(student, windows)
        rows[cfg.tag()] = {"rtn": rtn, "block_ap": bap, "wall_s": wall,
                           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in reports),
                           "peak_rss_mib": max(r["peak_mem_mib"] for r in reports),
                           "block_loss_change_pct": [100 * (r["loss_after"] / r["loss_before"] - 1) for r in reports]}
        print(f"{cfg.tag()}: RTN {rtn:.2f}  Block-AP {bap:.2f}  ({wall:.0f} s)", flush=True)

    print("\n| setting | fp | RTN | Block-AP | Block-AP wall s | step tokens/s (median block) | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for tag, r in rows.items():
        if tag == "fp":
            continue
        print(f"| {tag} | {rows['fp']:.2f} | {r['rtn']:.2f} | {r['block_ap']:.2f} | {r['wall_s']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows | {"args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
