"""Checks before any work: each is one function of the finished RunConfig that returns nothing or
raises PreflightError naming the problem and the fix. `run_checks` runs them in the order of CHECKS
(cheap and local first); the command line calls it right after building the settings, then
`check_plan`, and holds the output folder's lock once every check passed.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .config.run_config import RunConfig
from .run_folder import RunFolder
from .utils.compare import describe_differences, recipe_hint


class PreflightError(ValueError):
    """One line: what is wrong and what to do. Settings are named in backquotes (`seqlen`)."""


def check_layers(cfg: RunConfig) -> None:
    """Every block's linear layers against the bit width and group size, from config.json alone."""
    from .models.loading import check_layers_early
    from .quant import QuantConfigError
    try:
        check_layers_early(cfg.model_config, cfg.quant)
    except QuantConfigError as err:
        raise PreflightError(str(err)) from err


def check_export_formats(cfg: RunConfig) -> None:
    """Each asked export format holds this width, group size and model family (AWQ and GGUF: 4-bit)."""
    from .export.formats import refusals
    model_type = json.loads(cfg.model_config.read_text()).get("model_type") if cfg.model_config else None
    problems = refusals(cfg.export_formats, cfg.quant, model_type)
    if problems:
        raise PreflightError(problems[0])


def check_data_sources(cfg: RunConfig) -> None:
    """Evaluation and calibration sources exist (bundled, a file, or a reachable hub dataset)."""
    from .data.text import DataError, check_source
    from .data.chat import is_chat_source, load_conversations
    sources = [("eval_datasets", d) for d in cfg.evaluation.datasets]
    if cfg.trains_blocks:
        sources.append(("calib_dataset", cfg.blockap.calib_dataset))
    if cfg.trains_e2e:
        sources.append(("e2e_data", cfg.e2e.data))
    for setting, source in sources:
        try:
            if setting == "e2e_data" and is_chat_source(source):
                load_conversations(source)  # every record read and checked (seconds for a large set)
                _check_chat_template(cfg)
            else:
                check_source(source)
        except DataError as err:
            raise PreflightError(f"`{setting}`: {err}") from err


def _check_chat_template(cfg: RunConfig) -> None:
    """Chat data needs the tokenizer's chat template: the one of the model E2E-QP starts from."""
    from transformers import AutoTokenizer

    from .data.text import DataError
    folder = cfg.from_dir if cfg.phase == "e2e" else (cfg.model_config.parent if cfg.model_config else None)
    if folder is None or not (Path(folder) / "tokenizer_config.json").is_file():  # GGUF, hub: checked when loaded
        return
    if not getattr(AutoTokenizer.from_pretrained(str(folder)), "chat_template", None):
        raise DataError(f"the tokenizer in {folder} has no chat template; chat data needs an instruction-tuned "
                        "model's tokenizer (or pass a text source)")


def check_context(cfg: RunConfig) -> None:
    """Windows longer than the model's context are refused up front (config.json, when at hand)."""
    if cfg.model_config is None:
        return
    context = json.loads(cfg.model_config.read_text()).get("max_position_embeddings")
    for setting, value, used in (("seqlen", cfg.blockap.seqlen, cfg.trains_blocks),
                                 ("e2e_seqlen", cfg.e2e.seqlen, cfg.trains_e2e),
                                 ("eval_seqlen", cfg.evaluation.seqlen, bool(cfg.evaluation.datasets))):
        if used and context and value > context:  # zero-shot truncates instead
            raise PreflightError(f"`{setting}` {value} is longer than the model's context ({context} tokens, "
                                 f"max_position_embeddings); use `{setting}` {context} or less")


def check_sequence_parallel(cfg: RunConfig) -> None:
    """A split window needs an attention the split reproduces (models/sequence_split.py)."""
    if (cfg.blockap.sequence_parallel or 1) == 1 or not cfg.trains_blocks or cfg.model_config is None:
        return
    from .models.sequence_split import SplitError, check_family
    try:
        check_family(json.loads(cfg.model_config.read_text()))
    except SplitError as err:
        raise PreflightError(str(err)) from err


def check_deepspeed_config(cfg: RunConfig) -> None:
    """The DeepSpeed file parses, and the global batch splits over micro batches and ranks."""
    if not cfg.trains_e2e:
        return
    from .e2e.ds_config import accumulation_steps, read_ds_config
    try:
        read_ds_config(cfg.e2e.ds_config)
        accumulation_steps(cfg.e2e.global_batch, cfg.e2e.micro_batch, cfg.machine.world)
    except ValueError as err:
        raise PreflightError(str(err)) from err


def check_output_is_a_folder(cfg: RunConfig) -> None:
    if cfg.output.exists() and not cfg.output.is_dir():
        raise PreflightError(f"`output` {cfg.output} is a file, not a folder")


def check_lock(cfg: RunConfig) -> None:
    """One run per output folder: a second is refused at once (rank 0 takes the lock once every check
    passed, and says then when it takes over a stale one)."""
    if cfg.machine.rank != 0:
        return
    from .utils.lock import LockError, check
    try:
        check(cfg.output, cfg.take_over_lock)
    except LockError as err:
        raise PreflightError(str(err)) from err


def check_writable(cfg: RunConfig) -> None:
    """The output folder (or the nearest folder above it that exists) takes new files."""
    if cfg.machine.rank != 0:
        return
    out = cfg.output
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"`output` {out}: {existing} is a file, so no folder can be made there; choose another "
                             "`output`")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise PreflightError(f"`output` {out}: cannot write in {existing} ({err.strerror}); choose a folder you can "
                             "write to") from err


def check_overwrite(cfg: RunConfig) -> None:
    """An overwrite deletes only an eqat-dist run folder, never the model being quantized, the folder
    a phase starts from, or a folder holding either."""
    out = cfg.output
    if not (cfg.overwrite and out.exists()):
        return
    target = out.resolve()
    start = cfg.from_dir if cfg.from_dir != cfg.output else None  # the default: a phase reading its own output
    for setting, value in (("model", cfg.model), ("from_dir", start)):
        path = Path(value).expanduser() if value else None
        if path is not None and path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise PreflightError(f"`output` {out} is or holds the `{setting}` folder {value}; `overwrite` would delete "
                                 "it. Choose another `output`")
    if not RunFolder(out).is_eqat_run():
        raise PreflightError(f"`output` {out} holds files that are not an eqat-dist run; `overwrite` only replaces an "
                             "eqat-dist output folder. Choose another `output` (or empty that folder yourself)")
    unfinished = unfinished_work(cfg)
    if unfinished and not cfg.discard_unfinished and cfg.phase in ("all", "block-ap"):
        raise PreflightError(f"`output` {out} holds an unfinished run of these settings ({unfinished}), which "
                             "`overwrite` would delete: to resume it, run the same command without `overwrite`; to "
                             "delete it and start over, add `discard_unfinished`")


def unfinished_work(cfg: RunConfig) -> str | None:
    """What the output holds of an unfinished run with this command's settings (what the same command
    without `overwrite` would resume), in words; None when there is nothing to resume: no run, a
    finished one, or one of other settings."""
    folder = RunFolder(cfg.output)
    now = cfg.blockap_record()
    try:
        results = folder.read_results()
    except ValueError:
        results = None
    checkpoints = [p.name for p in folder.e2e_checkpoints.glob("step*")] if folder.e2e_checkpoints.is_dir() else []
    if results is not None and not describe_differences(results.get("settings", {}), now, keys=list(now)):
        done = {phase for phase, key in (("block-ap", "quantized"), ("e2e", "quantized_e2e")) if key in results}
        if ({"block-ap", "e2e"} if cfg.continues_to_e2e else {"block-ap"}) <= done:
            return None  # finished: an overwrite redoes it, as asked
        if "block-ap" in done:
            return "Block-AP finished" + (f", E2E-QP checkpoint(s) {', '.join(sorted(checkpoints))}" if checkpoints else "")
    try:
        manifest = json.loads(folder.manifest.read_text())
    except (OSError, ValueError):
        return None
    blocks = folder.block_files()
    if not blocks or describe_differences(manifest, now):
        return None
    return f"{len(blocks)} finished Block-AP block(s)"


def check_start_model(cfg: RunConfig) -> None:
    """--phase e2e/eval start from a packed model of an earlier phase."""
    if cfg.phase in ("e2e", "eval") and not RunFolder(cfg.from_dir).holds_packed_model():
        raise PreflightError(f"`phase` {cfg.phase} needs a packed model from an earlier phase in {cfg.from_dir} "
                             "(pass `from_dir` DIR)")


def finished_phases(cfg: RunConfig) -> set[str]:
    """The phases of this run that the output's results.json says are finished; a results.json of
    other settings is refused, naming each difference."""
    folder = RunFolder(cfg.output)
    try:
        results = folder.read_results()
    except ValueError as err:
        raise PreflightError(f"{folder.settled_results()} is not valid JSON ({err}); pass `overwrite` to start "
                             "again or choose another folder") from err
    if results is None:
        return set()
    now = cfg.blockap_record()
    detail = describe_differences(results.get("settings", {}), now, keys=list(now))
    if detail:
        raise PreflightError(f"`output` {cfg.output} holds a run with other settings ({detail}); run with the "
                             "original settings to continue it, or pass `overwrite`, or choose another folder"
                             + recipe_hint(results.get("settings", {}), now))
    return {phase for phase, key in (("block-ap", "quantized"), ("e2e", "quantized_e2e")) if key in results}


def _continues_a_run(cfg: RunConfig) -> bool:
    """Whether this command may continue what the output folder holds (not a later phase alone, no
    overwrite, something there)."""
    return cfg.phase not in ("e2e", "eval") and not cfg.overwrite and bool(RunFolder(cfg.output).contents())


def check_resume(cfg: RunConfig) -> None:
    """A non-empty output is continued only when it is this run, unfinished; a finished run is redone
    only with an overwrite. (Block-AP's manifest refuses blocks of other settings when they are read.)"""
    if not _continues_a_run(cfg):
        return
    folder = RunFolder(cfg.output)
    done = finished_phases(cfg)
    wanted = {"block-ap", "e2e"} if cfg.continues_to_e2e else {"block-ap"}
    if wanted <= done:
        raise PreflightError(f"`output` {cfg.output} already holds a finished run; pass `overwrite` to redo it or "
                             "choose another folder")
    if not done and not folder.manifest.exists():
        raise PreflightError(f"`output` {cfg.output} exists and is not empty; pass `overwrite` or choose another folder")


def blockap_already_done(cfg: RunConfig) -> bool:
    """Whether this command continues a run whose Block-AP (or RTN) phase finished: it goes on with E2E-QP."""
    return _continues_a_run(cfg) and "block-ap" in finished_phases(cfg)


def check_plan(cfg: RunConfig) -> None:
    """The plan for this machine (planning/), before any work: refused when the run will not fit."""
    if cfg.ignore_plan:
        return
    from .planning import arch_at_hand, gpu_kind, report, settings_for, this_machine

    arch = arch_at_hand(cfg.model_config)
    if arch is None:
        return
    launch, device = cfg.machine.launch, "gpu" if cfg.machine.device.type == "cuda" else "cpu"
    gpu = gpu_kind(cfg.machine.device) if device == "gpu" else "a100"
    phases = {"all": None, "block-ap": ("block-ap", "export", "eval"), "e2e": ("e2e", "export", "eval"),
              "eval": ("eval",)}[cfg.phase]
    result = report(arch, settings_for(cfg, launch.world, launch.local_world, device, gpu), this_machine(cfg.output),
                    phases=phases)
    if result["fits"]:
        return
    needs = "; ".join(f"{p['phase']} needs {p['needed_gib']:.1f} GiB of {p['resource']}, {p['available_gib']:.1f} GiB "
                      "here" for p in result["problems"])
    if result["advice"] and result["fits_with_advice"]:
        fix = f"try {' '.join(result['advice'])}"
    else:
        fix = "no flag makes it fit: use fewer or shorter windows, more ranks or a larger machine"
    raise PreflightError(f"this run will not fit this machine ({needs}); {fix}; `eqat-dist plan` with the same flags "
                         "shows the plan; `ignore_plan` runs anyway")


# The order: the model and data, then the output folder (never touched before every check on it
# passed). The plan (check_plan) comes after them all, when the command line runs it: it needs the rest
# to be sound, and it is the one check a user may skip (`ignore_plan`).
CHECKS = (check_layers, check_export_formats, check_data_sources, check_context, check_sequence_parallel,
          check_deepspeed_config, check_output_is_a_folder, check_lock, check_writable, check_overwrite, check_start_model, check_resume)


def run_checks(cfg: RunConfig, checks=CHECKS) -> None:
    """Every check in order; the first that fails raises."""
    for check in checks:
        check(cfg)
