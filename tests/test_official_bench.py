"""bench/official_blockap.py, ours against the official EfficientQAT Block-AP on the same windows: its
harness (the official layer call on transformers 5, the official log read for training time, the table)
checked on CPU against a stand-in with the official interface (tests/helpers/official_standin: CI cannot
fetch the official code)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import THREADS

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "helpers" / "official_standin"


def test_a_folder_that_is_not_the_official_checkout_is_refused_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "official_blockap.py"), "--official", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a checkout of OpenGVLab/EfficientQAT" in done.stderr


@pytest.mark.slow
def test_both_run_on_the_same_windows_and_the_table_reads_each_ones_training_time(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "official_blockap.py"), "--official", str(STANDIN),
                           "--train-size", "4", "--val-size", "2", "--seqlen", "32", "--epochs", "1", "--batch-size",
                           "2", "--work", str(tmp_path)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for who in ("official", "ours"):
        assert report[who]["blocks"] == 30 and report[who]["training_s"] > 0  # SmolLM2-135M's 30 blocks
        assert 0 < report[who]["training_s"] < report[who]["wall_s"]
    assert "| official (quantize/block_ap.py) |" in done.stdout and "ours / official throughput:" in done.stdout
