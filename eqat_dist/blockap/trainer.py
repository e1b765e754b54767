"""Block-AP for one block (algorithm only: no ranks, no files).

Train every parameter of a fake-quantized block (weights, step sizes, zero points, and the norms)
to reproduce the full-precision block's output: MSE loss, AdamW with one learning rate for the
quantization parameters and one for the weights, cosine decay per step to lr / min_lr_factor.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from ..config.run_config import BlockAPConfig, per_width_lr
from ..models.blocks import BlockCall
from ..models.sequence_split import TokenSplit
from ..models.quantize import quant_linears, weights_fixed
from ..utils.memory import peak_memory_mib, reset_peak_memory
from .compiled import block_forward
from .feed import Feed, batches_of
from .grad_sum import GroupGradSum
from .lanes import Lanes, step_generator
from .losses import STEP_WIDE, reconstruction_loss
from .token_median import group_token_median
from .weight_shards import WeightShards

# Steps between two reads of the losses on the host: every read waits for the GPU, so they are
# collected on the device and read (checked, logged) together.
READ_EVERY = 16


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class BlockAPSettings(BlockAPConfig):
    """The run's Block-AP settings (config.BlockAPConfig, declared there once) and what the machine and the
    run add: `of(cfg.blockap, ...)` takes the part as it is."""
    amp_dtype: torch.dtype | None = None  # autocast dtype, None = train in the stores' dtype
    seed: int = 0
    compile: bool = False  # the block's forward (and so its backward) through torch.compile (compiled.py)
    shard_weights: bool = False  # data parallel: split the weight work over the group (weight_shards.py)

    @classmethod
    def of(cls, part: BlockAPConfig, **machine) -> "BlockAPSettings":
        return cls(**{f.name: getattr(part, f.name) for f in fields(BlockAPConfig)}, **machine)

    @property
    def restart_at_switch(self) -> bool:
        """Pipelined: a cosine of their own for the quantized-stream steps (`correction_lr` restart, measured worse)."""
        return self.correction_lr == "restart"

    @property
    def splits_weight_work(self) -> bool:
        """shard_weights where it applies: float16's loss scaling decides per rank whether to skip a step,
        so it keeps the replicated path."""
        return self.shard_weights and self.amp_dtype != torch.float16


@dataclass
class BlockReport:
    index: int
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    train_loss_first: float = float("nan")
    train_loss_last: float = float("nan")
    val_losses: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    peak_mem_mib: float = 0.0
    loss_at_switch: float | None = None  # pipelined: loss on the quantized stream when training switched to it
    switch_wait_s: float = 0.0  # pipelined: time spent waiting for that stream (in `seconds`, not training)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def param_groups(block: nn.Module, settings: BlockAPSettings) -> list[dict]:
    quant_params, weights = [], []
    qlinears = quant_linears(block)
    for lin in qlinears.values():
        quant_params += [lin.scale] + ([lin.zero] if lin.zero.requires_grad else [])  # a format grid fixes z
        weights.append(lin.weight)
        if lin.bias is not None:
            lin.bias.requires_grad_(False)  # biases stay as they are (as in the official code)
    linear_params = {id(p) for lin in qlinears.values() for p in lin.parameters()}
    for p in block.parameters():
        if id(p) not in linear_params:
            p.requires_grad_(settings.train_norms)
            if settings.train_norms:
                weights.append(p)
    return [{"params": quant_params, "lr": settings.quant_lr, "name": "quant"},
            {"params": weights, "lr": per_width_lr(settings.weight_lr, next(iter(qlinears.values())).cfg.bits),
             "name": "weight"}]


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """AdamW without weight decay, as the official code; the fused implementation (one pass over the
    parameters: 1.9 ms a step for a SmolLM2 block on one core against 18.9 ms for the per-tensor loop)."""
    try:
        return torch.optim.AdamW(groups, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
        return torch.optim.AdamW(groups, weight_decay=0.0)


def cosine_factor(step: int, total: int, min_lr_factor: float) -> float:
    floor = 1.0 / min_lr_factor
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def lr_factor(step: int, total: int, min_lr_factor: float, restart_at: int | None = None) -> float:
    """One cosine over the block's steps, or (restart_at set) one up to `restart_at` and a second from it
    to the end, so that the pipelined schedule's steps on the quantized stream start at the full rates
    again. Measured at w2g64 (docs/benchmarks.md) the restart loses to the one cosine: the full rates
    undo much of what the block learned on the full-precision stream."""
    if restart_at is None or not 0 < restart_at < total:
        return cosine_factor(step, total, min_lr_factor)
    if step < restart_at:
        return cosine_factor(step, restart_at, min_lr_factor)
    return cosine_factor(step - restart_at, total - restart_at, min_lr_factor)


@torch.no_grad()
def eval_loss(block, inputs, targets, call: BlockCall, batch_size: int, amp_dtype, group=None,
              compile: bool = False) -> float:
    """Mean squared error of the block over the stores, in eval mode (no dropout, whatever the model);
    over the whole data-parallel `group`'s stores when there is one (each rank holds its share)."""
    device = next(block.parameters()).device
    forward = block_forward(compile)
    training = block.training
    block.eval()
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    with weights_fixed(block):  # quantized once for the pass, not per batch
        for x, y in Feed([inputs, targets], batches_of(len(inputs), batch_size), device):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = forward(block, x, call)
            total += nn.functional.mse_loss(out.float(), y.float(), reduction="sum").double()  # one read, at the end
            n += out.numel()
    block.train(training)
    if group is not None:
        both = torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=device)])
        group.allreduce_sum_(both)
        total, n = both[0], int(both[1].item())
    return total.item() / max(n, 1)


class _StepValues:
    """Each step's loss and gradient norm, kept on the device and read every READ_EVERY steps (and at
    the end of an epoch): checked for finiteness, logged, shown on the progress bar."""

    def __init__(self, report, index: int, log, progress):
        self.report, self.index, self.log, self.progress = report, index, log, progress
        self.pending = []  # (step, epoch, loss, grad norm, learning rates)

    def add(self, step: int, epoch: int, loss: torch.Tensor, grad_norm: torch.Tensor, lrs: dict) -> None:
        self.pending.append((step, epoch, loss.detach(), grad_norm.detach(), lrs))
        if len(self.pending) >= READ_EVERY:
            self.read()

    def read(self) -> None:
        if not self.pending:
            return
        values = torch.stack([torch.stack([loss.float(), norm.float()]) for _, _, loss, norm, _ in self.pending]).tolist()
        for (step, epoch, _, _, lrs), (loss, norm) in zip(self.pending, values):
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"Block-AP: non-finite loss ({loss}) at block {self.index}, epoch {epoch}, step {step}. "
                    "Finished blocks are saved, but they belong to these settings: the same command would fail "
                    "the same way, so start again with `overwrite` and a lower `quant_lr`/`weight_lr` (or "
                    "`dtype` float32).")
            if step == 0:
                self.report.train_loss_first = loss
            self.report.train_loss_last = loss
            if self.log:
                self.log("train_loss", loss, step)
                self.log("grad_norm", norm, step)
                for name, lr in lrs.items():
                    self.log(f"lr_{name}", lr, step)
        if self.progress is not None:
            self.progress.set_postfix(block=self.index, loss=f"{values[-1][0]:.3g}")
        self.pending = []


def group_has_windows(stores, group) -> bool:
    """Whether any rank of the group holds validation windows (a rank's share may be empty)."""
    count = torch.tensor([float(len(stores))], dtype=torch.float64)
    group.allreduce_sum_(count)
    return count.item() > 0


def train_block(block: nn.Module, index: int, inputs, targets, val_inputs, val_targets, call: BlockCall,
                settings: BlockAPSettings, device: torch.device, log=None, progress=None,
                on_step=None, switch_at: int | None = None, switch=None, lanes: Lanes | None = None,
                group=None, rows_ready=None, split: TokenSplit | None = None) -> BlockReport:
    """Train `block` (its linears already QuantLinear, on `device`) in place.

    inputs/targets: activation stores (student inputs, full-precision outputs), val_* likewise (may be
    empty). With a data-parallel `group` (cluster/transport.py) the stores hold this rank's share of the
    windows (`lanes`: which, and each step's rows), every step's gradients and loss are summed over the
    group before the clipping and the optimizer step, so every rank takes the same step, the one a
    single rank would take with all the windows. `log(tag, value, step)` receives scalars; `progress`
    is an optional tqdm bar over steps; `on_step()` is called after every step (the pipeline lets its
    transfers progress there).
    `switch()`, called before step `switch_at`, returns new (inputs, val_inputs) for the remaining
    steps (same targets, optimizer state and schedule, or a restarted cosine with
    settings.restart_at_switch): the pipelined schedule trains on the full-precision stream
    first and on the quantized one last. The training inputs may still be arriving (the quantized
    stream, in the order the steps read it): `rows_ready(rows)` is called before any of their rows are
    read and waits for them; the validation inputs are in when training starts and when switch() returns.
    `split`: under sequence parallelism (models/sequence_split.py) the stores hold this rank's share of
    every window's tokens, `group` is then all the ranks that share the block's steps (windows and
    tokens), and each rank's loss is its tokens' share of the step's.
    """
    split = split or TokenSplit(inputs.shape[0])
    report = BlockReport(index)
    device = torch.device(device)
    amp = settings.amp_dtype
    amp_on = amp is not None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_on and amp == torch.float16)
    groups = param_groups(block, settings)
    optimizer = adamw(groups)
    lanes = lanes or Lanes(len(inputs), settings.batch_size)
    total = settings.epochs * lanes.steps_per_epoch
    restart_at = switch_at if settings.restart_at_switch and switch is not None else None
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, settings.min_lr_factor, restart_at))
    gen = step_generator(settings.seed, index)  # independent of resume point
    trainable = [p for g in groups for p in g["params"]]
    forward = block_forward(settings.compile)
    shards = WeightShards(block, trainable, group, device, amp) \
        if group is not None and settings.splits_weight_work else None
    summed = GroupGradSum(trainable, group, device) if group is not None and shards is None else None
    eval_batch = len(lanes.own_lanes)  # this rank's share of a step
    has_val = len(val_inputs) > 0 if group is None else group_has_windows(val_inputs, group)
    check_in, check_out = (val_inputs, val_targets) if has_val else (inputs, targets)

    def loss_on(inputs, targets) -> float:
        if shards is not None:
            shards.sync()  # a pass reads every linear: their owners' weights first
        return eval_loss(block, inputs, targets, call, eval_batch, amp, group, settings.compile)

    if rows_ready is not None and not has_val:  # the check reads every training row
        rows_ready(range(len(inputs)))
    report.loss_before = loss_on(check_in, check_out)
    reset_peak_memory(device)  # this block's own peaks
    values = _StepValues(report, index, log, progress)
    start, tokens, step = time.perf_counter(), 0, 0
    block.train()
    for epoch in range(settings.epochs):
        epoch_steps = lanes.epoch(gen)
        epoch_batches = [s.rows for s in epoch_steps]
        feed = iter(Feed([inputs, targets], [b for b in epoch_batches if b], device,  # the next batch copies during this one
                         before_read=rows_ready))
        for position, this_step in enumerate(epoch_steps):
            if step == switch_at and switch is not None:
                feed.close()  # no batch of the old inputs is read any more: the new may land in their store
                waited = time.perf_counter()
                inputs, val_inputs = switch()
                report.switch_wait_s = time.perf_counter() - waited
                check_in = val_inputs if has_val else inputs
                if rows_ready is not None and not has_val:  # the check reads every training row
                    rows_ready(range(len(inputs)))
                report.loss_at_switch = loss_on(check_in, check_out)
                feed = iter(Feed([inputs, targets], [b for b in epoch_batches[position:] if b], device,
                                 before_read=rows_ready))
            optimizer.zero_grad(set_to_none=True)
            if shards is not None:
                shards.begin_step()
            # a loss over the whole step (Huber's median) gets its statistics from the group's ranks
            token_median = group_token_median(group, this_step, split.tokens, split.positions, device) \
                if group is not None and settings.loss in STEP_WIDE else None
            if this_step.rows:
                x, y = next(feed)
                with torch.autocast(device.type, dtype=amp, enabled=amp_on):
                    out = forward(block, x, call)
                loss = reconstruction_loss(settings.loss, out, y, token_median)
                if group is not None:  # this rank's share of the step's mean: its windows, its tokens of them
                    loss = loss * (len(this_step.rows) / this_step.windows) * (split.local_tokens / split.tokens)
                scaler.scale(loss).backward()
                tokens += x.shape[0] * x.shape[1]
            else:  # the last, smaller step has no window of this rank's lanes: it adds nothing to the sum
                if token_median is not None:
                    token_median(None)  # but the group's sums are taken by every rank
                loss = torch.zeros((), device=device)
            if shards is not None:
                loss = shards.finish_step(loss)
            elif summed is not None:
                loss = summed(loss)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the rates this step uses
            scaler.unscale_(optimizer)
            max_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
            grad_norm = shards.clip_grad_norm_(max_norm) if shards is not None else \
                torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            values.add(step, epoch, loss, grad_norm, lrs)
            if on_step is not None:
                on_step()
            if progress is not None:
                progress.update(1)
            step += 1
        values.read()
        if has_val:
            val = loss_on(val_inputs, val_targets)
            report.val_losses.append(val)
            if log:
                log("val_loss", val, epoch)
    block.eval()
    if summed is not None:
        summed.close()
    if shards is not None:
        shards.close()  # every rank holds the whole trained block again
    report.steps = step
    report.seconds = time.perf_counter() - start
    report.tokens_per_s = tokens / report.seconds if report.seconds else 0.0
    if has_val and report.val_losses:  # the last epoch's validation saw these weights already: not again
        report.loss_after = report.val_losses[-1]
    else:
        report.loss_after = loss_on(check_in, check_out)
    peaks = peak_memory_mib(device)
    report.peak_mem_mib = peaks.get("device", peaks["host_rss"])  # GPU peak, else peak RSS (this block's)
    for p in block.parameters():
        p.requires_grad_(False)
    return report
