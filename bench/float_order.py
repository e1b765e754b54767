"""How far a rounding-sized difference carries in a 2-bit block's training (issue 40): block 0 of
SmolLM2-135M at the settings of bench/sequence_parallel.py (w2g64, the 2-bit default recipe, 64 windows x
256 tokens, batch 4, lr 2e-2 / 2e-3, 2 epochs), trained twice on one rank, the second time with its
input multiplied by (1 + EPS); prints each step's relative difference of the training loss. A layout
that sums the same numbers in another order (data or sequence parallel) is such a difference.

    OMP_NUM_THREADS=2 python bench/float_order.py [--eps 1e-7]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def losses(eps: float) -> list[float]:
    from transformers import AutoTokenizer

    from eqat_dist.blockap.steps import advance, make_student
    from eqat_dist.blockap.stores import ActivationStore
    from eqat_dist.blockap.trainer import BlockAPSettings, train_block
    from eqat_dist.data.windows import calibration_windows
    from eqat_dist.models.lazy import LazyModel
    from eqat_dist.quant import QuantConfig

    source = LazyModel("smollm2-135m")
    train, val = calibration_windows(AutoTokenizer.from_pretrained(source.folder), "boolq", 256, 64, 16, 0)
    call = source.calls(train[:1])[0]
    store = lambda n: ActivationStore(n, 256, source.config.hidden_size, torch.float32, "cpu", torch.device("cpu"))  # noqa: E731
    x, vx, y, vy = store(64), store(16), store(64), store(16)
    x.put(list(range(64)), source.embed(train) * (1 + eps))
    vx.put(list(range(16)), source.embed(val))
    fp = source.block(0)
    advance(fp, x, y, call, 4)
    advance(fp, vx, vy, call, 4)
    student = make_student(fp, QuantConfig(2, 64, "clip"), "cpu")
    seen: list[float] = []
    settings = BlockAPSettings(epochs=2, batch_size=4, quant_lr=2e-2, weight_lr=2e-3, seed=0, loss="huber")
    train_block(student, 0, x, y, vx, vy, call, settings, "cpu",
                log=lambda tag, value, step: seen.append(value) if tag == "train_loss" else None)
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eps", type=float, default=1e-7)
    a = p.parse_args()
    base, moved = losses(0.0), losses(a.eps)
    print(" ".join(f"{step}:{b / x - 1:+.1e}" for step, (x, b) in enumerate(zip(base, moved))))


if __name__ == "__main__":
    main()
