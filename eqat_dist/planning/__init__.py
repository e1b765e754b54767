"""Plan a run before it starts: per-rank memory, disk and time of each phase, from config.json alone.

`eqat-dist plan ...` prints the plan for a machine you describe; every normal run plans itself for the
machine it is on first and refuses, in seconds, a run that will not fit (--ignore-plan runs anyway).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from .arch import PLANNING_MODELS, Arch, PlanError, load_arch
from .estimate import GIB, ZERO_REDUCE_BUCKET, Settings, plan, resolved
from .fit import Machine, render, report, to_json

__all__ = ["GIB", "Arch", "Machine", "PLANNING_MODELS", "PlanError", "Settings", "load_arch", "plan", "render", "report",
           "arch_at_hand", "gpu_kind", "host_memory", "settings_for", "splits_weight_work", "this_machine", "to_json"]


def _ds_zero(ds_config: str) -> tuple[int, bool, int]:
    """(ZeRO stage, parameters offloaded to the CPU, gradient bucket in elements) of a DeepSpeed config."""
    from ..e2e.ds_config import read_ds_config
    try:
        zero = read_ds_config(ds_config).get("zero_optimization", {})
    except ValueError:
        return 3, True, ZERO_REDUCE_BUCKET  # the run itself refuses the file; plan as the default
    return (zero.get("stage", 0), zero.get("offload_param", {}).get("device") == "cpu",
            int(zero.get("reduce_bucket_size", ZERO_REDUCE_BUCKET)))


def settings_for(cfg, ranks: int, ranks_per_node: int, device: str, gpu: str = "a100",
                 tflops: float | None = None, link_gbs: float | None = None, network_gbs: float | None = None
                 ) -> Settings:
    """The plan's settings for a run's RunConfig (config/run_config.py) on `ranks` ranks: its parts as
    they are, E2E-QP's epochs 0 where the run trains none, the DeepSpeed config read."""
    stage, offload, bucket = _ds_zero(cfg.e2e.ds_config)
    return Settings(
        quant=cfg.quant, blockap=cfg.blockap, streams=replace(cfg.streams, placement=cfg.streams.placement or "cpu"),
        e2e=cfg.e2e if cfg.trains_e2e else replace(cfg.e2e, epochs=0), evaluation=cfg.evaluation, machine=cfg.machine,
        ranks=ranks, ranks_per_node=ranks_per_node, device=device, gpu=gpu, link_gbs=link_gbs,
        network_gbs=network_gbs, zero_stage=stage, offload=offload, zero_bucket=bucket, tflops=tflops)


def arch_at_hand(model_config: Path | None) -> Arch | None:
    """The architecture from a model's config.json when the run has one (None: a GGUF file, or a
    config the planner does not know)."""
    if model_config is None:
        return None
    try:
        return load_arch(str(model_config))
    except PlanError:
        return None


def host_memory() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def this_machine(output) -> Machine:
    import torch

    gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() else None
    folder = Path(output).expanduser().resolve()
    while not folder.exists():
        folder = folder.parent
    return Machine(gpu_memory=gpu, host_memory=host_memory(), disk=shutil.disk_usage(folder).free)


def gpu_kind(device) -> str:
    """The plan's name for this process's GPU (its time figures): h200, h100, else a100."""
    import torch

    name = torch.cuda.get_device_name(device).lower()
    return next((g for g in ("h200", "h100") if g in name), "a100")


def splits_weight_work(cfg) -> bool:
    """Whether a run's Block-AP groups split the work on the block's weights: as `weight_work` says; auto:
    on CPUs (where it is a third of a step, docs/benchmarks.md), and on GPUs where the plan finds the
    split (the owners' broadcasts, the reduces to them) faster than every rank repeating the work."""
    m = cfg.machine
    if m.weight_work != "auto" or m.device.type != "cuda" or cfg.blockap.group_size == 1:
        return m.splits_weight_work
    arch = arch_at_hand(cfg.model_config)
    if arch is None:
        return False
    launch = m.launch
    settings = settings_for(cfg, launch.world, launch.local_world, "gpu", gpu_kind(m.device))
    return resolved(arch, settings).splits_weight_work
