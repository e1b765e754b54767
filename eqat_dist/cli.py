"""`eqat-dist` / `launch/run.py`: the flags and the config file, parsed once into a RunConfig
(config/from_flags.py), checked before any work (preflight.py), then handed to the runner. Library
messages name settings in backquotes (`group_size`); here they become the flags (--group-size)."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
import os
import re
import sys
from pathlib import Path

if not sys.stderr.isatty():  # a log file: the libraries' progress bars (read at tqdm's import) are noise there
    os.environ.setdefault("TQDM_DISABLE", "1")

from .export.formats import ALL_FORMATS
from .config.recipes import DEFAULT_RECIPES, RECIPES
from .blockap.losses import LOSSES
from .pipelines.schedules import SCHEDULES
from .config import ConfigError, RunConfig
from .config.declare import add_flags
from .config.run_config import MODEL_REQUIRED, SETTING_PARTS, SETTING_TITLES, Invocation
from .preflight import PreflightError, check_plan, run_checks
from .config.from_flags import settings_from_flags
from .settle import for_plan, settled
from .utils.stop import exit_code, signal_name, stop_on


class UsageError(ValueError):
    """Bad arguments: reported as one clear line before any work starts."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eqat-dist", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="EfficientQAT quantization to 2-8 bits: Block-AP, then E2E-QP, then evaluation and the export.",
        epilog="other commands:\n"
               "  eqat-dist plan ...    memory, disk and time of each phase for these flags on a machine, before a run\n"
               "                        (eqat-dist plan --help)\n"
               "  eqat-dist export ...  convert a finished run's export into a serving format (eqat-dist export --help)\n"
               "\nA stopped or failed run resumes with the same command (without --overwrite); "
               "`--phase eval --from RUN` evaluates a run's model at the run's own settings.")
    p.add_argument("--config", help="YAML or JSON file of settings (keys as the flags, '-' or '_'); flags override it")
    p.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="the method's choices as a bundle (config/recipes.py): paper = the paper's (min/max start, "
                        "MSE), clip-huber = clip start and Huber loss; default: the best measured at --wbits "
                        f"({', '.join(f'{r} at {b} bits' for b, r in DEFAULT_RECIPES.items())}, else paper; "
                        "docs/benchmarks.md); --init and --loss override one choice")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    # every other flag is a setting declared once, with its default, beside its field (config/declare.py)
    add_flags(p, SETTING_PARTS, titles=SETTING_TITLES, owned={
        "loss": {"choices": LOSSES},
        "student_input": {"choices": tuple(SCHEDULES), "help": (
            "; ".join(f"{s.name}: {s.summary}" for s in SCHEDULES.values()) + ". Across groups of ranks "
            "(--data-parallel); default: student with one group, pipelined with several (a resumed run keeps the "
            "mode it started with)")},
        "export_format": {"help": f"formats of the exported model, comma-separated, from {', '.join(ALL_FORMATS)}: "
                                  "gptq_v2 is always written into the output (evaluation and E2E-QP read it), every "
                                  "other format beside it in OUTPUT/export-FORMAT/ (eqat_dist/export/formats.py)"}})
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p


def build_plan_parser() -> argparse.ArgumentParser:
    """`eqat-dist plan`: every flag of a run, plus the machine to plan for."""
    p = build_parser()
    p.epilog = None
    p.prog, p.description = "eqat-dist plan", ("Per-rank GPU memory, host memory, disk and time of each phase, "
                                               "from the model's config.json alone (no weights read). Exit 0 "
                                               "when the run fits, 1 when it does not.")
    p.add_argument("--ranks", type=int, default=1, help="ranks (GPUs) in all")
    p.add_argument("--ranks-per-node", type=int, default=None, help="default: min(ranks, 8)")
    p.add_argument("--gpu-memory", type=float, default=None,
                   help="GiB per GPU; 0 plans a CPU-only run (default: this machine's GPU, else 80)")
    p.add_argument("--host-memory", type=float, default=None, help="GiB per node (default: this machine's)")
    p.add_argument("--disk", type=float, default=None, help="free GiB where the run writes (default: unchecked)")
    p.add_argument("--gpu", default=None, choices=["a100", "h100", "h200", "cpu"],
                   help="for the time estimate (default: this machine's GPU where it is one of these, else a100)")
    p.add_argument("--tflops", type=float, default=None, help="achieved TFLOP/s, replacing the built-in figures")
    p.add_argument("--link-gbs", type=float, default=None,
                   help="GB/s of a collective inside a node (NCCL bus bandwidth; default: by --gpu, the assumptions line)")
    p.add_argument("--network-gbs", type=float, default=None,
                   help="GB/s of a collective across nodes (default 20: one 200 Gb/s port per GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--terms", action="store_true", help="also list what each peak is made of")
    return p


def _load_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - JSON, UTF-8 and YAML errors (yaml is imported lazily)
        kind = "YAML" if file.suffix in (".yaml", ".yml") else "JSON"
        raise UsageError(f"--config {path} is not valid {kind}: {' '.join(str(err).split())[:200]}") from err
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} holds a {type(data).__name__}, not a mapping of settings "
                         "(e.g. `wbits: 2` per line)")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# Flags a later phase does not take from the run it starts from (`--phase e2e|eval --from RUN`): where
# this command runs and writes, and how this process behaves; everything else is the run's unless given.
NOT_INHERITED = {"config", "phase", "from_dir", "output", "overwrite", "discard_unfinished", "take_over_lock",
                 "ignore_plan", "debug", "local_rank", "device", "single_gpu", "peer_timeout", "stop_signals",
                 "activations", "activations_dir", "activations_on_gpu", "host_memory_budget", "data_parallel",
                 "sequence_parallel"}


def inherited_flags(run: str, parser: argparse.ArgumentParser) -> dict:
    """The settings the run in folder `run` was made with (its results.json), as this parser's defaults."""
    from .run_folder import RunFolder
    try:
        recorded = RunFolder(run).recorded_flags()
    except ValueError as err:
        raise UsageError(f"--from {run}: its results.json is not valid JSON ({err}); pass the settings as flags") from err
    known = {a.dest for a in parser._actions}
    return {k: v for k, v in recorded.items() if k in known and k not in NOT_INHERITED}


def parse_flags(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The flags over the config file's settings over, for `--phase e2e|eval --from RUN`, the settings
    RUN was made with (the command line wins, then the file, then the run)."""
    parser = parser or build_parser()
    pre, _ = parser.parse_known_args(argv)
    file_values = {}
    if pre.config:
        known = {a.dest for a in parser._actions}
        file_values = _load_config_file(pre.config)
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise UsageError(f"--config {pre.config}: unknown settings {', '.join(unknown)}")
        parser.set_defaults(**file_values)
        pre, _ = parser.parse_known_args(argv)
    later_phase = pre.phase in ("e2e", "eval") and pre.from_dir
    if later_phase:
        parser.set_defaults(**(inherited_flags(pre.from_dir, parser) | file_values))
    flags = parser.parse_args(argv)
    if later_phase and not flags.output:
        flags.output = flags.from_dir  # the phase's results go beside the model it starts from
    if not flags.model:
        raise UsageError(MODEL_REQUIRED + (f"; {flags.from_dir} has no results.json that names it" if later_phase else ""))
    if not flags.output:
        raise UsageError("--output is required")
    return flags


def command_line(flags: dict, parser: argparse.ArgumentParser | None = None) -> str:
    """`eqat-dist` and the flags that give `flags` (a Namespace's values) again: every value that is not
    the parser's own default. What results.json records as the run's command."""
    import shlex

    parser = parser or build_parser()
    words = ["eqat-dist"]
    for action in parser._actions:
        if not action.option_strings or action.dest not in flags or action.dest in ("config", "local_rank"):
            continue
        value, flag = flags[action.dest], next(o for o in action.option_strings if o.startswith("--"))
        if value == action.default or value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            words += [flag] if value else []
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def invocation(argv, flags: argparse.Namespace) -> Invocation:
    """What made this run, for results.json: the command as typed, every flag's value, and the command
    line that gives them again (the config file's settings written out as flags)."""
    values = {k: v for k, v in vars(flags).items() if k not in ("config", "local_rank")}
    return Invocation(argv=tuple(sys.argv[1:] if argv is None else argv), flags=values, command=command_line(values))


def _flags_by_setting(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
            for a in parser._actions if a.option_strings}


def flag_message(message: str, parser: argparse.ArgumentParser | None = None) -> str:
    """A library message with its settings (`group_size`) named as this command's flags (--group-size)."""
    flags = _flags_by_setting(parser or build_plan_parser())
    return re.sub(r"`([a-z_0-9]+)`", lambda m: flags.get(m.group(1), m.group(1)), message)


def settings(argv=None, plan: bool = False) -> tuple[RunConfig, list[str]]:
    """(the run's settings, lines for the log): parsed, built and checked (and planned with `plan`),
    or UsageError with the flags named."""
    try:
        flags = parse_flags(argv)
        cfg, notes = settled(settings_from_flags(flags), flags.device)
        cfg = replace(cfg, invocation=invocation(argv, flags))
        run_checks(cfg)
        if plan:
            check_plan(cfg)
    except (ConfigError, PreflightError) as err:
        raise UsageError(flag_message(str(err))) from err
    return cfg, notes


def parse_args(argv=None) -> RunConfig:
    """The run's settings from a command line, every check but the plan passed."""
    return settings(argv)[0]


def plan_main(argv) -> int:
    from .planning import GIB, Machine, PlanError, load_arch, render, report, settings_for, to_json
    from .planning import host_memory

    parser = build_plan_parser()
    args = parser.parse_args(argv)
    if not args.model:
        from .models.loading import BUNDLED
        from .planning.arch import PLANNING_MODELS
        known = ", ".join(sorted([*PLANNING_MODELS, *BUNDLED]))  # a plan needs config.json alone
        print(f"eqat-dist plan: error: --model is required (a folder with config.json, a hub id, or one of {known})",
              file=sys.stderr)
        return 2
    try:
        arch = load_arch(args.model)
        cfg = for_plan(settings_from_flags(args), args.ranks, args.ranks_per_node or min(args.ranks, 8))
        for name, (out_features, in_features) in arch.linears.items():
            cfg.quant.check_layer(name, in_features, out_features)
    except (PlanError, ValueError) as err:
        print(f"eqat-dist plan: error: {flag_message(str(err), parser)}", file=sys.stderr)
        return 2
    gpu_note = _plan_gpu(args)
    device = "cpu" if args.gpu_memory == 0 or args.gpu == "cpu" else "gpu"
    ranks_per_node = args.ranks_per_node or min(args.ranks, 8)
    plan_settings = settings_for(cfg, args.ranks, ranks_per_node, device, args.gpu if device == "gpu" else "cpu",
                                 args.tflops, args.link_gbs, args.network_gbs)
    machine = Machine(gpu_memory=None if device == "cpu" else args.gpu_memory * GIB,
                      host_memory=(args.host_memory * GIB) if args.host_memory else host_memory(),
                      disk=None if args.disk is None else args.disk * GIB)
    result = report(arch, plan_settings, machine)
    result["machine"]["gpu_note"] = gpu_note if device == "gpu" else None
    result["advice"] = [flag_message(a, parser) for a in result["advice"]]
    if args.json:
        print(to_json(result))
    else:
        print(flag_message(render(result), parser))
        if args.terms:
            for name, phase in result["phases"].items():
                print(f"\n{name}:\n" + "\n".join(f"  {v:8.2f} GiB  {k}" for k, v in phase["terms_gib"].items()))
    return 0 if result["fits"] else 1


def _plan_gpu(args) -> str | None:
    """Fill in the GPU a plan is for when the flags leave it out: this machine's, where it has one, else
    an A100 of 80 GiB, said so (a plan made on a CPU login node is for the cluster's GPUs)."""
    import torch

    asked = args.gpu is not None and args.gpu_memory is not None
    if torch.cuda.is_available() and not asked:
        from .planning import gpu_kind
        props = torch.cuda.get_device_properties(0)
        name = props.name.lower()
        args.gpu = args.gpu or gpu_kind(0)
        args.gpu_memory = props.total_memory / 2**30 if args.gpu_memory is None else args.gpu_memory
        return f"this machine's {props.name}" if args.gpu in name else f"this machine's {props.name}, timed as {args.gpu}"
    note = None if args.gpu is not None else ("assumed: this machine has no GPU; --gpu and --gpu-memory set yours, "
                                              "--gpu cpu plans a CPU run")
    args.gpu = args.gpu or "a100"
    args.gpu_memory = 80.0 if args.gpu_memory is None else args.gpu_memory
    return note


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqat-dist export", description=(
        "Convert a finished export (a run's output, GPTQ v2) into a serving format, block by block."))
    p.add_argument("--from", dest="from_dir", required=True, help="a finished run's output folder")
    p.add_argument("--format", dest="export_format", required=True, choices=list(ALL_FORMATS),
                   help="compressed-tensors (any width; vLLM), awq (4-bit; vLLM, transformers), gguf (4-bit, "
                        "groups of a multiple of 32; llama.cpp), gptq_v2 (the model alone, as the run wrote it)")
    p.add_argument("--output", required=True, help="a new or empty folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    return p


def export_main(argv) -> int:
    from .export import CheckpointError
    from .export.convert import convert

    parser = build_export_parser()
    args = parser.parse_args(argv)
    try:
        convert(Path(args.from_dir), args.export_format, Path(args.output), args.overwrite)
    except (ValueError, CheckpointError) as err:
        print(f"eqat-dist export: error: {flag_message(str(err), parser)}", file=sys.stderr)
        return 2
    return 0


def whole_lines(*streams) -> None:
    """Each line of output in one write. Under PYTHONUNBUFFERED (which MPI launchers and cluster
    set-ups often export) print() writes a line's text and its newline apart, and the launcher merges
    the ranks' outputs between the two: one rank's line runs into another's. Line buffering joins them
    (and still shows every line at once in a log file)."""
    for stream in streams:
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=False)


def main(argv=None) -> int:
    whole_lines(sys.stdout, sys.stderr)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    try:
        stop_on()  # the defaults until the flags are read: a job stopped while it starts says so too
        cfg, notes = settings(argv, plan=True)
        stop_on(cfg.machine.stop_signals)
        if cfg.machine.rank == 0:
            for line in notes:
                print(flag_message(line), flush=True)
            from .utils.lock import LockError, acquire
            try:  # every check passed: hold the folder until this process exits
                acquire(cfg.output, cfg.take_over_lock)
            except LockError as err:
                raise UsageError(flag_message(str(err))) from err
    except UsageError as err:
        print(f"eqat-dist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C or a stop signal
        how = "interrupted" if signal_name(err) == "SIGINT" else f"stopped by {signal_name(err)}"
        print(f"eqat-dist: {how} before any work started; nothing was written", file=sys.stderr)
        return exit_code(err)
    from .runner import run
    from .utils.monitor import quiet_library_bars
    quiet_library_bars()
    return run(cfg, explain=flag_message)


if __name__ == "__main__":
    sys.exit(main())
