"""Plan a run before it starts: per-rank memory, disk and time of each phase, from config.json alone.

`eqat-dist plan ...` prints the plan for a machine you describe; every normal run plans itself for the
machine it is on first and refuses, in seconds, a run that will not fit (--ignore-plan runs anyway).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .arch import PLANNING_MODELS, Arch, PlanError, load_arch
from .estimate import GIB, Settings, plan
from .fit import Machine, render, report, to_json
from ..utils.settings import trains_e2e

__all__ = ["GIB", "Arch", "Machine", "PLANNING_MODELS", "PlanError", "Settings", "load_arch", "plan", "render", "report",
           "host_memory", "settings_from_args", "this_machine", "to_json"]


def _ds_stage_offload(ds_config: str) -> tuple[int, bool]:
    from ..e2e.ds_config import read_ds_config
    try:
        zero = read_ds_config(ds_config).get("zero_optimization", {})
    except ValueError:
        return 3, True  # the run itself refuses the file; plan as the default
    return zero.get("stage", 0), zero.get("offload_param", {}).get("device") == "cpu"


def settings_from_args(args, ranks: int, ranks_per_node: int, device: str, gpu: str = "a100",
                       tflops: float | None = None) -> Settings:
    """The plan's settings from the normal command's flags (parsed, before or after validation)."""
    tasks = args.zeroshot_tasks
    tasks = tuple(t.strip() for t in tasks.split(",") if t.strip()) if isinstance(tasks, str) else tuple(tasks)
    stage, offload = _ds_stage_offload(args.ds_config)
    if args.dtype == "auto":
        act_bytes = 2 if device == "gpu" else 4
    else:
        act_bytes = 4 if args.dtype == "float32" else 2
    return Settings(
        ranks=ranks, ranks_per_node=ranks_per_node, device=device, gpu=gpu, bits=args.wbits,
        group_size=args.group_size, epochs=args.epochs, train_size=args.train_size, val_size=args.val_size,
        seqlen=args.seqlen, batch_size=args.batch_size, activations=args.activations or "cpu", act_bytes=act_bytes,
        student_input=args.student_input, correction=args.correction_fraction or 1.0 / ranks, e2e_epochs=args.e2e_epochs if trains_e2e(args) else 0,
        e2e_train_size=args.e2e_train_size, e2e_seqlen=args.e2e_seqlen, e2e_micro_batch=args.e2e_micro_batch,
        e2e_global_batch=args.e2e_global_batch, grad_checkpointing=not args.no_grad_checkpointing,
        zero_stage=stage, offload=offload, keep_checkpoints=args.e2e_keep_checkpoints or 10,
        eval_datasets=tuple(d for d in args.eval_datasets.split(",") if d), eval_seqlen=args.eval_seqlen,
        eval_batch_size=args.eval_batch_size, eval_max_windows=args.eval_max_windows, zeroshot_tasks=tasks,
        zeroshot_limit=args.zeroshot_limit, skip_fp_eval=args.skip_fp_eval, tflops=tflops)


def host_memory() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def this_machine(output: str) -> Machine:
    import torch

    gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() else None
    folder = Path(output).expanduser().resolve()
    while not folder.exists():
        folder = folder.parent
    return Machine(gpu_memory=gpu, host_memory=host_memory(), disk=shutil.disk_usage(folder).free)
