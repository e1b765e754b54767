"""Block-AP schedules on several ranks: quality after Block-AP and after the same E2E-QP, wall time, and
the timeline model's prediction of it (issue 12).

    python bench/schedules.py --bits 2 --work runs/schedules
    python bench/schedules.py --bits 3 --runs student:1 pipelined:2:0.5 --work runs/schedules

Each run is the real command line on SmolLM2-135M: Block-AP with `mpiexec -n N` (1 thread per rank: a
rank stands for one GPU), then E2E-QP from its export in one process with the same settings for every
schedule, both evaluated on wiki and news. The timeline model (eqat_dist/planning/timeline.py) is fed
the per-block times measured in the 1-rank run (training and the block forward over the stream) and its
prediction is put next to each measured wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eqat_dist.planning.timeline import BlockTimes, blockap_seconds  # noqa: E402

LRS = {2: ("2e-2", "2e-3"), 3: ("5e-3", "5e-4"), 4: ("1e-3", "1e-4")}  # tuned once per width (docs/benchmarks.md)
EVAL = ["--eval-datasets", "wiki,news", "--eval-seqlen", "512", "--eval-max-windows", "16", "--zeroshot-tasks", "",
        "--skip-fp-eval", "--no-tensorboard"]


def _run(cmd: list[str], ranks: int, threads: int, log: Path) -> None:
    prefix = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks)] if ranks > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
    env.pop("MASTER_PORT", None)
    with open(log, "w") as f:
        done = subprocess.run([*prefix, sys.executable, str(ROOT / "launch" / "run.py"), *cmd], env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({log}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def schedule_run(bits: int, schedule: str, ranks: int, correction: float | None, correction_lr: str | None, a,
                 work: Path) -> dict:
    name = f"w{bits}-{schedule}{'' if correction is None else correction}{correction_lr or ''}-x{ranks}"
    blockap, e2e = work / name, work / (name + "-e2e")
    qlr, wlr = LRS[bits]
    if not (blockap / "results.json").exists():
        cmd = ["--model", "smollm2-135m", "--wbits", str(bits), "--group-size", "64", "--phase", "block-ap",
               "--epochs", str(a.epochs), "--train-size", str(a.train_size), "--val-size", str(a.val_size),
               "--seqlen", str(a.seqlen), "--batch-size", "2", "--quant-lr", qlr, "--weight-lr", wlr,
               "--student-input", schedule, "--output", str(blockap), "--overwrite", "--discard-unfinished", "--recipe", "paper", *EVAL]
        if correction is not None:
            cmd += ["--correction-fraction", str(correction)]
        if correction_lr is not None:
            cmd += ["--correction-lr", correction_lr]
        _run(cmd, ranks, 1, work / (name + ".log"))
    if a.e2e and not (e2e / "results.json").exists():
        cmd = ["--model", "smollm2-135m", "--phase", "e2e", "--from", str(blockap), "--output", str(e2e),
               "--e2e-epochs", "2", "--e2e-train-size", "32", "--e2e-seqlen", "256", "--e2e-global-batch", "4",
               "--e2e-micro-batch", "1", "--e2e-lr", "2e-4", "--ds-config", "single-gpu", "--wbits", str(bits),
               "--group-size", "64", *EVAL]
        _run(cmd, 1, a.threads, work / (name + "-e2e.log"))
    r1 = json.loads((blockap / "results.json").read_text())
    r2 = json.loads((e2e / "results.json").read_text()) if a.e2e else {"quantized_e2e": {"perplexity": {}}}
    ppl = lambda res, key: {k: v["ppl"] for k, v in res[key]["perplexity"].items()}  # noqa: E731
    return {"bits": bits, "schedule": schedule, "ranks": ranks, "correction": correction, "correction_lr": correction_lr,
            "blockap_wall_s": r1["blockap_wall_s"], "blocks": r1["blocks"], "blockap_ppl": ppl(r1, "quantized"),
            "e2e_ppl": ppl(r2, "quantized_e2e")}


def block_times(row: dict) -> BlockTimes:
    """Per-block times of a run: training (loss evaluations included, the wait for the quantized stream
    inside a pipelined block's training left out) and the stream forward."""
    return BlockTimes(train=statistics.median(b["wall_s"] - b.get("switch_wait_s", 0.0) for b in row["blocks"]),
                      forward=statistics.median(b["fp_stream_s"] for b in row["blocks"][1:]),
                      transfer=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/schedules")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    p.add_argument("--runs", nargs="+", default=["student:1", "pipelined:2:0.5", "teacher:2", "pipelined:2:0.25"],
                   help="schedule:ranks[:correction fraction[:restart|continue]]; the first must be a 1-rank run (the reference)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-size", type=int, default=128)
    p.add_argument("--val-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="threads of the E2E-QP process")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="Block-AP only (timing runs)")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for bits in a.bits:
        for spec in a.runs:
            schedule, ranks, *rest = spec.split(":")
            rows.append(schedule_run(bits, schedule, int(ranks), float(rest[0]) if rest else None,
                                     rest[1] if len(rest) > 1 else None, a, work))
            r = rows[-1]
            print(f"w{bits} {spec}: Block-AP {r['blockap_wall_s']:.0f} s, ppl {r['blockap_ppl']}, after E2E-QP "
                  f"{r['e2e_ppl']}", flush=True)
    (work / "schedules.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "blocks"} for r in rows],
                                                    indent=1))
    print(f"\nBlock-AP: {a.train_size} x {a.seqlen} tokens (+{a.val_size} val), {a.epochs} epochs, batch 2, 1 thread per "
          "rank; E2E-QP: 32 x 256 tokens, 2 epochs, global batch 4, lr 2e-4, one process\n")
    print("| setting | schedule | ranks | Block-AP wall s | timeline model s: 1-rank block times / this run's | "
          "wiki / news ppl after Block-AP | after + E2E-QP | vs student x1 after E2E-QP |")
    print("|---|---|---|---|---|---|---|---|")
    for bits in a.bits:
        mine = [r for r in rows if r["bits"] == bits]
        ref = mine[0]
        times = block_times(ref)
        for r in mine:
            predicted = blockap_seconds(30, r["ranks"], r["schedule"], times, r["correction"] or 0.5)
            own = blockap_seconds(30, r["ranks"], r["schedule"], block_times(r), r["correction"] or 0.5)
            label = r["schedule"] + (f" {r['correction']:g}" if r["correction"] is not None else "") + (
                f" ({r['correction_lr']} lr)" if r["correction_lr"] else "")
            delta = 100 * (r["e2e_ppl"]["wiki"] / ref["e2e_ppl"]["wiki"] - 1) if a.e2e else float("nan")
            print(f"| w{bits}g64 | {label} | {r['ranks']} | {r['blockap_wall_s']:.0f} "
                  f"({r['blockap_wall_s'] / ref['blockap_wall_s']:.2f}x) | {predicted:.0f} / {own:.0f} | "
                  f"{r['blockap_ppl']['wiki']:.1f} / {r['blockap_ppl']['news']:.1f} | "
                  f"{r['e2e_ppl'].get('wiki', float('nan')):.1f} / {r['e2e_ppl'].get('news', float('nan')):.1f} | "
                  f"{delta:+.1f}% |")
        print(f"\ntimeline model, w{bits}g64 block times from the 1-rank run (train {times.train:.1f} s, forward "
              f"{times.forward:.2f} s per block): predicted speed-up over student x1")
        for blocks, label in ((32, "32 blocks (Llama-2-7B)"), (80, "80 blocks (Llama-2-70B)")):
            base = blockap_seconds(blocks, 1, "student", times)
            cells = []
            for schedule, c in (("teacher", None), ("pipelined", 0.5), ("pipelined", 0.25), ("pipelined", 0.125)):
                cells.append(f"{schedule}{'' if c is None else f' {c:g}'}: " + ", ".join(
                    f"N={n} {base / blockap_seconds(blocks, n, schedule, times, c or 0.5):.2f}x" for n in (2, 4, 8)))
            print(f"- {label}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
