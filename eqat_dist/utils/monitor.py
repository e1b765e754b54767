"""What a user watches: TensorBoard scalars (optional) and a console summary."""
from __future__ import annotations

import time


class Monitor:
    """Scalars go to TensorBoard under `prefix/` tags; `for_block(i)` gives a logger for one block
    that writes both `block_XXX/<tag>` (per-block curves) and `blockap/<tag>` on a global step."""

    def __init__(self, log_dir=None, prefix: str = ""):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(log_dir))
        self.prefix = prefix
        self._global = {}
        self.start = time.time()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(f"{self.prefix}{tag}", value, step)

    def for_block(self, index: int):
        def log(tag: str, value: float, step: int) -> None:
            self.scalar(f"block_{index:03d}/{tag}", value, step)
            if tag in ("train_loss", "grad_norm") or tag.startswith("lr_"):
                g = self._global[tag] = self._global.get(tag, -1) + 1
                self.scalar(f"blockap/{tag}", value, g)
        return log

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(f"{self.prefix}{tag}", text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def summary_table(reports: list[dict]) -> str:
    head = f"{'block':>5} {'loss before':>12} {'loss after':>12} {'change':>8} {'steps':>6} {'time s':>7} {'tok/s':>8}"
    lines = [head, "-" * len(head)]
    for r in reports:
        change = (r["loss_after"] / r["loss_before"] - 1) * 100 if r["loss_before"] else float("nan")
        lines.append(f"{r['index']:>5} {r['loss_before']:>12.4g} {r['loss_after']:>12.4g} {change:>7.1f}% "
                     f"{r['steps']:>6} {r['seconds']:>7.1f} {r['tokens_per_s']:>8.0f}")
    return "\n".join(lines)
