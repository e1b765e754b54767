"""Sequence-parallel Block-AP against one rank at the same global batch (issue 40): Block-AP wall time,
perplexity after Block-AP, activation-store bytes per rank.

    python bench/sequence_parallel.py --seeds 0 --work runs/sequence_parallel

Each run is the real command line on SmolLM2-135M at w2g64 with the 2-bit default recipe (64 + 16
windows x 256 tokens, 2 epochs, global batch 4, the learning rates of bench/schedules.py), one thread
per rank (a rank stands for one GPU): one rank, then `mpiexec -n 2 ... --data-parallel 1
--sequence-parallel 2` (each rank every window, half of its tokens: attention gathers the window's keys
and values). `--layouts` adds others by their flags, e.g. `dp2:--data-parallel 2 --sequence-parallel 1`.
Runs one after the other; a finished run is reused.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"one": (1, ""), "sp2": (2, "--data-parallel 1 --sequence-parallel 2")}


def run(name: str, ranks: int, flags: str, seed: int, a, work: Path) -> dict:
    tag = f"s{seed}-{name}"
    out, log = work / tag, work / f"{tag}.log"
    if not (out / "results.json").exists():
        cmd = ["--model", "smollm2-135m", "--wbits", "2", "--group-size", "64", "--train-size", str(a.train_size),
               "--val-size", "16", "--seqlen", "256", "--epochs", "2", "--batch-size", "4", "--quant-lr", "2e-2",
               "--weight-lr", "2e-3", "--seed", str(seed), "--e2e-epochs", "0", "--eval-datasets", "wiki,news",
               "--eval-seqlen", "512", "--eval-max-windows", "8", "--zeroshot-tasks", "", "--skip-fp-eval",
               "--output", str(out), "--overwrite", "--discard-unfinished", *flags.split()]
        prefix = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] if ranks > 1 else []
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        with open(log, "w") as f:
            done = subprocess.run([*prefix, sys.executable, str(ROOT / "launch" / "run.py"), *cmd], env=env,
                                  stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"failed ({log})\n{log.read_text()[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    stores = [float(x) for x in re.findall(r"activation stores on \w+: .*; total ([\d.]+) GiB", log.read_text())]
    blocks = results["blocks"]
    return {"name": name, "seed": seed, "ranks": ranks, "wall_s": results["blockap_wall_s"],
            "train_s": sum(b["seconds"] for b in blocks),
            "ppl": {k: v["ppl"] for k, v in results["quantized"]["perplexity"].items()},
            "stores_mib": max(stores) * 1024 if stores else float("nan"),
            "last_losses": [b["train_loss_last"] for b in blocks]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path("runs/sequence_parallel"))
    p.add_argument("--layouts", nargs="*", default=[], metavar="NAME:FLAGS", help="more 2-rank layouts")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    layouts = dict(LAYOUTS) | {n: (2, f) for n, f in (v.split(":", 1) for v in a.layouts)}
    rows = [run(name, ranks, flags, seed, a, a.work) for seed in a.seeds for name, (ranks, flags) in layouts.items()]
    print("| seed | layout | Block-AP wall | vs 1 rank | training | wiki ppl | news ppl | stores per rank | "
          "block losses vs 1 rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = next(o for o in rows if o["seed"] == r["seed"] and o["name"] == "one")
        worst = max(abs(x / y - 1) for x, y in zip(r["last_losses"], one["last_losses"]))
        print(f"| {r['seed']} | {r['name']} ({r['ranks']} rank(s)) | {r['wall_s']:.1f} s | {r['wall_s'] / one['wall_s']:.3f}x | "
              f"{r['train_s'] / one['train_s']:.3f}x | {r['ppl']['wiki']:.2f} | {r['ppl']['news']:.2f} | "
              f"{r['stores_mib']:.1f} MiB | {worst:.1e} |")


if __name__ == "__main__":
    main()
