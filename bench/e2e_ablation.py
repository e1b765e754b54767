"""The paper's ablation on SmolLM2-135M: wiki perplexity of fp, round-to-nearest, Block-AP only,
E2E-QP only (from RTN) and Block-AP + E2E-QP, at each bit width.

    OMP_NUM_THREADS=2 DS_ACCELERATOR=cpu python bench/e2e_ablation.py --bits 2 3 --work runs/ablation

Runs the real command line phase by phase (`--phase block-ap`, then `--phase e2e --from DIR`), keeps
every output folder under --work (a finished one is reused, so a killed benchmark resumes), and prints
a Markdown table; the figures also go to --work/ablation.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Block-AP learning rates fitted to the small budget (docs/benchmarks.md): the paper's 1e-4 / 1e-5
# assume 128x more steps.
BLOCKAP_LR = {2: (2e-2, 2e-3), 3: (5e-3, 5e-4), 4: (1e-3, 1e-4)}


def _run(args: list[str], out: Path, threads: int) -> dict:
    """One phase into `out`, unless a previous benchmark run finished it."""
    if (out / "results.json").exists() and any(out.glob("model*.safetensors")):
        return json.loads((out / "results.json").read_text())
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(random.randint(20000, 40000)))
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "--model", "smollm2-135m", "--output", str(out),
           "--eval-datasets", "wiki", "--eval-seqlen", "512", "--zeroshot-tasks", "", "--no-tensorboard", "--recipe", "paper",
           *args]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")
    print(f"  {out.name}: {time.time() - t0:.0f} s", flush=True)
    return json.loads((out / "results.json").read_text())


def _ppl(results: dict, key: str, windows: int) -> float:
    entry = results[key]["perplexity"]["wiki"]
    assert entry["windows"] == windows, entry
    return entry["ppl"]


def ablation(bits: int, a) -> dict:
    work = Path(a.work)
    shape = ["--wbits", str(bits), "--group-size", str(a.group_size), "--eval-max-windows", str(a.eval_windows)]
    quant_lr, weight_lr = BLOCKAP_LR[bits]
    blockap = ["--phase", "block-ap", "--epochs", str(a.epochs), "--train-size", str(a.train_size), "--val-size", "4",
               "--seqlen", str(a.seqlen), "--quant-lr", str(quant_lr), "--weight-lr", str(weight_lr)]
    e2e = ["--phase", "e2e", "--e2e-train-size", str(a.e2e_train_size), "--e2e-seqlen", str(a.seqlen),
           "--e2e-global-batch", str(a.e2e_global_batch), "--e2e-micro-batch", str(a.e2e_micro_batch),
           "--e2e-epochs", str(a.e2e_epochs), "--e2e-save-every", "1000", "--ds-config", a.ds_config]
    tag = f"w{bits}g{a.group_size}"
    rtn_dir, bap_dir = work / f"{tag}_rtn", work / f"{tag}_blockap"
    rtn = _run(["--phase", "block-ap", "--epochs", "0", *shape], rtn_dir, a.threads)
    bap = _run([*blockap, *shape, "--skip-fp-eval"], bap_dir, a.threads)
    e2e_rtn = _run([*e2e, "--from", str(rtn_dir), "--e2e-lr", str(a.e2e_lr_rtn), *shape, "--skip-fp-eval"],
                   work / f"{tag}_rtn_e2e", a.threads)
    e2e_bap = _run([*e2e, "--from", str(bap_dir), "--e2e-lr", str(a.e2e_lr_blockap), *shape, "--skip-fp-eval"],
                   work / f"{tag}_blockap_e2e", a.threads)
    w = a.eval_windows
    return {"setting": tag, "fp": _ppl(rtn, "fp", w), "rtn": _ppl(rtn, "quantized", w),
            "blockap": _ppl(bap, "quantized", w), "e2e_only": _ppl(e2e_rtn, "quantized_e2e", w),
            "blockap_e2e": _ppl(e2e_bap, "quantized_e2e", w),
            "e2e_loss_rtn": [e2e_rtn["e2e"]["losses"][0], e2e_rtn["e2e"]["losses"][-1]],
            "e2e_loss_blockap": [e2e_bap["e2e"]["losses"][0], e2e_bap["e2e"]["losses"][-1]],
            "e2e_step_s": e2e_bap["e2e"].get("step_seconds_median"), "blockap_wall_s": bap.get("blockap_wall_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3], choices=sorted(BLOCKAP_LR))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--work", default="runs/ablation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="Block-AP epochs")
    p.add_argument("--train-size", type=int, default=32, help="Block-AP calibration windows")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--e2e-train-size", type=int, default=32)
    p.add_argument("--e2e-epochs", type=int, default=2)
    p.add_argument("--e2e-global-batch", type=int, default=4)
    p.add_argument("--e2e-micro-batch", type=int, default=2)
    p.add_argument("--e2e-lr-rtn", type=float, default=2e-3, help="E2E-QP lr from round-to-nearest")
    p.add_argument("--e2e-lr-blockap", type=float, default=2e-4, help="E2E-QP lr after Block-AP")
    p.add_argument("--ds-config", default="single-gpu")
    p.add_argument("--eval-windows", type=int, default=16)
    a = p.parse_args()
    rows = []
    for bits in a.bits:
        print(f"w{bits}g{a.group_size}:", flush=True)
        rows.append(ablation(bits, a))
    Path(a.work, "ablation.json").write_text(json.dumps({"settings": vars(a), "rows": rows}, indent=1))
    print(f"\nwiki perplexity, {a.eval_windows} x 512 tokens\n")
    print("| setting | fp | RTN | Block-AP | E2E-QP (from RTN) | Block-AP + E2E-QP |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['fp']:.2f} | {r['rtn']:,.2f} | {r['blockap']:,.2f} | {r['e2e_only']:,.2f} | "
              f"{r['blockap_e2e']:,.2f} |")


if __name__ == "__main__":
    main()
