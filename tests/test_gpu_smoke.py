"""bench/gpu_smoke.py, the first command on a GPU machine, must not rot on CPU-only CI: without a GPU it
says so in one line and exits 0; its sections run at toy sizes on the CPU (--cpu-check)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import THREADS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "bench" / "gpu_smoke.py")


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    done = subprocess.run([sys.executable, SMOKE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().count("\n") == 0
    assert "no CUDA device" in done.stdout


@pytest.mark.slow
def test_its_kernel_weight_work_and_two_rank_sections_pass_at_toy_sizes_on_the_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS=THREADS)
    done = subprocess.run([sys.executable, SMOKE, "--cpu-check", "--only", "kernels,weight_work,two_ranks", "--work",
                           str(tmp_path), "--out", str(tmp_path / "smoke.md")], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    table = (tmp_path / "smoke.md").read_text()
    assert "| **kernels** | | | | PASS" in table and "| **two_ranks** | | | | PASS" in table
    assert "| **weight_work** | | | | PASS" in table and "of a batch-2 step" in table
    assert "bit-identical export" in table and "| student, sequence parallel |" in table


@pytest.mark.slow
def test_quick_pipeline_runs_the_bundled_model_once_with_its_row_printed_as_it_comes(tmp_path):
    """--quick (a short GPU loan): the pipeline section's run with kernels alone, its row printed when the
    run ends (before the section's table), so a loan that ends early still leaves the figures."""
    env = dict(os.environ, OMP_NUM_THREADS=THREADS)
    done = subprocess.run([sys.executable, SMOKE, "--cpu-check", "--quick", "--only", "pipeline", "--work",
                           str(tmp_path)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| pipeline --single-gpu |")]
    assert len(rows) == 2 and rows[0] == rows[1] and "| kernels | ppl " in rows[0]  # as it came, then the table
    assert "no-kernels" not in done.stdout
    assert done.stdout.index(rows[0]) < done.stdout.index("| **pipeline** | | | | PASS")


@pytest.mark.slow
def test_scale7b_runs_the_whole_pipeline_and_sets_each_phase_beside_the_plan(tmp_path):
    """The 7B section at toy size (4 blocks of width 64): Block-AP, E2E-QP on DeepSpeed, the export and an
    evaluation in one --single-gpu run, each phase's time and peaks printed beside the plan's."""
    env = dict(os.environ, OMP_NUM_THREADS=THREADS)
    done = subprocess.run([sys.executable, SMOKE, "--cpu-check", "--only", "scale7b", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "| **scale7b** | | | | PASS" in done.stdout
    for phase in ("block-ap", "e2e", "export", "eval"):
        line = next(x for x in done.stdout.splitlines() if x.startswith(f"| scale7b: {phase} |"))
        assert " s (plan " in line
    turn = next(x for x in done.stdout.splitlines() if x.startswith("| scale7b: a block's turn |"))
    assert "mean of 4" in turn and "training" in turn
