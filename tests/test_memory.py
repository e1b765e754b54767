"""The peak-memory figure results.json reports: this process's own, never its parent's."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
from eqat_dist.utils.memory import host_peak_rss_mib
before = host_peak_rss_mib()
block = bytearray(300 * 2**20)
block[::4096] = b"x" * len(block[::4096])  # touch every page: resident
print(before, host_peak_rss_mib())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and exec's ru_maxrss rule are Linux's")
def test_a_child_of_a_big_parent_reports_its_own_peak():
    """ru_maxrss survives exec (a process started by a 1 GiB parent reported >= 1 GiB: the scaling benchmark
    and launchers inflated every figure); the reported peak must be the child's and must see its growth."""
    ballast = bytearray(1024 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert before < 900, f"child reports {before:.0f} MiB: its parent's 1 GiB peak leaked into it"
    assert after - before > 280
    del ballast
