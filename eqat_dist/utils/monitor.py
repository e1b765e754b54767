"""What a user watches: TensorBoard scalars (optional), progress, and a console summary.

On a terminal progress is a tqdm bar; when output goes to a file (nohup, SLURM, `> run.log`) bars are
off and loops print plain lines instead, so a log shows what the run is doing.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def quiet_library_bars() -> None:
    """transformers / hub / datasets bars write carriage-return noise into a log file: off there."""
    if interactive():
        return
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class StepLog:
    """A loop's progress: a tqdm bar on a terminal; in a log file one line per step, at most one every
    `every` seconds (and always the last), with the elapsed time and an ETA."""

    def __init__(self, total: int, desc: str, unit: str = "step", every: float = 5.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.start, self.last = 0, time.time(), 0.0
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False) if interactive() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.time()
        if self.done >= self.total or now - self.last >= self.every:
            self.last = now
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}s, {duration(elapsed)} elapsed, eta "
                  f"{duration(eta)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def block_line(report: dict, blocks: int, rank: int, done: int, mine: int, trained_s: float, trained: int) -> str:
    """One line per finished Block-AP block: block i/L, rank, loss before -> after, training time and
    throughput, the block's whole turn (streams, the student's start, packing: at 70B on a host these
    once took longer than the training), and the ETA of this rank's share of the phase (from the turns
    of the blocks it trained, not of those it restored)."""
    # pipelined mode: before -> after on the quantized stream (from the switch on), not across the switch
    before = report.get("loss_at_switch") or report["loss_before"]
    change = (report["loss_after"] / before - 1) * 100 if before else float("nan")
    eta = trained_s / trained * (mine - done) if trained else 0.0
    restored = " (restored from its checkpoint)" if report.get("restored") else ""
    stream = " on the quantized stream" if report.get("loss_at_switch") else ""
    return (f"[block-ap] block {report['index']} of {blocks}, rank {rank}: loss{stream} {before:.4g} -> "
            f"{report['loss_after']:.4g} ({change:+.1f}%), {report['seconds']:.1f} s, "
            f"{report['tokens_per_s']:,.0f} tok/s, {report['turn_s']:.1f} s the block in all; "
            f"rank {rank} done {done}/{mine}, eta {duration(eta)}{restored}")


STALLED = 0.01  # a block whose loss moved by less than this share did not train (Block-AP moves it by 10-90%)


def stalled_warning(reports: list[dict], steps: int, quant_lr: float, weight_lr: float) -> str | None:
    """A line when every block `reports` lists kept its loss within 1%: learning rates far too small for
    the number of steps (a run would spend hours and give round-to-nearest). None when any block moved."""
    changes = [r["loss_after"] / (r.get("loss_at_switch") or r["loss_before"]) - 1 for r in reports
               if r.get("loss_at_switch") or r.get("loss_before")]
    if not changes or any(abs(c) >= STALLED for c in changes):
        return None
    moved = ", ".join(f"{100 * c:+.2f}%" for c in changes)
    return (f"[block-ap] warning: the loss of blocks {', '.join(str(r['index']) for r in reports)} barely moved "
            f"({moved}) in {steps} steps a block: --quant-lr {quant_lr:g} and --weight-lr {weight_lr:g} are likely too "
            "small for this budget (the paper's rates are for 4096 steps a block; the README's demo trains 32 steps "
            "a block at --quant-lr 2e-2 --weight-lr 2e-3). Stop the run and raise them, or let it go on")


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
