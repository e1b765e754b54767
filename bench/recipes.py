"""Block-AP + E2E-QP recipes side by side on the bundled model (issue 24): perplexity after each phase,
wall time of each phase, over seeds.

    python bench/recipes.py --bits 2 --seeds 0 1 2 --recipes paper "huber:--loss huber" --work runs/recipes
    python bench/recipes.py --bits 2 --seeds 0 --recipes paper "kd:--e2e-loss kd" --parallel 2

A recipe is NAME or NAME:FLAGS (FLAGS added to the command line; `paper` alone is `--recipe paper`). Each
run is the real command line on SmolLM2-135M at the issue-12 budget: Block-AP on 128 + 16 windows x 256
tokens, 2 epochs, batch 2, the learning rates of bench/schedules.py, then E2E-QP on 32 windows x 256 for 2
epochs (global batch 4, lr 2e-4, DeepSpeed's single-GPU config) in the same run; wiki and news perplexity
on 8 x 512 held-out tokens after each. `--parallel 2` runs two at a time, one thread each (wall times are
then only comparable between runs made the same way). A finished run is reused; an interrupted one is resumed
(its Block-AP wall time then covers only the blocks trained after the resume: say so where you quote it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LRS = {2: ("2e-2", "2e-3"), 3: ("5e-3", "5e-4"), 4: ("1e-3", "1e-4")}  # as bench/schedules.py
PHASES = (("quantized", "after Block-AP"), ("quantized_e2e", "after E2E-QP"))


def command(bits: int, seed: int, flags: list[str], out: Path, a, resume: bool = False) -> list[str]:
    qlr, wlr = LRS[bits]
    return ["--model", "smollm2-135m", "--wbits", str(bits), "--group-size", "64", "--train-size", str(a.train_size),
            "--val-size", "16", "--seqlen", "256", "--epochs", "2", "--batch-size", "2", "--quant-lr", qlr,
            "--weight-lr", wlr, "--seed", str(seed), "--e2e-epochs", "2", "--e2e-train-size", "32", "--e2e-seqlen",
            "256", "--e2e-global-batch", "4", "--e2e-micro-batch", "1", "--e2e-lr", "2e-4", "--ds-config",
            "single-gpu", "--eval-datasets", "wiki,news", "--eval-seqlen", "512", "--eval-max-windows", "8",
            "--zeroshot-tasks", a.zeroshot, "--zeroshot-limit", str(a.zeroshot_limit), "--skip-fp-eval",
            "--no-tensorboard", "--output", str(out), *(() if resume else ("--overwrite", "--discard-unfinished")), *flags]


def run_one(bits: int, seed: int, name: str, flags: list[str], a, threads: int) -> dict:
    out = a.work / f"w{bits}-{name}-s{seed}"
    if not (out / "results.json").exists() or "quantized_e2e" not in json.loads((out / "results.json").read_text()):
        resume = (out / "blockap").is_dir()  # killed part-way: carry on from its finished blocks
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
                   MASTER_ADDR="127.0.0.1")
        env.pop("MASTER_PORT", None)
        with open(out.with_suffix(".log"), "a" if resume else "w") as f:
            done = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"),
                                   *command(bits, seed, flags, out, a, resume)], env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"failed: {out.with_suffix('.log')}")
    r = json.loads((out / "results.json").read_text())
    row = {"bits": bits, "recipe": name, "seed": seed, "blockap_s": r["blockap_wall_s"],
           "e2e_s": r["e2e"]["seconds"]}
    for key, _ in PHASES:
        row[key] = {d: r[key]["perplexity"][d]["ppl"] for d in ("wiki", "news")}
        if r[key].get("zero_shot"):
            row[key]["zero_shot"] = r[key]["zero_shot"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--recipes", nargs="+", default=["paper"], help="NAME or NAME:FLAGS")
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--zeroshot", default="", help="zero-shot tasks after each phase ('' for none)")
    p.add_argument("--zeroshot-limit", type=int, default=200)
    p.add_argument("--parallel", type=int, default=1, choices=[1, 2])
    p.add_argument("--threads", type=int, help="threads per run (default 2 / --parallel; 1 when another "
                   "benchmark shares the 2 cores)")
    p.add_argument("--work", type=Path, default=Path("runs/recipes"))
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    recipes = {}
    for spec in a.recipes:
        name, _, flags = spec.partition(":")
        recipes[name] = flags.split() if flags else ["--recipe", name]
    jobs = [(b, s, n, f) for b in a.bits for n, f in recipes.items() for s in a.seeds]
    with ThreadPoolExecutor(a.parallel) as pool:
        rows = list(pool.map(lambda j: run_one(*j, a, a.threads or 2 // a.parallel), jobs))
    print("| width | recipe | seeds | after Block-AP (wiki / news) | after E2E-QP (wiki / news) | Block-AP s | E2E-QP s |")
    print("|---|---|---|---|---|---|---|")
    for b in a.bits:
        for name in recipes:
            mine = [r for r in rows if r["bits"] == b and r["recipe"] == name]
            cells = []
            for key, _ in PHASES:
                means = [statistics.mean(r[key][d] for r in mine) for d in ("wiki", "news")]
                spread = [max(r[key][d] for r in mine) - min(r[key][d] for r in mine) for d in ("wiki", "news")]
                cells.append(f"{means[0]:.2f} / {means[1]:.2f} (spread {spread[0]:.1f} / {spread[1]:.1f})")
            print(f"| w{b}g64 | {name} | {','.join(str(r['seed']) for r in mine)} | {cells[0]} | {cells[1]} | "
                  f"{statistics.mean(r['blockap_s'] for r in mine):.0f} | {statistics.mean(r['e2e_s'] for r in mine):.0f} |")
    (a.work / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
