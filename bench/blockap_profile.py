"""Where one block's Block-AP time goes, on the bundled SmolLM2-135M (issue 22, part 4).

    OMP_NUM_THREADS=2 python bench/blockap_profile.py --block 5 --train-size 64 --val-size 64 --seqlen 256 \
        --batch-size 4 --epochs 2

Trains one block from stores filled with its real full-precision input, timing each part of the work:
the loss before training, the steps (forward, backward, clipping, optimizer: PyTorch's profiler splits
them), the validation after each epoch, the loss after. Prints seconds per part and the top operators.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eqat_dist.blockap import trainer  # noqa: E402
from eqat_dist.blockap.steps import advance, make_student  # noqa: E402
from eqat_dist.blockap.stores import ActivationStore  # noqa: E402
from eqat_dist.blockap.trainer import BlockAPSettings, train_block  # noqa: E402
from eqat_dist.data.windows import calibration_windows  # noqa: E402
from eqat_dist.models.lazy import LazyModel  # noqa: E402
from eqat_dist.quant import QuantConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--val-size", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--operators", type=int, default=15, help="top operators to list (0: no profiler)")
    a = p.parse_args()

    from transformers import AutoTokenizer

    source = LazyModel("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(source.folder)
    train_ids, val_ids = calibration_windows(tok, "boolq", a.seqlen, a.train_size, a.val_size, seed=0)
    calls = source.calls(train_ids[:1])
    hidden, cpu = source.config.hidden_size, torch.device("cpu")
    stores = {}
    for name, ids in (("train", train_ids), ("val", val_ids)):
        x = ActivationStore(len(ids), a.seqlen, hidden, torch.float32, "cpu", cpu)
        y = ActivationStore(len(ids), a.seqlen, hidden, torch.float32, "cpu", cpu)
        for i in range(0, len(ids), a.batch_size):
            x.put(list(range(i, min(i + a.batch_size, len(ids)))), source.embed(ids[i:i + a.batch_size]))
        for b in range(a.block + 1):  # the block's real fp input, then its fp output as the target
            advance(source.block(b), x, y, calls[b].to(cpu), a.batch_size, None)
            if b < a.block:
                x, y = y, x
        stores[name] = (x, y)
    cfg = QuantConfig(a.bits, a.group_size)
    settings = BlockAPSettings(epochs=a.epochs, batch_size=a.batch_size, quant_lr=1e-4, weight_lr=2e-5)

    parts, real_eval = {"eval_loss": 0.0}, trainer.eval_loss

    def timed_eval(*args, **kw):
        t0 = time.perf_counter()
        out = real_eval(*args, **kw)
        parts["eval_loss"] += time.perf_counter() - t0
        parts["eval_loss passes"] = parts.get("eval_loss passes", 0) + 1
        return out

    trainer.eval_loss = timed_eval
    student = make_student(source.block(a.block), cfg, cpu)
    (xt, yt), (xv, yv) = stores["train"], stores["val"]
    t0 = time.perf_counter()
    if a.operators:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            report = train_block(student, a.block, xt, yt, xv, yv, calls[a.block], settings, cpu)
    else:
        report = train_block(student, a.block, xt, yt, xv, yv, calls[a.block], settings, cpu)
    wall = time.perf_counter() - t0
    print(f"block {a.block}, w{a.bits}g{a.group_size}, {a.train_size} + {a.val_size} windows x {a.seqlen}, batch "
          f"{a.batch_size}, {a.epochs} epochs, {torch.get_num_threads()} threads; profiler {'on' if a.operators else 'off'}")
    steps_s = wall - parts["eval_loss"]
    print(f"wall {wall:.2f} s: {report.steps} training steps {steps_s:.2f} s ({steps_s / report.steps * 1000:.0f} ms/step), "
          f"loss evaluations {parts['eval_loss']:.2f} s over {parts.get('eval_loss passes', 0)} passes of the val set "
          f"({100 * parts['eval_loss'] / wall:.0f}%); loss {report.loss_before:.4g} -> {report.loss_after:.4g}")
    if a.operators:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.operators))


if __name__ == "__main__":
    main()
