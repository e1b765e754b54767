"""The RunConfig builder: the one place that reads the parsed flags. Values are checked, the process's
place in the job is settled (dist launch, device bound), and every default is resolved here, so that a
run and the command resuming it can be compared setting by setting.

Steps, in order (each fails with a ConfigError naming the setting, before any long work):
1. values: ranges, bit width and group size, learning rates, task names;
2. machine: device, precision, launch (exported for DeepSpeed and torch, GPU made current);
3. model: its config.json when the run needs the model (a hub id is probed, nothing downloaded but it);
4. defaults that depend on the world and on an earlier run in the output folder (student input,
   correction, activation placement).
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..blockap.lanes import group_layout
from ..cluster.launch import LaunchError, bind_device, export_to_environ, resolve, single_process
from ..models.sequence_split import SplitError, check_split
from ..pipelines.schedules import schedule_named
from ..quant import QuantConfig, QuantConfigError
from ..run_folder import RunFolder
from ..utils.stop import parse_signals
from .recipes import recipe_choice
from .run_config import (DTYPES, BlockAPConfig, ConfigError, E2EConfig, EvalConfig, MachineConfig, RunConfig,
                         StreamsConfig)


def build_run_config(flags) -> tuple[RunConfig, list[str]]:
    """(the run's settings, lines for the log about defaults chosen from this machine)."""
    cfg = settings_from_flags(flags)
    machine = settled_machine(flags, cfg)
    model_config = model_config_of(cfg)
    cfg = replace(cfg, machine=machine, model_config=model_config)
    return with_resolved_defaults(cfg)


def _at_least(flags, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(flags, name) < minimum:
            raise ConfigError(f"`{name}` must be >= {minimum}")


def _finite(name: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ConfigError(f"`{name}` {value} must be a finite number >= 0")


def settings_from_flags(flags, world: int | None = None, node_ranks: int | None = None) -> RunConfig:
    """Step 1: the flags as typed settings, values checked. `world` (a plan's ranks; `node_ranks` of them
    on each node) resolves the world-dependent defaults at once; a run resolves them later
    (`with_resolved_defaults`)."""
    from ..blockap.trainer import default_weight_lr
    from ..data.text import DataError
    from ..e2e.trainer import default_e2e_lr
    from ..eval.harness import parse_tasks

    if not flags.model:
        raise ConfigError("`model` is required (a hub id, a folder, a .gguf file or smollm2-135m)")
    try:
        quant = QuantConfig(flags.wbits, flags.group_size, recipe_choice(flags.recipe, flags.wbits, "init", flags.init),
                            flags.grid)
    except QuantConfigError as err:
        raise ConfigError(str(err)) from err
    _at_least(flags, 0, "epochs", "train_size", "val_size", "e2e_epochs", "e2e_train_size", "e2e_keep_checkpoints")
    _at_least(flags, 1, "batch_size", "seqlen", "eval_seqlen", "eval_batch_size", "e2e_seqlen", "e2e_global_batch",
              "e2e_micro_batch", "e2e_save_every")
    if flags.epochs > 0 and flags.train_size < 1:
        raise ConfigError("`train_size` must be >= 1 when `epochs` > 0")
    if quant.init == "gptq" and flags.epochs == 0 and flags.phase in ("all", "block-ap"):
        raise ConfigError("`init` gptq starts Block-AP from GPTQ on its calibration windows, and `epochs` 0 runs no "
                          "Block-AP: use `epochs` 1 or more, or `init` minmax or clip for round-to-nearest")
    if flags.peer_timeout < 5:
        raise ConfigError("`peer_timeout` must be >= 5 seconds")
    if flags.correction_fraction is not None and not 0 <= flags.correction_fraction <= 1:
        raise ConfigError("`correction_fraction` must be between 0 and 1 (the share of steps on the quantized stream)")
    if flags.activations_on_gpu is not None and flags.activations_on_gpu < 0:
        raise ConfigError("`activations_on_gpu` must be >= 0 (GiB per rank of the stores kept on the GPU)")
    if flags.activations_on_gpu and flags.activations == "gpu":
        raise ConfigError("`activations` gpu keeps every store on the GPU already: leave out `activations_on_gpu`")
    if flags.min_lr_factor < 1:
        raise ConfigError("`min_lr_factor` must be >= 1 (the cosine ends at lr / factor)")
    weight_lr = default_weight_lr(flags.wbits) if flags.weight_lr is None else flags.weight_lr
    e2e_lr = default_e2e_lr(flags.wbits) if flags.e2e_lr is None else flags.e2e_lr
    for name, value in (("quant_lr", flags.quant_lr), ("weight_lr", weight_lr), ("e2e_lr", e2e_lr),
                        ("max_grad_norm", flags.max_grad_norm), ("e2e_max_grad_norm", flags.e2e_max_grad_norm),
                        ("e2e_warmup", flags.e2e_warmup)):
        _finite(name, value)
    tasks = flags.zeroshot_tasks
    try:
        tasks = parse_tasks(tasks or "") if isinstance(tasks, str) else list(tasks)
    except DataError as err:
        raise ConfigError(f"`zeroshot_tasks`: {err}") from err
    if flags.zeroshot_limit is not None and flags.zeroshot_limit < 2:
        raise ConfigError("`zeroshot_limit` must be >= 2 (items per task)")
    if flags.eval_max_windows is not None and flags.eval_max_windows < 1:
        raise ConfigError("`eval_max_windows` must be >= 1 (leave it out for every window)")
    if flags.data_parallel is not None:
        if flags.data_parallel < 1:
            raise ConfigError("`data_parallel` must be >= 1 (ranks per group)")
        if flags.batch_size % flags.data_parallel:
            raise ConfigError(f"`batch_size` {flags.batch_size} is the global batch and must split evenly over the "
                              f"{flags.data_parallel} ranks of a `data_parallel` group: use a multiple of "
                              f"{flags.data_parallel}")
    sequence_parallel = flags.sequence_parallel
    if sequence_parallel is not None:
        try:
            check_split(flags.seqlen, sequence_parallel)
        except SplitError as err:
            raise ConfigError(str(err)) from err
    if (sequence_parallel or 1) > 1 and flags.compile:
        raise ConfigError("`compile` does not take the split attention of `sequence_parallel` (a collective inside "
                          "the graph); leave out `compile` or use `sequence_parallel` 1")
    student_input, correction, correction_lr = flags.student_input, flags.correction_fraction, flags.correction_lr
    data_parallel = flags.data_parallel
    if world is not None:
        data_parallel, sequence_parallel = _layout_default(data_parallel, sequence_parallel, flags.batch_size,
                                                           flags.seqlen, world, node_ranks or world, student_input)
        student_input, correction, correction_lr = _schedule_defaults(student_input, correction, correction_lr,
                                                                      world // (data_parallel * sequence_parallel), {},
                                                                      sequence_parallel > 1)
    blockap = BlockAPConfig(
        epochs=flags.epochs, batch_size=flags.batch_size, train_size=flags.train_size, val_size=flags.val_size,
        seqlen=flags.seqlen, quant_lr=flags.quant_lr, weight_lr=weight_lr, min_lr_factor=flags.min_lr_factor,
        max_grad_norm=flags.max_grad_norm, train_norms=not flags.no_train_norms, calib_dataset=flags.calib_dataset,
        student_input=student_input, correction_fraction=correction, correction_lr=correction_lr,
        data_parallel=data_parallel, sequence_parallel=sequence_parallel,
        loss=recipe_choice(flags.recipe, flags.wbits, "loss", flags.loss))
    e2e = E2EConfig(
        epochs=flags.e2e_epochs, train_size=flags.e2e_train_size, seqlen=flags.e2e_seqlen,
        global_batch=flags.e2e_global_batch, micro_batch=flags.e2e_micro_batch, lr=e2e_lr, warmup=flags.e2e_warmup,
        max_grad_norm=flags.e2e_max_grad_norm, save_every=flags.e2e_save_every,
        keep_checkpoints=flags.e2e_keep_checkpoints, grad_checkpointing=not flags.no_grad_checkpointing,
        ds_config=flags.ds_config, data=flags.e2e_data or flags.calib_dataset)
    evaluation = EvalConfig(
        datasets=tuple(d for d in flags.eval_datasets.split(",") if d), seqlen=flags.eval_seqlen,
        max_windows=flags.eval_max_windows, batch_size=flags.eval_batch_size, zeroshot_tasks=tuple(tasks),
        zeroshot_limit=flags.zeroshot_limit, skip_fp=flags.skip_fp_eval)
    placement = (flags.activations or "cpu") if world is not None else flags.activations  # None: chosen later
    streams = StreamsConfig(placement=placement,
                            folder=Path(flags.activations_dir) if flags.activations_dir else None,
                            host_memory_budget_gib=flags.host_memory_budget, on_gpu_gib=flags.activations_on_gpu)
    try:
        stop_signals = parse_signals(flags.stop_signals)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if flags.discard_unfinished and not flags.overwrite:
        raise ConfigError("`discard_unfinished` goes with `overwrite` (start over in an output that holds an "
                          "unfinished run); alone it would resume that run")
    machine = MachineConfig(dtype=flags.dtype, single_gpu=flags.single_gpu, peer_timeout=flags.peer_timeout,
                            kernels=not flags.no_kernels, compile=flags.compile,
                            weight_work=flags.weight_work, stop_signals=stop_signals)
    return RunConfig(
        model=flags.model, output=Path(flags.output) if flags.output else Path(), quant=quant, blockap=blockap,
        streams=streams, e2e=e2e, evaluation=evaluation, machine=machine, phase=flags.phase,
        from_dir=_start_folder(flags), seed=flags.seed,
        export_dtype=flags.export_dtype, export_formats=_export_formats(flags.export_format),
        tensorboard=not flags.no_tensorboard, overwrite=flags.overwrite,
        discard_unfinished=flags.discard_unfinished, take_over_lock=flags.take_over_lock,
        ignore_plan=flags.ignore_plan, debug=flags.debug)


def _export_formats(text: str) -> tuple[str, ...]:
    from ..export.formats import parse_formats
    try:
        return parse_formats(text)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _start_folder(flags) -> Path | None:
    """--phase e2e/eval start from a packed model: --from, else the output folder itself."""
    if flags.phase in ("e2e", "eval"):
        return Path(flags.from_dir or flags.output)
    return Path(flags.from_dir) if flags.from_dir else None


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


def settled_machine(flags, cfg: RunConfig) -> MachineConfig:
    """Step 2: the device and this process's place in the job. The launch is exported (RANK, LOCAL_RANK,
    MASTER_ADDR, ...) and the GPU made current before anything touches one; a launcher whose world MPI
    does not see, or a rendezvous port already taken, is refused here."""
    device = resolve_device(flags.device)
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
    from ..models.loading import ModelLoadError, model_config_file

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

    from ..models.sequence_split import SplitError, check_family
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
        return student_input, correction, correction_lr
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

    from ..planning import GIB, Machine, arch_at_hand, host_memory, settings_for
    from ..planning.estimate import block_ap
    from ..planning.fit import node_host, stores_on_gpu_to_fit

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
