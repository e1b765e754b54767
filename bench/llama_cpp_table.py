"""EfficientQAT in llama.cpp's own 2- and 4-bit types against llama.cpp's quantizations of the same model
(issue 41), all scored by `llama-perplexity` on wiki and news (the bundled evaluation texts):

- ours: Block-AP then E2E-QP on the bundled SmolLM2-135M trained into `--grid q2_0` / `--grid q4_0` (the
  GGUF holds the trained model as it is), and the asymmetric w2g64 (no GGUF type holds it: scored by our
  own evaluation with llama-perplexity's protocol on llama.cpp's token ids);
- llama.cpp's: Q2_0 (with and without an importance matrix), Q2_K, IQ2_XS and IQ2_XXS with an importance
  matrix from `llama-imatrix` on our calibration text (boolq), Q4_0 and Q4_K_M, from an F16 GGUF written by
  llama.cpp's converter; F16 itself.

    python bench/llama_cpp_engine.py build            # once
    python bench/llama_cpp_table.py --seeds 0 1 2 --engine-seeds 0 --work runs/llama_cpp_table [--ctx 512 --chunks 16]

Runs one after the other; a finished run or file is reused. Training budget: the README demo's
(Block-AP 32 x 256 tokens x 2 epochs, E2E-QP 16 x 256, global batch 4).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import llama_cpp_engine as engine  # noqa: E402  (bench/llama_cpp_engine.py: the tools and the check)

LRS = {2: ("2e-2", "2e-3", "2e-4"), 4: ("1e-3", "1e-4", "2e-5")}  # quant, weight, E2E-QP
OURS = {"EfficientQAT Q2_0": (2, 64, "q2_0"), "EfficientQAT w2g64 (asymmetric)": (2, 64, "asym"),
        "EfficientQAT Q4_0": (4, 32, "q4_0")}
# (label, llama-quantize type, with an importance matrix, file stem)
THEIRS = [("llama.cpp Q2_0 + imatrix", "Q2_0", True, "Q2_0-imatrix"), ("llama.cpp Q2_0", "Q2_0", False, "Q2_0"),
          ("llama.cpp Q2_K + imatrix", "Q2_K", True, "Q2_K"), ("llama.cpp IQ2_XS + imatrix", "IQ2_XS", True, "IQ2_XS"),
          ("llama.cpp IQ2_XXS + imatrix", "IQ2_XXS", True, "IQ2_XXS"), ("llama.cpp Q4_0", "Q4_0", False, "Q4_0"),
          ("llama.cpp Q4_K_M", "Q4_K_M", False, "Q4_K_M"), ("F16", None, False, "f16")]


def train(name: str, bits: int, group: int, grid: str, seed: int, work: Path) -> Path:
    out = work / f"{name.split()[1].replace('(', '')}-s{seed}"
    if (out / "results.json").exists() and "quantized_e2e" in json.loads((out / "results.json").read_text()):
        return out
    qlr, wlr, elr = LRS[bits]
    flags = ["--model", "smollm2-135m", "--wbits", str(bits), "--group-size", str(group), "--grid", grid,
             "--epochs", "2", "--train-size", "32", "--val-size", "4", "--seqlen", "256", "--quant-lr", qlr,
             "--weight-lr", wlr, "--e2e-train-size", "16", "--e2e-seqlen", "256", "--e2e-global-batch", "4",
             "--e2e-micro-batch", "2", "--e2e-lr", elr, "--eval-datasets", "wiki", "--eval-seqlen", "512",
             "--eval-max-windows", "4", "--zeroshot-tasks", "", "--skip-fp-eval", "--seed", str(seed),
             "--output", str(out), "--overwrite", "--discard-unfinished"]
    if grid != "asym":
        flags += ["--export-format", "gguf"]
    env = dict(os.environ, OMP_NUM_THREADS="2", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    with open(work / f"{out.name}.log", "w") as log:
        subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *flags], check=True, stdout=log,
                       stderr=subprocess.STDOUT, env=env)
    return out


def block_linears(gguf: Path) -> tuple[float, str]:
    """Bits per weight of the file's block linears (embeddings and norms left out), and their types:
    llama.cpp falls back to another type where a row is not a whole number of its blocks (k- and i-quants
    need rows of 256: SmolLM2's 576 columns are not)."""
    sizes = engine.tensor_bytes(gguf)
    linear = {k: v for k, v in sizes.items() if k.startswith("blk.") and k.endswith(".weight")
              and not k.endswith("norm.weight")}
    types: dict[str, int] = {}
    for _, n, kind in linear.values():
        types[kind] = types.get(kind, 0) + n
    total = sum(n for _, n, _ in linear.values())
    mix = ", ".join(f"{k} {100 * n / total:.0f}%" for k, n in sorted(types.items(), key=lambda x: -x[1]))
    return 8 * sum(b for b, _, _ in linear.values()) / total, mix


def cached(work: Path, key: str, compute):
    """A perplexity computed once per file, text and protocol (`work/perplexities.json`): llama.cpp's Q2_0
    has no vectorised CPU dot product yet and takes minutes per text."""
    path = work / "perplexities.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    if key not in done:
        done[key] = compute()
        path.write_text(json.dumps(done, indent=1))
    return done[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--work", type=Path, default=Path("runs/llama_cpp_table"))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--engine-seeds", type=int, nargs="*", default=None,
                   help="seeds whose GGUFs llama-perplexity scores (default: all); the others get our evaluation "
                        "on llama.cpp's token ids with its protocol (the check shows the two agree within 0.3%%; "
                        "llama.cpp's Q2_0 takes minutes a text on a CPU)")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    from eqat_dist.models.loading import bundled_model_dir
    f16 = a.work / "smollm2-135m-f16.gguf"
    if not f16.exists():
        engine.float_gguf(bundled_model_dir(), f16)
    rows = []
    texts = ("wiki", "news")
    for name, quant, imatrix, stem in THEIRS:
        gguf = a.work / f"smollm2-135m-{stem}.gguf"
        if not gguf.exists():
            engine.quantize(f16, quant, gguf, "boolq" if imatrix else None)
        ppl = {t: cached(a.work, f"{gguf.name} {t} {a.ctx}x{a.chunks}",
                         lambda t=t: engine.file_perplexity(gguf, t, a.ctx, a.chunks)) for t in texts}
        rows.append((name, gguf, ppl, None))
    for name, (bits, group, grid) in OURS.items():
        for seed in a.seeds:
            run = train(name, bits, group, grid, seed, a.work)
            if grid == "asym":  # no GGUF type: our evaluation, llama.cpp's tokens and protocol
                ppl = {t: cached(a.work, f"{run.name} ours {t} {a.ctx}x{a.chunks}",
                                 lambda t=t: engine.check(run, t, a.ctx, a.chunks, tokens_from=f16)["ours"]) for t in texts}
                rows.append((f"{name}, seed {seed}", None, ppl, run))
            elif a.engine_seeds is not None and seed not in a.engine_seeds:
                ppl = {t: cached(a.work, f"{run.name} ours {t} {a.ctx}x{a.chunks}",
                                 lambda t=t: engine.check(run, t, a.ctx, a.chunks, engine=False)["ours"]) for t in texts}
                rows.append((f"{name}, seed {seed} (our evaluation)", run / "export-gguf" / engine.check_name(run), ppl, run))
            else:
                checks = {t: cached(a.work, f"{run.name} check {t} {a.ctx}x{a.chunks}",
                                    lambda t=t: engine.check(run, t, a.ctx, a.chunks)) for t in texts}
                gguf = run / "export-gguf" / checks["wiki"]["gguf"]
                rows.append((f"{name}, seed {seed}", gguf, {t: c["llama_cpp"] for t, c in checks.items()}, run,
                             {t: c["relative"] for t, c in checks.items()}))
    for name in OURS:  # the mean over seeds, beside each seed
        mine = [r for r in rows if r[0].startswith(f"{name}, seed")]
        if len(mine) > 1:
            rows.append((f"{name}, mean of {len(mine)} seeds", mine[0][1],
                         {t: sum(r[2][t] for r in mine) / len(mine) for t in texts}, None))
    print(f"SmolLM2-135M, llama-perplexity, {a.chunks} x {a.ctx} tokens (second halves scored)\n")
    print("| model | file | bits per weight (block linears) | their types | wiki ppl | news ppl | llama.cpp vs ours, same tokens |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        name, gguf, ppl = row[:3]
        size = f"{gguf.stat().st_size / 2**20:.1f} MiB" if gguf else "(no GGUF type)"
        bpw, mix = block_linears(gguf) if gguf else (2.281, "uint2 + zero points (GPTQ v2)")
        agree = " / ".join(f"{100 * v:+.2f}%" for v in row[4].values()) if len(row) > 4 else ""
        print(f"| {name} | {size} | {bpw:.3f} | {mix} | {ppl['wiki']:.2f} | {ppl['news']:.2f} | {agree} |")


if __name__ == "__main__":
    main()
