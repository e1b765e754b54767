"""Step time and peak memory per rank of E2E-QP under each DeepSpeed config, on 1 and 2 ranks.

    OMP_NUM_THREADS=2 DS_ACCELERATOR=cpu python bench/e2e_costs.py --from runs/ablation/w2g64_rtn

`--from` is any packed export (an RTN or Block-AP output folder). Each run is the real command line
(`deepspeed --num_gpus N launch/run.py --phase e2e ...`); figures come from its results.json: the
median optimizer-step time and each rank's peak host RSS (and peak GPU memory on a GPU). The cores
are split between ranks (`--threads` in all), so 1 and 2 ranks use the same hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("single-gpu", "zero3", "zero3-offload")


def run(config: str, ranks: int, a, out: Path) -> dict:
    port = str(random.randint(20000, 40000))
    cmd = [str(ROOT / "launch" / "run.py"), "--model", "smollm2-135m", "--wbits", str(a.wbits), "--group-size",
           str(a.group_size), "--phase", "e2e", "--from", a.source, "--output", str(out), "--e2e-train-size",
           str(a.steps * a.global_batch), "--e2e-seqlen", str(a.seqlen), "--e2e-global-batch", str(a.global_batch),
           "--e2e-micro-batch", str(a.micro_batch), "--e2e-lr", "1e-4", "--e2e-save-every", "1000", "--ds-config",
           config, "--eval-datasets", "", "--zeroshot-tasks", "", "--skip-fp-eval", "--no-tensorboard"]
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_addr",
                "127.0.0.1", "--master_port", port] if ranks > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, a.threads // ranks)), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    done = subprocess.run([*launcher, *cmd], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{config} on {ranks} rank(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    e2e = json.loads((out / "results.json").read_text())["e2e"]
    return {"config": config, "ranks": ranks, "step_s": e2e["step_seconds_median"],
            "tokens_per_s": e2e["tokens_per_s"], "peak_mib": e2e["peak_memory_mib_per_rank"],
            "int_elements_local": e2e["partition"]["int_elements_local"],
            "int_elements_full": e2e["partition"]["int_elements_full"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, help="packed export to start E2E-QP from")
    p.add_argument("--wbits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all, split between ranks")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in a.configs:
            for ranks in a.ranks:
                rows.append(run(config, ranks, a, Path(tmp) / f"{config}-{ranks}"))
                r = rows[-1]
                print(f"{config} x{ranks}: {r['step_s']:.2f} s/step", flush=True)
    print(json.dumps(rows, indent=1))
    print(f"\n{a.steps} steps of {a.global_batch} x {a.seqlen} tokens (micro batch {a.micro_batch}), "
          f"{a.threads} threads in all\n")
    print("| DeepSpeed config | ranks | median step s | tokens/s | peak host RSS per rank, MiB | "
          "integer elements held by rank 0 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        peaks = " / ".join(f"{m['host_rss']:.0f}" + (f" (GPU {m['device']:.0f})" if "device" in m else "")
                           for m in r["peak_mib"])
        share = r["int_elements_local"] / r["int_elements_full"]
        print(f"| {r['config']} | {r['ranks']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {peaks} | {share:.0%} |")


if __name__ == "__main__":
    main()
