"""Entry point: `python launch/run.py ...`, `deepspeed launch/run.py ...` (same flags as `eqat-dist`)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from eqat_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
