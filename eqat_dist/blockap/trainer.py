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
    peak_mem_mib: float = 0.0  # the GPU's, else the process's resident set
    host_peak_mib: float = 0.0  # the process's resident set (host memory) during this block
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


def clip_in_the_step(optimizer: torch.optim.Optimizer, params: list, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ with its multiply moved into the fused AdamW step: the norm is one
    read of the gradients, and the step divides each gradient by `grad_scale` in the pass it makes
    anyway (the hook GradScaler uses), instead of a read and a write of every gradient between them.
    The same step up to float rounding (x * c against x / (1 / c)). Returns the norm before clipping."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # clip_grad_norm_'s coefficient max_norm / (norm + 1e-6), clamped to 1, as a divisor
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0).to(torch.float32)
    return norm


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


class _GroupSums:
    """A step's loss and gradients made the group's (cluster/transport.SumGroup): each linear's weight work
    done by its owner (weight_shards.py, `shard_weights`), or every gradient summed in buckets started
    during the backward (grad_sum.py); alone, nothing to do."""

    def __init__(self, block: nn.Module, trainable: list, group, device: torch.device, settings: BlockAPSettings):
        split = group is not None and settings.splits_weight_work
        self.shards = WeightShards(block, trainable, group, device, settings.amp_dtype) if split else None
        self.summed = GroupGradSum(trainable, group, device) if group is not None and not split else None
        self.trainable = trainable

    def before_pass(self) -> None:
        if self.shards is not None:
            self.shards.sync()  # a pass reads every linear: their owners' weights first

    def begin_step(self) -> None:
        if self.shards is not None:
            self.shards.begin_step()

    def finish_step(self, loss: torch.Tensor) -> torch.Tensor:
        """The group's loss of the step, every gradient summed where the step needs it."""
        if self.shards is not None:
            return self.shards.finish_step(loss)
        return self.summed(loss) if self.summed is not None else loss

    def clip_(self, max_norm: float, optimizer: torch.optim.Optimizer, scaler) -> torch.Tensor:
        if self.shards is not None:
            return self.shards.clip_grad_norm_(max_norm)
        if optimizer.defaults.get("fused") and not scaler.is_enabled():
            return clip_in_the_step(optimizer, self.trainable, max_norm)
        return torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)

    def close(self) -> None:
        if self.summed is not None:
            self.summed.close()
        if self.shards is not None:
            self.shards.close()  # every rank holds the whole trained block again


@dataclass
class _Streams:
    """The block's stores as training sees them: the training inputs change at a pipelined switch."""
    inputs: object
    targets: object
    val_inputs: object
    val_targets: object
    has_val: bool
    rows_ready: object = None  # rows_ready(rows) waits for training-input rows still arriving

    def check(self, wait: bool = True) -> tuple:
        """The stores the loss before, at the switch and after is taken on: validation, else training
        (`wait`: for every row of it, which the check reads; after training they are all in)."""
        if self.has_val:
            return self.val_inputs, self.val_targets
        if wait and self.rows_ready is not None:
            self.rows_ready(range(len(self.inputs)))
        return self.inputs, self.targets

    def feed(self, batches: list, device: torch.device) -> Feed:
        """The training batches in order, the next copying during this one (empty steps left out)."""
        return iter(Feed([self.inputs, self.targets], [b for b in batches if b], device, before_read=self.rows_ready))


def _step_loss(block, forward, call: BlockCall, feed, this_step, settings: BlockAPSettings, device: torch.device,
               group, split: TokenSplit, scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, int]:
    """One step's forward and backward on this rank's rows: (its share of the step's loss, its tokens)."""
    # a loss over the whole step (Huber's median) gets its statistics from the group's ranks
    token_median = group_token_median(group, this_step, split.tokens, split.positions, device) \
        if group is not None and settings.loss in STEP_WIDE else None
    if not this_step.rows:  # the last, smaller step has no window of this rank's lanes: it adds nothing
        if token_median is not None:
            token_median(None)  # but the group's sums are taken by every rank
        return torch.zeros((), device=device), 0
    x, y = next(feed)
    amp = settings.amp_dtype
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        out = forward(block, x, call)
    loss = reconstruction_loss(settings.loss, out, y, token_median)
    if group is not None:  # this rank's share of the step's mean: its windows, its tokens of them
        loss = loss * (len(this_step.rows) / this_step.windows) * (split.local_tokens / split.tokens)
    scaler.scale(loss).backward()
    return loss, x.shape[0] * x.shape[1]


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
    scaler = torch.amp.GradScaler(device.type, enabled=amp is not None and amp == torch.float16)
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
    sums = _GroupSums(block, trainable, group, device, settings)
    eval_batch = len(lanes.own_lanes)  # this rank's share of a step
    has_val = len(val_inputs) > 0 if group is None else group_has_windows(val_inputs, group)
    streams = _Streams(inputs, targets, val_inputs, val_targets, has_val, rows_ready)
    max_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")

    def loss_on(stores) -> float:
        sums.before_pass()
        return eval_loss(block, *stores, call, eval_batch, amp, group, settings.compile)

    report.loss_before = loss_on(streams.check())
    reset_peak_memory(device)  # this block's own peaks
    values = _StepValues(report, index, log, progress)
    start, tokens, step = time.perf_counter(), 0, 0
    block.train()
    for epoch in range(settings.epochs):
        epoch_steps = lanes.epoch(gen)
        batches = [s.rows for s in epoch_steps]
        feed = streams.feed(batches, device)
        for position, this_step in enumerate(epoch_steps):
            if step == switch_at and switch is not None:  # the pipelined schedule's switch of input stream
                feed.close()  # no batch of the old inputs is read any more: the new may land in their store
                waited = time.perf_counter()
                streams.inputs, streams.val_inputs = switch()
                report.switch_wait_s = time.perf_counter() - waited
                report.loss_at_switch = loss_on(streams.check())
                feed = streams.feed(batches[position:], device)
            optimizer.zero_grad(set_to_none=True)
            sums.begin_step()
            loss, step_tokens = _step_loss(block, forward, call, feed, this_step, settings, device, group, split,
                                           scaler)
            loss = sums.finish_step(loss)
            tokens += step_tokens
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # the rates this step uses
            scaler.unscale_(optimizer)
            grad_norm = sums.clip_(max_norm, optimizer, scaler)
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
            report.val_losses.append(loss_on((streams.val_inputs, streams.val_targets)))
            if log:
                log("val_loss", report.val_losses[-1], epoch)
    block.eval()
    sums.close()
    _finish_report(report, step, tokens, time.perf_counter() - start, device,
                   None if has_val and report.val_losses else lambda: loss_on(streams.check(wait=False)))
    for p in block.parameters():
        p.requires_grad_(False)
    return report


def _finish_report(report: BlockReport, steps: int, tokens: int, seconds: float, device, check_loss) -> None:
    """Steps, time, throughput, the loss after (the last validation's, which saw these weights, else
    `check_loss()`) and this block's memory peaks (the GPU's, else the process's resident set; the host's)."""
    report.steps, report.seconds = steps, seconds
    report.tokens_per_s = tokens / seconds if seconds else 0.0
    report.loss_after = report.val_losses[-1] if check_loss is None else check_loss()
    peaks = peak_memory_mib(device)
    report.peak_mem_mib = peaks.get("device", peaks["host_rss"])
    report.host_peak_mib = peaks["host_rss"]
