"""The run settled where it runs: what the flags alone cannot say, resolved by asking the layers that
know it, and this process's place in the job.

`settled(cfg, device)`, in order (each fails with a ConfigError naming the setting, before any long work):
1. (before: the flags as typed settings, ranges checked, by config.from_flags from the declarations alone)
2. names owned here and below: zero-shot tasks (eval), export formats (export), the token split (models);
3. the machine: device, precision, launch exported for DeepSpeed and torch, GPU made current (side
   effects of this process, which is why they are not in config/);
4. the model's config.json when the run needs the model (a hub id is probed, nothing downloaded but it);
5. defaults that depend on the world and on an earlier run in the output folder (the groups' layout,
   student input, correction) and the activation stores' placement (the plan's).

`eqat-dist plan` takes steps 1, 2 and 5 for the world it plans (`for_plan`).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from .blockap.lanes import group_layout
from .cluster.launch import LaunchError, bind_device, export_to_environ, resolve, single_process
from .config.run_config import DTYPES, ConfigError, MachineConfig, RunConfig
from .models.sequence_split import SplitError, check_split
from .pipelines.schedules import schedule_named
from .run_folder import RunFolder


def settled(cfg: RunConfig, device: str) -> tuple[RunConfig, list[str]]:
    """(the run's settings from the flags' (config.from_flags), settled on this machine and `device`; lines
    for the log about defaults chosen from this machine)."""
    cfg = checked_names(cfg)
    machine = settled_machine(device, cfg)
    model_config = model_config_of(cfg)
    cfg = replace(cfg, machine=machine, model_config=model_config)
    return with_resolved_defaults(cfg)


def for_plan(cfg: RunConfig, world: int, node_ranks: int) -> RunConfig:
    """The settings from the flags as a run on `world` ranks (`node_ranks` a node) takes them, for its plan:
    no process started, no model read."""
    cfg = checked_names(cfg)
    b = cfg.blockap
    data_parallel, sequence_parallel = _layout_default(b.data_parallel, b.sequence_parallel, b.batch_size, b.seqlen,
                                                       world, node_ranks, b.student_input)
    student_input, correction, correction_lr = _schedule_defaults(
        b.student_input, b.correction_fraction, b.correction_lr, world // (data_parallel * sequence_parallel), {},
        sequence_parallel > 1)
    return replace(cfg, blockap=replace(b, student_input=student_input, correction_fraction=correction,
                                        correction_lr=correction_lr, data_parallel=data_parallel,
                                        sequence_parallel=sequence_parallel),
                   streams=replace(cfg.streams, placement=cfg.streams.placement or "cpu"))


def checked_names(cfg: RunConfig) -> RunConfig:
    """Step 2: the settings whose values are names or shapes another layer owns, checked there; the export
    formats in the order they are written (gptq_v2 first)."""
    from .data.text import DataError
    from .eval.harness import parse_tasks
    from .export.formats import parse_formats

    try:
        parse_tasks(",".join(cfg.evaluation.zeroshot_tasks))
    except DataError as err:
        raise ConfigError(f"`zeroshot_tasks`: {err}") from err
    try:
        formats = parse_formats(",".join(cfg.export_formats))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    b = cfg.blockap
    if b.sequence_parallel is not None:
        try:
            check_split(b.seqlen, b.sequence_parallel)
        except SplitError as err:
            raise ConfigError(str(err)) from err
    if (b.sequence_parallel or 1) > 1 and cfg.machine.compile:
        raise ConfigError("`compile` does not take the split attention of `sequence_parallel` (a collective inside "
                          "the graph); leave out `compile` or use `sequence_parallel` 1")
    return replace(cfg, export_formats=formats)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ConfigError(f"`device` {spec} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"`device` {spec}: eqat-dist runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device` {spec}: no CUDA device is available; use `device` cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"`device` {spec}: this machine shows {torch.cuda.device_count()} GPU(s) (cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}); check CUDA_VISIBLE_DEVICES")
    return device


def amp_dtype_for(dtype: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 autocast on a GPU, float32 on a CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return None if dtype == "float32" else DTYPES[dtype]


def settled_machine(device_spec: str, cfg: RunConfig) -> MachineConfig:
    """Step 2: the device and this process's place in the job. The launch is exported (RANK, LOCAL_RANK,
    MASTER_ADDR, ...) and the GPU made current before anything touches one; a launcher whose world MPI
    does not see, or a rendezvous port already taken, is refused here."""
    device = resolve_device(device_spec)
    if cfg.streams.placement == "gpu" and device.type != "cuda":
        raise ConfigError("`activations` gpu needs a CUDA device; use `activations` cpu or disk")
    if cfg.streams.on_gpu_gib and device.type != "cuda":
        raise ConfigError("`activations_on_gpu` keeps part of the stores on a GPU and needs a CUDA device; leave it out")
    try:
        launch = single_process(cfg.trains_e2e) if cfg.machine.single_gpu else resolve(rendezvous=cfg.trains_e2e)
    except LaunchError as err:
        raise ConfigError(str(err)) from err
    export_to_environ(launch)
    device = bind_device(device, launch)
    if device.type == "cuda":  # DeepSpeed (engine, zero.Init) reads LOCAL_RANK as the GPU's ordinal
        os.environ["LOCAL_RANK"] = str(device.index)
    return replace(cfg.machine, device=device, amp_dtype=amp_dtype_for(cfg.machine.dtype, device), launch=launch)


def model_config_of(cfg: RunConfig) -> Path | None:
    """Step 3: config.json of `model` when this run needs the model (Block-AP, or the full-precision
    evaluation); None for a GGUF file or a run that never reads the model."""
    from .models.loading import ModelLoadError, model_config_file

    if cfg.phase not in ("all", "block-ap") and cfg.evaluation.skip_fp:
        return None
    try:
        return model_config_file(cfg.model)
    except ModelLoadError as err:
        raise ConfigError(f"`model`: {err}") from err


def _layout_default(data_parallel: int | None, sequence_parallel: int | None, batch_size: int, seqlen: int,
                    world: int, node_ranks: int, student_input: str | None, splittable: bool = True
                    ) -> tuple[int, int]:
    """(D, S) of the Block-AP groups (blockap/lanes.group_layout): as asked, else the paper's exact
    arithmetic on a node's every rank where the schedule keeps it (student), else groups of D. The
    group's D x S ranks must divide the world."""
    if sequence_parallel is not None and world % sequence_parallel:
        raise ConfigError(f"`sequence_parallel` {sequence_parallel} must divide the {world} ranks (a window's tokens "
                          "are split over that many ranks)")
    width = (data_parallel or 1) * (sequence_parallel or 1)
    if data_parallel is not None and world % width:
        what = f"`data_parallel` {data_parallel}" + (f" x `sequence_parallel` {sequence_parallel} = {width} ranks per "
                                                     "group" if sequence_parallel else "")
        raise ConfigError(f"{what} must divide the {world} ranks (groups of equal size)")
    exact = student_input in (None, "student")
    return group_layout(world, node_ranks, batch_size, seqlen, data_parallel, sequence_parallel, exact, splittable)


def _splittable(model_config: Path | None) -> bool:
    """Whether sequence parallelism reproduces this model's attention (models/sequence_split.py)."""
    import json

    from .models.sequence_split import SplitError, check_family
    if model_config is None:
        return False
    try:
        check_family(json.loads(model_config.read_text()))
    except (SplitError, OSError, ValueError):
        return False
    return True


def _schedule_defaults(student_input: str | None, correction: float | None, correction_lr: str | None, groups: int,
                       earlier: dict, split: bool = False) -> tuple:
    """(student input, correction, correction lr) with what was not asked for filled in: student (the
    paper's arithmetic) with one group of ranks or with sequence-parallel groups (one a node), pipelined
    with several groups of D; pipelined: 1/G of each block's steps on the quantized stream (the most that
    keeps G groups busy, planning/timeline.py) and one cosine through them. A run resumed on another
    number of ranks keeps what its earlier part used (`earlier`)."""
    student_input = student_input or earlier.get("student_input") or \
        ("pipelined" if groups > 1 and not split else "student")
    if not schedule_named(student_input).has_correction:
        return student_input, None, None  # a correction asked for a schedule without one means nothing
    if correction is None:
        correction = earlier.get("correction_fraction") or 1.0 / groups
    correction_lr = correction_lr or earlier.get("correction_lr") or "continue"
    return student_input, correction, correction_lr


def with_resolved_defaults(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """Step 4: the schedule's defaults from the world and the run being continued, the activation
    stores' placement from the plan. Returns the config and the lines that say what was chosen."""
    folder = RunFolder(cfg.output)
    earlier = {} if cfg.overwrite else folder.earlier_settings()
    b = cfg.blockap
    launch = cfg.machine.launch
    data_parallel, sequence_parallel = _layout_default(
        b.data_parallel, b.sequence_parallel, b.batch_size, b.seqlen, launch.world, launch.local_world,
        b.student_input or earlier.get("student_input"), _splittable(cfg.model_config))
    student_input, correction, correction_lr = _schedule_defaults(b.student_input, b.correction_fraction,
                                                                  b.correction_lr,
                                                                  launch.world // (data_parallel * sequence_parallel),
                                                                  earlier, sequence_parallel > 1)
    cfg = replace(cfg, blockap=replace(b, student_input=student_input, correction_fraction=correction,
                                       correction_lr=correction_lr, data_parallel=data_parallel,
                                       sequence_parallel=sequence_parallel))
    cfg = replace(cfg, streams=replace(cfg.streams, folder=cfg.streams.folder or folder.activations))
    notes = []
    if cfg.streams.placement is None:
        placement, on_gpu, note = placement_for(cfg)
        cfg = replace(cfg, streams=replace(cfg.streams, placement=placement,
                                           on_gpu_gib=cfg.streams.on_gpu_gib if on_gpu is None else on_gpu))
        notes += [note] if note else []
    return cfg, notes


def placement_for(cfg: RunConfig) -> tuple[str, float | None, str | None]:
    """Without `activations`: the stores stay in host memory when the node's ranks fit them within
    `host_memory_budget`; else, on GPUs (and `activations_on_gpu` not given), part of each stays on the
    GPU when the memory a block's training leaves free takes enough; else they go to disk (memory-mapped).
    Returns (placement, GiB per rank on the GPU or None, the line saying so)."""
    import torch

    from .planning import GIB, Machine, arch_at_hand, host_memory, settings_for
    from .planning.estimate import block_ap
    from .planning.fit import node_host, stores_on_gpu_to_fit

    arch = arch_at_hand(cfg.model_config)
    if arch is None or not cfg.trains_blocks:
        return "cpu", None, None
    launch, device = cfg.machine.launch, cfg.machine.device
    in_memory = replace(cfg, streams=replace(cfg.streams, placement="cpu"))
    settings = settings_for(in_memory, launch.world, launch.local_world, "gpu" if device.type == "cuda" else "cpu")
    budget = (cfg.streams.host_memory_budget_gib or 0.9 * host_memory() / GIB) * GIB
    need = node_host("block-ap", block_ap(arch, settings), settings)
    if need <= budget:
        return "cpu", None, None
    over = (f"[plan] activation stores in host memory would take {need / GIB:.1f} GiB on this node, over the "
            f"{budget / GIB:.1f} GiB budget: ")
    if device.type == "cuda" and cfg.streams.on_gpu_gib is None:
        gpu = Machine(gpu_memory=torch.cuda.get_device_properties(device).total_memory, host_memory=budget, disk=None)
        on_gpu = stores_on_gpu_to_fit(arch, settings, gpu)
        if on_gpu is not None:
            return "cpu", on_gpu / GIB, over + (
                f"{on_gpu / GIB:.0f} GiB of them per rank stay on the GPU, in the memory a block's training leaves free; "
                "pass `activations` disk to keep the GPU's memory free")
    return "disk", None, over + (f"they go to disk ({cfg.streams.folder}, memory-mapped); pass `activations` cpu "
                                 "to keep them in memory")
