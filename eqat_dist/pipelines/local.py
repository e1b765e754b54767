"""Block-AP in one process: the paper's single-GPU schedule (student mode), or teacher mode.

student mode: the student input of block i is the stream of the already-quantized blocks 0..i-1;
              the target is the full-precision block on the full-precision stream.
teacher mode: the student input of block i is the full-precision stream (blocks independent).
Streams are updated in place, so each split holds two stores at most.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..blockap.checkpoint import finished_blocks, open_run, save_block
from ..blockap.steps import advance, finish_student, make_student, restore_block
from ..blockap.stores import ActivationStore, describe_memory
from ..blockap.trainer import BlockAPSettings, train_block
from ..models.blocks import decoder_layers, embed, record_block_calls, set_submodule
from ..quant import QuantConfig
from ..utils.monitor import Monitor

STUDENT_INPUTS = ("student", "teacher")


@dataclass
class StreamSpec:
    placement: str = "cpu"  # gpu | cpu | disk
    dtype: torch.dtype = torch.float32
    disk_dir: Path | None = None


def _fill_embeddings(model, ids: torch.Tensor, store: ActivationStore, batch_size: int) -> None:
    for start in range(0, len(ids), batch_size):
        idx = list(range(start, min(start + batch_size, len(ids))))
        store.put(idx, embed(model, ids[idx]))


def run_blockap_local(model, cfg: QuantConfig, train_ids: torch.Tensor, val_ids: torch.Tensor,
                      settings: BlockAPSettings, ckpt_dir: Path, run_settings: dict, device,
                      streams: StreamSpec, student_input: str = "student", monitor: Monitor | None = None,
                      log=print) -> list[dict]:
    """Quantize every block of `model` in place (their linears become PackedLinear); returns the
    per-block reports. Finished blocks found in `ckpt_dir` are reused (resume)."""
    if student_input not in STUDENT_INPUTS:
        raise ValueError(f"--student-input {student_input!r}: use one of {', '.join(STUDENT_INPUTS)}")
    device = torch.device(device)
    ckpt_dir = Path(ckpt_dir)
    open_run(ckpt_dir, run_settings)
    layers = decoder_layers(model)
    _, calls = record_block_calls(model, train_ids[:1])
    hidden = model.config.hidden_size
    seqlen = train_ids.shape[1]
    bs = settings.batch_size

    def store(n, name):
        return ActivationStore(n, seqlen, hidden, streams.dtype, streams.placement, device, streams.disk_dir, name)

    splits = {"train": train_ids, "val": val_ids}
    fp = {k: store(len(v), f"fp-{k}") for k, v in splits.items()}
    other = {k: store(len(v), f"{'q' if student_input == 'student' else 'fp-out'}-{k}") for k, v in splits.items()}
    log(describe_memory({f"fp_{k}": s for k, s in fp.items()} | {f"{student_input}_{k}": s for k, s in other.items()}))
    model_cpu = model.cpu()
    for k, ids in splits.items():
        _fill_embeddings(model_cpu, ids, fp[k], bs)
        if student_input == "student":
            other[k].copy_from(fp[k], bs)

    done = finished_blocks(ckpt_dir, len(layers))
    reports: list[dict] = []
    bar = tqdm(total=len(layers), desc="Block-AP blocks", unit="block", disable=None)
    steps_bar = tqdm(total=0, desc="steps", leave=False, disable=None)
    for i, fp_block in enumerate(list(layers)):
        call = calls[i].to(device)
        fp_dev = fp_block.to(device)
        resumed = i in done
        if student_input == "student":
            # target = fp block on the fp stream, written in place: fp now holds block i's targets
            for k in splits:
                advance(fp_dev, fp[k], fp[k], call, bs, settings.amp_dtype)
            inputs, targets = other, fp
        else:
            for k in splits:
                advance(fp_dev, fp[k], other[k], call, bs, settings.amp_dtype)
            inputs, targets = fp, other
        fp_block.cpu()
        if resumed:
            packed, report = restore_block(fp_block, cfg, ckpt_dir, i)
            log(f"block {i}: reused from {ckpt_dir}")
        else:
            student = make_student(fp_block, cfg, device)
            steps_bar.reset(total=settings.epochs * -(-len(train_ids) // bs))
            block_log = monitor.for_block(i) if monitor else None
            t0 = time.time()
            rep = train_block(student, i, inputs["train"], targets["train"], inputs["val"], targets["val"], call,
                              settings, device, log=block_log, progress=steps_bar)
            packed = finish_student(student, cfg)
            report = rep.to_dict() | {"wall_s": time.time() - t0}
            save_block(ckpt_dir, i, packed, report)
            if monitor:
                for tag in ("loss_before", "loss_after", "seconds", "tokens_per_s", "peak_mem_mib"):
                    monitor.scalar(f"blockap_blocks/{tag}", report[tag], i)
        reports.append(report)
        if student_input == "student":
            packed_dev = packed.to(device)
            for k in splits:  # advance the student stream through the quantized block
                advance(packed_dev, other[k], other[k], call, bs, settings.amp_dtype)
            packed.cpu()
        else:
            fp, other = other, fp  # block i's fp output is block i+1's input
        set_submodule(model, _layers_name(model) + f".{i}", packed)
        bar.update(1)
    steps_bar.close()
    bar.close()
    for s in list(fp.values()) + list(other.values()):
        s.close()
    return reports


def _layers_name(model) -> str:
    layers = decoder_layers(model)
    return next(name for name, m in model.named_modules() if m is layers)
