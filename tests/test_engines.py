"""The engines run our models as we do (issue 41): llama.cpp's `llama-perplexity` on our GGUF against our
own evaluation of the GPTQ v2 export, on llama.cpp's token ids, its windows and its scored half
(bench/llama_cpp.py), within 2%: the bundled model on llama.cpp's Q4_0 and Q2_0 grids (trained into them:
`--grid`) and the asymmetric 4-bit export as Q4_1. Runs where llama.cpp's tools are built
(`python bench/llama_cpp_engine.py build`, which .ci/run does; EQAT_LLAMA_CPP names another build)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import THREADS

ROOT = Path(__file__).resolve().parents[1]


def _engine_module():
    """bench/llama_cpp_engine.py, imported from its path (bench/ is not a package on sys.path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("llama_cpp_engine", ROOT / "bench" / "llama_cpp_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llama_cpp = _engine_module()

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not llama_cpp.built(), reason="llama.cpp's tools are not built "
                                                               "(python bench/llama_cpp_engine.py build)")]
QUIET = ["--eval-datasets", "wiki", "--eval-seqlen", "256", "--eval-max-windows", "2", "--zeroshot-tasks", "",
         "--skip-fp-eval", "--no-tensorboard", "--e2e-epochs", "0", "--export-format", "gguf"]


def _run(out: Path, *flags: str) -> Path:
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--model", "smollm2-135m",
                           "--output", str(out), *QUIET, *flags], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("name,flags", [
    ("q4_0", ["--wbits", "4", "--group-size", "32", "--grid", "q4_0", "--epochs", "0", "--init", "clip"]),
    ("q4_1", ["--wbits", "4", "--group-size", "64", "--epochs", "0"]),
    ("q2_0", ["--wbits", "2", "--group-size", "64", "--grid", "q2_0", "--epochs", "1", "--train-size", "4",
              "--val-size", "1", "--seqlen", "128", "--quant-lr", "2e-2", "--weight-lr", "2e-3"]),
])
def test_llama_cpp_runs_our_gguf_with_our_perplexity_on_the_same_tokens(tmp_path, name, flags):
    run = _run(tmp_path / name, *flags)
    r = llama_cpp.check(run, "wiki", ctx=256, chunks=2)  # 2 x 256 tokens: the same tokens on both sides
    assert r["gguf"] == f"model-{name.upper()}.gguf"
    assert abs(r["relative"]) <= 0.02, r
