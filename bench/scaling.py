"""Per-rank peak memory of Block-AP and E2E-QP on 1 and 2 ranks, measured, next to the planner's figure.

    OMP_NUM_THREADS=2 DS_ACCELERATOR=cpu python bench/scaling.py --work runs/scaling

Models: the bundled SmolLM2-135M and synthetic Llama-architecture models made from a config with
random weights (right for memory and speed, never for quality): synth-0.4b (width 2048, 8 blocks) and
synth-1b (width 2048, 20 blocks). Each run is the real command line (`mpiexec -n N` for Block-AP,
`deepspeed --num_gpus N` for E2E-QP on ZeRO-3); the measured figure is each rank's peak host RSS from
results.json (on a CPU all memory is host memory), the predicted one is `eqat-dist plan` for the same
flags with --gpu-memory 0. The cores are split between ranks, so 1 and 2 ranks use the same hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = {"synth-0.4b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8),
             "synth-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20)}
BLOCKAP = ["--wbits", "2", "--group-size", "64", "--epochs", "1", "--train-size", "32", "--val-size", "4",
           "--seqlen", "128", "--batch-size", "4", "--recipe", "paper"]
E2E = ["--wbits", "2", "--group-size", "64", "--e2e-train-size", "4", "--e2e-seqlen", "128", "--e2e-global-batch",
       "2", "--e2e-micro-batch", "1", "--e2e-lr", "1e-4", "--e2e-save-every", "1000", "--ds-config", "zero3"]
QUIET = ["--eval-datasets", "", "--zeroshot-tasks", "", "--skip-fp-eval", "--no-tensorboard"]


def synthetic_model(name: str, work: Path) -> str:
    """A Llama of the given shape with random weights and the bundled tokenizer, saved once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from eqat_dist.models.loading import bundled_model_dir

    folder = work / name
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True,
                             max_position_embeddings=2048, **SYNTHETIC[name])
        LlamaForCausalLM(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(bundled_model_dir())).save_pretrained(folder)
    return str(folder)


def _launch(cmd: list[str], ranks: int, threads: int, launcher: str) -> None:
    port = str(random.randint(20000, 40000))
    bin_dir = Path(sys.executable).parent
    if ranks == 1:
        prefix = [sys.executable]
    elif launcher == "mpi":
        prefix = [str(bin_dir / "mpiexec"), "-n", str(ranks), sys.executable]
    else:
        prefix = [str(bin_dir / "deepspeed"), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", port]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // ranks)), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    done = subprocess.run([*prefix, str(ROOT / "launch" / "run.py"), *cmd], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def predicted_mib(model: str, flags: list[str], ranks: int, phase: str) -> float:
    from eqat_dist.cli import build_plan_parser
    from eqat_dist.config.from_flags import settings_from_flags
    from eqat_dist.settle import for_plan
    from eqat_dist.planning import load_arch, plan, settings_for

    args = build_plan_parser().parse_args(["--model", model, *flags, "--gpu-memory", "0"])
    cfg = for_plan(settings_from_flags(args), ranks, ranks)
    return plan(load_arch(model), settings_for(cfg, ranks, ranks, "cpu", "cpu"))[phase].host_peak / 2**20


def block_ap(model: str, ranks: int, work: Path, threads: int) -> dict:
    out = work / f"{Path(model).name}-blockap-{ranks}"
    # two stores per split on 1 and on 2 ranks (student / teacher mode): what is compared is how memory
    # scales with ranks; pipelined mode holds three (fp in, fp out, quantized) on any number of ranks
    flags = BLOCKAP + (["--student-input", "teacher"] if ranks > 1 else [])
    if not (out / "results.json").exists():
        _launch(["--model", model, *flags, "--phase", "block-ap", "--output", str(out), "--overwrite", "--discard-unfinished", *QUIET],
                ranks, threads, "mpi")
    blocks = json.loads((out / "results.json").read_text())["blocks"]
    peaks = [max(b["peak_mem_mib"] for b in blocks if b["rank"] == r) for r in range(ranks)]
    return {"phase": "block-ap", "ranks": ranks, "measured_mib": peaks,
            "predicted_mib": predicted_mib(model, flags, ranks, "block-ap"), "export": out}


def e2e(model: str, ranks: int, work: Path, threads: int, source: Path) -> dict:
    out = work / f"{Path(model).name}-e2e-{ranks}"
    if not (out / "results.json").exists():
        _launch(["--model", model, *E2E, "--phase", "e2e", "--from", str(source), "--output", str(out), *QUIET],
                ranks, threads, "deepspeed")
    peaks = [m["host_rss"] for m in json.loads((out / "results.json").read_text())["e2e"]["peak_memory_mib_per_rank"]]
    return {"phase": "e2e", "ranks": ranks, "measured_mib": peaks,
            "predicted_mib": predicted_mib(model, E2E + ["--phase", "e2e"], ranks, "e2e")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/scaling")
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "synth-0.4b", "synth-1b"])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--phases", nargs="+", default=["block-ap", "e2e"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all, split between ranks")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.models:
        model = synthetic_model(name, work) if name in SYNTHETIC else name
        source = None
        for ranks in a.ranks:
            if "block-ap" in a.phases or source is None:
                row = block_ap(model, ranks, work, a.threads)
                source = source or row.pop("export")
                row.pop("export", None)
                if "block-ap" in a.phases:
                    rows.append({"model": name, **row})
            if "e2e" in a.phases:
                rows.append({"model": name, **e2e(model, ranks, work, a.threads, source)})
            r = rows[-1]
            print(f"{name} {r['phase']} x{ranks}: measured {r['measured_mib']}, predicted {r['predicted_mib']:.0f} MiB",
                  flush=True)
    (work / "scaling.json").write_text(json.dumps(rows, indent=1))
    print(f"\nBlock-AP: {' '.join(BLOCKAP)}; E2E-QP: {' '.join(E2E)}; {a.threads} threads in all\n")
    print("| model | phase | ranks | measured peak per rank, MiB | predicted, MiB | error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        worst = max(r["measured_mib"])
        print(f"| {r['model']} | {r['phase']} | {r['ranks']} | {' / '.join(f'{m:.0f}' for m in r['measured_mib'])} | "
              f"{r['predicted_mib']:.0f} | {100 * (r['predicted_mib'] / worst - 1):+.0f}% |")


if __name__ == "__main__":
    main()
