"""E2E-QP: with the integer weights and zero points frozen, train only the step sizes (`scales`)
end to end on the causal-LM loss. AdamW over the scales alone, cosine schedule with linear warm-up,
gradient clipping (in the DeepSpeed config), gradient checkpointing, data-parallel over ranks with the
global batch fixed whatever the number of ranks; DeepSpeed checkpoints for resume."""
from __future__ import annotations

import datetime
import math
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..blockap.trainer import NonFiniteLossError
from ..config.run_config import E2EConfig
from ..utils.memory import peak_memory_mib
from .checkpoints import (convert_to_universal, find_resume_point, load_resume_point, prune_checkpoints,
                          remove_universal_copy, resume_plan)
from .ds_setup import make_engine, save_engine_checkpoint, zero_stage


@dataclass(frozen=True)
class E2ESettings(E2EConfig):
    """The run's E2E-QP settings (config.E2EConfig, declared there once) and the run's seed."""
    seed: int = 0

    @classmethod
    def of(cls, part: E2EConfig, **run) -> "E2ESettings":
        return cls(**{f.name: getattr(part, f.name) for f in fields(E2EConfig)}, **run)


def warmup_cosine(step: int, total: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total - warmup_steps)))


def freeze_all_but_scales(model) -> list[str]:
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".scales"))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError("the model has no packed layers with scales: run Block-AP or RTN first (`from_dir` DIR)")
    return names


def optimizer_state_elements(optimizer) -> int:
    """Elements of Adam's first moments held by this rank: what the optimizer really trains (DeepSpeed
    wraps the torch optimizer; under ZeRO its state lives on flat partitions of the trainable tensors)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(state["exp_avg"].numel() for state in inner.state.values() if "exp_avg" in state)


def train_e2e(model, data, settings: E2ESettings, ds_config: dict, accum: int, ckpt_dir: Path,
              device, log=print, monitor=None) -> dict:
    """`data`: the training rows, text windows (data/windows.TextWindows) or conversations with their
    assistant labels (data/chat.ChatExamples); the loss is the model's causal-LM loss on the labels."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    trainable = freeze_all_but_scales(model)
    if settings.grad_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=0.0)
    steps_per_epoch = len(data) // settings.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"`e2e_train_size` {len(data)} is smaller than one global batch ({settings.global_batch})")
    total = settings.epochs * steps_per_epoch
    warm = max(1, round(settings.warmup * total)) if settings.warmup > 0 else 0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warm))
    ckpt_dir = Path(ckpt_dir)
    plan = resume_plan(settings, data)
    point = find_resume_point(ckpt_dir, world, zero=zero_stage(ds_config) > 0)
    if point is not None and point.reshard:
        if rank == 0:
            log(f"[e2e] {ckpt_dir / point.tag} was written by {point.saved_by_ranks} rank(s); converting it to "
                f"DeepSpeed's universal format to resume on {world}")
            convert_to_universal(ckpt_dir, point)
        dist.barrier()
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engine, optimizer, schedule = make_engine(model, optimizer, schedule, ds_config)
    start, history = 0, {"losses": [], "step_seconds": []}
    if point is not None:
        start, history = load_resume_point(engine, ckpt_dir, point, plan)
        if point.reshard:
            dist.barrier()  # every rank has read its share of the converted copy
            if rank == 0:
                remove_universal_copy(ckpt_dir, point)
        log(f"[e2e] resumed from {ckpt_dir / point.tag} at step {start}/{total}")
    optimizer_names = trainable  # the only parameters handed to the optimizer
    losses, step_seconds = history["losses"], history["step_seconds"]  # the whole run's, across resumes
    t0, tokens = time.time(), 0
    per_rank = settings.micro_batch * accum
    for step in range(start, total):
        step_start = time.perf_counter()
        epoch, s = divmod(step, steps_per_epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed * 7919 + epoch))
        batch = order[s * settings.global_batch:(s + 1) * settings.global_batch]
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: NCCL reduces GPU tensors only
        for a in range(accum):
            rows = mine[a * settings.micro_batch:(a + 1) * settings.micro_batch]
            loss = engine(**data.batch(rows, device)).loss
            engine.backward(loss)
            engine.step()  # the optimizer steps at the accumulation boundary only
            loss_sum += loss.detach().double()
            tokens += data.tokens(rows) * world
        dist.all_reduce(loss_sum)
        mean_loss = (loss_sum / (world * accum)).item()
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"E2E-QP: non-finite loss at step {step}. Its checkpoints belong to this `e2e_lr`: delete "
                f"{ckpt_dir} and run again with a lower `e2e_lr` (the model E2E-QP starts from is kept)")
        losses.append(mean_loss)
        step_seconds.append(time.perf_counter() - step_start)
        if monitor:
            monitor.scalar("e2e/loss", mean_loss, step)
            monitor.scalar("e2e/lr", schedule.get_last_lr()[0], step)
            monitor.scalar("e2e/step_seconds", step_seconds[-1], step)
            norm = engine.get_global_grad_norm()
            if norm is not None:
                monitor.scalar("e2e/grad_norm", float(norm), step)
        if rank == 0:
            pace = statistics.median(step_seconds[-20:])  # recent steps: the first ones include warm-up costs
            eta = datetime.timedelta(seconds=round(pace * (total - step - 1)))
            log(f"[e2e] step {step + 1}/{total} loss {mean_loss:.4f} lr {schedule.get_last_lr()[0]:.2e} "
                f"{pace:.1f} s/step, eta {eta}")
        if (step + 1) % settings.save_every == 0 or step + 1 == total:
            save_engine_checkpoint(engine, ckpt_dir, f"step{step + 1}",
                                   {"step": step + 1, "plan": plan,
                                    "history": {"losses": losses, "step_seconds": step_seconds}})
            if rank == 0:  # one folder, shared by every node (checked at start-up): one rank prunes it
                prune_checkpoints(ckpt_dir, settings.keep_checkpoints)
    seconds = time.time() - t0
    memory = [None] * world
    dist.all_gather_object(memory, peak_memory_mib(torch.device(device)))
    state_elements = torch.tensor(optimizer_state_elements(optimizer), dtype=torch.int64, device=device)
    dist.all_reduce(state_elements)
    scale_elements = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    inner = getattr(optimizer, "optimizer", optimizer)  # what Adam updated: DeepSpeed's master copies in 16-bit runs
    master_dtypes = sorted({str(p.dtype) for p in inner.state})
    return {"steps": total, "resumed_at": start, "losses": losses, "step_seconds": step_seconds, "optimizer_params": optimizer_names,
            "optimizer_state_elements_all_ranks": int(state_elements), "scale_elements": scale_elements,
            "accumulation_steps": accum, "ranks": world, "seconds": seconds, "optimizer_dtypes": master_dtypes,
            "step_seconds_median": float(torch.tensor(step_seconds).median()) if step_seconds else None,
            "tokens_per_s": tokens / seconds if seconds else 0.0, "peak_memory_mib_per_rank": memory,
            "engine": engine}
