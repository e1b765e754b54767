"""The per-block steps every Block-AP schedule shares: move a stream through a block, build the
student of a block, finish (pack) a trained student, rebuild a finished block from its checkpoint."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..models.blocks import BlockCall, run_block
from ..models.lazy import LazyModel
from ..models.quantize import packed_skeleton, to_fake_quant, to_packed, weights_fixed
from ..quant import QuantConfig
from .checkpoint import finished_blocks, load_block
from .feed import Feed, batches_of


@torch.no_grad()
def advance(block: nn.Module, source, target, call: BlockCall, batch_size: int, amp_dtype=None,
            rows: tuple[int, int] | None = None, spans: list[tuple[int, int]] | None = None,
            span_done=None) -> None:
    """target[i] = block(source[i]) for every row (or rows a..b, or each of `spans` in turn, calling
    `span_done(a, b)` once a span is written); source and target may be the same store. The next batch
    is read while this one computes; the outputs are written behind."""
    device = next(block.parameters()).device
    batches, last_of = [], {}  # last_of: the batch that ends each span
    for a, b in spans or [rows or (0, len(source))]:
        batches += [[a + i for i in batch] for batch in batches_of(b - a, batch_size)]
        last_of[len(batches) - 1] = (a, b)
    with weights_fixed(block):  # a quantized block's weights dequantized once for the pass, not per batch
        for j, (idx, (x,)) in enumerate(zip(batches, Feed([source], batches, device))):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                target.put(idx, run_block(block, x, call))
            if span_done is not None and j in last_of:
                span_done(*last_of[j])


def make_student(fp_block: nn.Module, cfg: QuantConfig, device) -> nn.Module:
    """A fake-quantized float32 copy of the block on `device`, its step sizes and zero points initialised
    there: the clip search reads every weight 21 times (on the host, about a minute a Llama-2-70B block)."""
    return to_fake_quant(copy.deepcopy(fp_block).to(device=device, dtype=torch.float32), cfg)


def finish_student(student: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replace the trained weights by their quantized values: pack the block (float32 scales, so the
    stream computed from it is bit-identical to one computed from a reloaded checkpoint). Packed where
    the student trained (the integers are exact on either), then kept in host memory."""
    return to_packed(student, cfg, dtype=torch.float32).cpu()


def restore_block(fp_block: nn.Module, cfg: QuantConfig, folder, index: int) -> tuple[nn.Module, dict]:
    """A finished block rebuilt from its checkpoint file, and its training report."""
    block = packed_skeleton(copy.deepcopy(fp_block).float(), cfg, dtype=torch.float32)
    report = load_block(folder, index, block)
    return block, report


@torch.no_grad()
def gptq_start(student: nn.Module, fp_block: nn.Module, inputs, call: BlockCall, batch_size: int, amp_dtype=None,
               group=None) -> None:
    """`--init gptq`: each quantized linear of `student` starts from GPTQ (quant/gptq.py) instead of
    round-to-nearest: its weight, step sizes and zero points replaced, in place. The second moments of
    each linear's inputs come from running the full-precision block on the student's own training
    inputs (`inputs`: this rank's share; summed over the data-parallel `group`, so every rank of it
    starts from the same weights)."""
    from ..models.blocks import block_linears
    from ..models.quantize import quant_linears
    from ..quant.gptq import InputMoments, gptq_weight

    device = next(student.parameters()).device
    moments = InputMoments(block_linears(fp_block))
    try:
        for (x,) in Feed([inputs], batches_of(len(inputs), batch_size), device):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                run_block(fp_block, x, call)
    finally:
        moments.close()
    for name, layer in quant_linears(student).items():
        hessian = moments.sums[name].float()
        if group is not None:
            group.allreduce_sum_(hessian)
        weight, scale, zero = gptq_weight(layer.weight, hessian, layer.cfg)
        layer.weight.copy_(weight)
        layer.scale.copy_(scale)
        layer.zero.copy_(zero)


def restored_blocks(source: LazyModel, cfg: QuantConfig, ckpt_dir: Path, reports: list, keep: bool = False):
    """Every finished block rebuilt from its checkpoint, in order, one at a time (its report appended to
    `reports`). keep=False drops each from `source` once the consumer asks for the next: the export
    writes a block and lets it go, so the whole model is never in memory."""
    missing = sorted(set(range(source.num_blocks)) - finished_blocks(Path(ckpt_dir), source.num_blocks))
    if missing:
        raise RuntimeError(f"blocks {missing} are not finished in {ckpt_dir}")
    for i in range(source.num_blocks):
        packed, report = restore_block(source.block(i), cfg, ckpt_dir, i)
        reports.append(report)
        if keep:
            source.set_block(i, packed)
        yield i, packed
        if not keep:
            source.release(i)


def assemble(source: LazyModel, cfg: QuantConfig, ckpt_dir: Path) -> tuple[torch.nn.Module, list[dict]]:
    """The whole quantized model in memory (tests, benchmarks) and all blocks' reports."""
    reports = []
    for _ in restored_blocks(source, cfg, ckpt_dir, reports, keep=True):
        pass
    return source.model, reports
