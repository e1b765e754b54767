"""Wall time of Block-AP on SmolLM2-135M with 1 and 2 ranks (1 thread each), teacher mode, over MPI,
and the perplexity price of teacher vs student mode.

    python bench/distributed_speedup.py --ranks 1 2 --mode teacher
    python bench/distributed_speedup.py --ranks 1 --mode student --mode teacher --bits 2 4   # quality

Runs the real command line (`mpiexec -n N python launch/run.py ...`) and reads each run's results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(ranks: int, mode: str, bits: int, a, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "--model", "smollm2-135m", "--wbits", str(bits),
           "--group-size", "64", "--output", str(out), "--overwrite", "--discard-unfinished", "--phase", "block-ap", "--epochs", str(a.epochs), "--train-size",
           str(a.train_size), "--val-size", str(a.val_size), "--seqlen", str(a.seqlen), "--quant-lr", str(a.quant_lr),
           "--weight-lr", str(a.weight_lr), "--student-input", mode, "--eval-datasets", "wiki", "--zeroshot-tasks", "", "--eval-seqlen",
           "512", "--eval-max-windows", str(a.eval_windows), "--skip-fp-eval", "--no-tensorboard", "--recipe", "paper"]
    if ranks > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    results = json.loads((out / "results.json").read_text())
    return {"ranks": ranks, "mode": mode, "bits": bits, "wall_s": wall, "blockap_wall_s": results["blockap_wall_s"],
            "ppl": results["quantized"]["perplexity"]["wiki"]["ppl"],
            "wait_s_max": max(b.get("wait_s", 0.0) for b in results["blocks"])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--mode", action="append", default=None, choices=["teacher", "student"])
    p.add_argument("--bits", type=int, nargs="+", default=[2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-size", type=int, default=32)
    p.add_argument("--val-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--quant-lr", type=float, default=1e-3)
    p.add_argument("--weight-lr", type=float, default=1e-4)
    p.add_argument("--eval-windows", type=int, default=16)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in a.bits:
            for mode in a.mode or ["teacher"]:
                for ranks in a.ranks:
                    rows.append(run(ranks, mode, bits, a, Path(tmp) / f"{mode}{ranks}w{bits}"))
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\nbudget: {a.train_size} x {a.seqlen} tokens, {a.epochs} epochs, 1 thread per rank, MPI transport")
    print("| bits | mode | ranks | Block-AP wall s | whole command s | wiki ppl |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| w{r['bits']}g64 | {r['mode']} | {r['ranks']} | {r['blockap_wall_s']:.0f} | {r['wall_s']:.0f} | "
              f"{r['ppl']:.2f} |")
    base = {(r["bits"], r["mode"]): r for r in rows if r["ranks"] == 1}
    for r in rows:
        b = base.get((r["bits"], r["mode"]))
        if r["ranks"] > 1 and b:
            print(f"speed-up w{r['bits']} {r['mode']} {r['ranks']} ranks: Block-AP "
                  f"{b['blockap_wall_s'] / r['blockap_wall_s']:.2f}x, whole command {b['wall_s'] / r['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
