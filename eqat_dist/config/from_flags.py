"""The RunConfig from the parsed flags, the one reader of the Namespace: each part read from its declared
settings (declare.py), ranges and combinations checked, the recipe's choices and the per-width learning
rates filled in. Pure: no process, no model, no machine; what needs them is settled above (settle.py).
"""
from __future__ import annotations

from pathlib import Path

from ..quant import QuantConfig, QuantConfigError
from ..utils.stop import parse_signals
from .declare import RangeError, check_ranges, comma_list, part_from_flags
from .recipes import recipe_choice
from .run_config import (MODEL_REQUIRED, SETTING_PARTS, BlockAPConfig, ConfigError, E2EConfig, EvalConfig,
                         MachineConfig, RunConfig, StreamsConfig, per_width_lr)


def settings_from_flags(flags) -> RunConfig:
    """The flags as typed settings, values checked; what is left to the world, the model or the plan is
    None (the layout, student input, correction, activation placement)."""
    if not flags.model:
        raise ConfigError(MODEL_REQUIRED)
    try:
        quant = part_from_flags(QuantConfig, flags, init=recipe_choice(flags.recipe, flags.wbits, "init", flags.init))
        check_ranges(SETTING_PARTS, flags)
    except (QuantConfigError, RangeError) as err:
        raise ConfigError(str(err)) from err
    if flags.epochs > 0 and flags.train_size < 1:
        raise ConfigError("`train_size` must be >= 1 when `epochs` > 0")
    if quant.init == "gptq" and flags.epochs == 0 and flags.phase in ("all", "block-ap"):
        raise ConfigError("`init` gptq starts Block-AP from GPTQ on its calibration windows, and `epochs` 0 runs no "
                          "Block-AP: use `epochs` 1 or more, or `init` minmax or clip for round-to-nearest")
    if flags.correction_fraction is not None and not 0 <= flags.correction_fraction <= 1:
        raise ConfigError("`correction_fraction` must be between 0 and 1 (the share of steps on the quantized stream)")
    if flags.activations_on_gpu and flags.activations == "gpu":
        raise ConfigError("`activations` gpu keeps every store on the GPU already: leave out `activations_on_gpu`")
    if flags.data_parallel is not None and flags.batch_size % flags.data_parallel:
        raise ConfigError(f"`batch_size` {flags.batch_size} is the global batch and must split evenly over the "
                          f"{flags.data_parallel} ranks of a `data_parallel` group: use a multiple of "
                          f"{flags.data_parallel}")
    blockap = part_from_flags(BlockAPConfig, flags, weight_lr=per_width_lr(flags.weight_lr, flags.wbits),
                              loss=recipe_choice(flags.recipe, flags.wbits, "loss", flags.loss))
    e2e = part_from_flags(E2EConfig, flags, lr=per_width_lr(flags.e2e_lr, flags.wbits),
                          data=flags.e2e_data or flags.calib_dataset)
    evaluation = part_from_flags(EvalConfig, flags)
    streams = part_from_flags(StreamsConfig, flags)
    try:
        stop_signals = parse_signals(",".join(comma_list(flags.stop_signals)))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if flags.discard_unfinished and not flags.overwrite:
        raise ConfigError("`discard_unfinished` goes with `overwrite` (start over in an output that holds an "
                          "unfinished run); alone it would resume that run")
    machine = part_from_flags(MachineConfig, flags, stop_signals=stop_signals)
    return part_from_flags(
        RunConfig, flags, output=Path(flags.output) if flags.output else Path(), quant=quant, blockap=blockap,
        streams=streams, e2e=e2e, evaluation=evaluation, machine=machine, from_dir=_start_folder(flags))


def _start_folder(flags) -> Path | None:
    """--phase e2e/eval start from a packed model: --from, else the output folder itself."""
    if flags.phase in ("e2e", "eval"):
        return Path(flags.from_dir or flags.output)
    return Path(flags.from_dir) if flags.from_dir else None
