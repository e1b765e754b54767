"""Data-parallel Block-AP against one rank at the same global batch (issue 22): Block-AP wall time,
perplexity after Block-AP, activation-store bytes per rank.

    python bench/data_parallel.py --bits 2 3 --seeds 0 1 --work runs/data_parallel

Each run is the real command line on SmolLM2-135M (128 + 16 windows x 256 tokens, 2 epochs, global
batch 2, the learning rates of bench/schedules.py), one thread per rank (a rank stands for one GPU): one
rank, then `mpiexec -n 2` with the default layout (one group of 2 data-parallel ranks, each at batch 1
on half the windows). Runs one after the other; a finished run is reused. `--variants NAME:FLAGS` adds
a 2-rank run with more flags per variant, e.g. `--variants "replicated:--weight-work replicated"`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = {2: ("2e-2", "2e-3"), 3: ("5e-3", "5e-4"), 4: ("1e-3", "1e-4")}  # as bench/schedules.py


def run(bits: int, seed: int, ranks: int, a, work: Path, variant: tuple[str, str] = ("", "")) -> dict:
    name = f"w{bits}-s{seed}-x{ranks}" + (f"-{variant[0]}" if variant[0] else "")
    out, log = work / name, work / f"{name}.log"
    if not (out / "results.json").exists():
        qlr, wlr = LRS[bits]
        cmd = ["--model", "smollm2-135m", "--wbits", str(bits), "--group-size", "64", "--train-size", str(a.train_size),
               "--val-size", "16", "--seqlen", "256", "--epochs", "2", "--batch-size", "2", "--quant-lr", qlr,
               "--weight-lr", wlr, "--seed", str(seed), "--e2e-epochs", "0", "--eval-datasets", "wiki,news",
               "--eval-seqlen", "512", "--eval-max-windows", "8", "--zeroshot-tasks", "", "--skip-fp-eval",
               "--output", str(out), "--overwrite", "--discard-unfinished", "--recipe", "paper",  # the paper's method, as its figures
               *variant[1].split()]
        prefix = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] if ranks > 1 else []
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        with open(log, "w") as f:
            done = subprocess.run([*prefix, sys.executable, str(ROOT / "launch" / "run.py"), *cmd], env=env,
                                  stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"failed ({log})\n{log.read_text()[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    stores = [float(x) for x in re.findall(r"activation stores on \w+: .*; total ([\d.]+) GiB", log.read_text())]
    return {"bits": bits, "seed": seed, "ranks": ranks, "variant": variant[0], "wall_s": results["blockap_wall_s"],
            "ppl": {k: v["ppl"] for k, v in results["quantized"]["perplexity"].items()},
            "stores_mib": max(stores) * 1024 if stores else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--work", type=Path, default=Path("runs/data_parallel"))
    p.add_argument("--variants", nargs="*", default=[], metavar="NAME:FLAGS")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    variants = [tuple(v.split(":", 1)) for v in a.variants]
    rows = [run(bits, seed, ranks, a, a.work) for bits in a.bits for seed in a.seeds for ranks in (1, 2)]
    rows += [run(bits, seed, 2, a, a.work, v) for bits in a.bits for seed in a.seeds for v in variants]
    print("| width | seed | layout | Block-AP wall | vs 1 rank | wiki ppl | news ppl | stores per rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = next(o for o in rows if (o["bits"], o["seed"], o["ranks"]) == (r["bits"], r["seed"], 1))
        layout = "1 rank" if r["ranks"] == 1 else f"{r['ranks']} ranks, D = {r['ranks']}" + \
            (f", {r['variant']}" if r["variant"] else "")
        print(f"| w{r['bits']}g64 | {r['seed']} | {layout} | {r['wall_s']:.1f} s | {r['wall_s'] / one['wall_s']:.2f}x | "
              f"{r['ppl']['wiki']:.2f} | {r['ppl']['news']:.2f} | {r['stores_mib']:.1f} MiB |")
    for bits in a.bits:
        for ranks in (1, 2):
            mine = [r for r in rows if (r["bits"], r["ranks"], r["variant"]) == (bits, ranks, "")]
            means = {k: statistics.mean(r["ppl"][k] for r in mine) for k in ("wiki", "news")}
            print(f"w{bits}g64, {ranks} rank(s), mean over seeds {[r['seed'] for r in mine]}: wiki {means['wiki']:.2f}, "
                  f"news {means['news']:.2f}, Block-AP {statistics.mean(r['wall_s'] for r in mine):.1f} s")


if __name__ == "__main__":
    main()
