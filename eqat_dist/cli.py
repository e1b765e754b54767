"""`eqat-dist` / `launch/run.py`: parse, validate before any work, then wire the phases together."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if not sys.stderr.isatty():  # a log file: the libraries' progress bars (read at tqdm's import) are noise there
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from .quant import QuantConfig, QuantConfigError
from .dist.launch import LaunchError, bind_device, export_to_environ, from_environ, resolve, single_process
from .utils.settings import DTYPES, describe_differences, run_settings, trains_blocks, trains_e2e



class UsageError(ValueError):
    """Bad arguments: reported as one clear line before any work starts."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eqat-dist", description="EfficientQAT (Block-AP) quantization to 2-8 bits.")
    p.add_argument("--config", help="YAML or JSON file of settings (keys as the flags, '-' or '_'); flags override it")
    p.add_argument("--model", help="hub id, local folder, .gguf file, or bundled name (smollm2-135m)")
    p.add_argument("--wbits", type=int, default=2, help="weight bits: 2, 3, 4 or 8")
    p.add_argument("--group-size", type=int, default=64, help="group size (-1 = per channel)")
    p.add_argument("--output", help="output folder (the exported model, results.json, checkpoints, logs)")
    p.add_argument("--overwrite", action="store_true", help="wipe an existing output folder first")
    # Block-AP (official code's names, kebab-case)
    p.add_argument("--epochs", type=int, default=2, help="Block-AP epochs per block (0 = round-to-nearest only)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--train-size", type=int, default=4096, help="calibration windows for training")
    p.add_argument("--val-size", type=int, default=64, help="calibration windows for validation")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length in tokens")
    p.add_argument("--quant-lr", type=float, default=1e-4)
    p.add_argument("--weight-lr", type=float, default=None, help="default: 2e-5 at 2 bits, 1e-5 at 3/4/8 bits")
    p.add_argument("--min-lr-factor", type=float, default=20.0, help="cosine decays to lr / this factor")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    p.add_argument("--no-train-norms", action="store_true", help="keep the blocks' norm weights frozen")
    p.add_argument("--calib-dataset", default="boolq",
                   help="bundled (boolq), hub (redpajama, c4, wikitext2-train) or a .txt/.jsonl/.parquet file")
    p.add_argument("--student-input", default=None, choices=["student", "teacher", "pipelined"],
                   help="student: the paper's scheme (quantized stream, blocks one after another); teacher: "
                        "full-precision stream (blocks train concurrently, worse at 2-3 bits); pipelined: "
                        "full-precision stream first, the quantized stream for the last --correction-fraction "
                        "of each block's steps (concurrent up to that part). Default: student on one rank, "
                        "pipelined on several (a resumed run keeps the mode it started with)")
    p.add_argument("--correction-fraction", type=float, default=None,
                   help="pipelined: the fraction of each block's steps trained on the quantized stream "
                        "(default 1/ranks, the most that keeps every rank busy; 1 = student, 0 = teacher)")
    p.add_argument("--correction-lr", default=None, choices=["restart", "continue"],
                   help="pipelined: go on down the block's one cosine learning-rate schedule through the steps "
                        "on the quantized stream (default), or restart it there (measured worse at w2g64: "
                        "docs/benchmarks.md)")
    p.add_argument("--activations", default=None, choices=["gpu", "cpu", "disk"],
                   help="where activation stores live (default: cpu, as the paper's single-GPU mode)")
    p.add_argument("--activations-dir", default=None, help="folder for --activations disk (default: OUTPUT/acts)")
    p.add_argument("--host-memory-budget", type=float, default=None,
                   help="GiB of host memory per node the run may use; without --activations the stores go to "
                        "disk when in memory they would exceed it (default: 90%% of this machine's memory)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="training precision: auto = bf16 autocast on GPU, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--single-gpu", action="store_true", help="the paper's single-GPU mode (one process)")
    p.add_argument("--seed", type=int, default=0)
    # Evaluation and export
    p.add_argument("--eval-datasets", default="wiki,news", help="comma list: wiki, news (bundled), wikitext2, c4 (hub)")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-max-windows", type=int, default=None, help="cap on windows per dataset (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--zeroshot-tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande",
                   help="comma list of zero-shot tasks, scored by lm-evaluation-harness on the bundled "
                        "validation data ('' = none)")
    p.add_argument("--zeroshot-limit", type=int, default=None,
                   help="items per zero-shot task, a fixed random subset (default: the whole split)")
    p.add_argument("--skip-fp-eval", action="store_true", help="do not evaluate the full-precision model")
    p.add_argument("--export-dtype", default="float16", choices=list(DTYPES),
                   help="dtype of the unquantized tensors (embeddings, norms, lm_head) in the export")
    p.add_argument("--no-tensorboard", action="store_true")
    # Phases and E2E-QP (paper defaults)
    p.add_argument("--phase", default="all", choices=["all", "block-ap", "e2e", "eval"],
                   help="all: Block-AP (or RTN with --epochs 0), E2E-QP, evaluation; or one phase alone")
    p.add_argument("--from", dest="from_dir", default=None,
                   help="for --phase e2e/eval: a packed model folder from an earlier phase (default: --output)")
    p.add_argument("--e2e-epochs", type=int, default=1, help="E2E-QP epochs (0 = skip E2E-QP)")
    p.add_argument("--e2e-train-size", type=int, default=4096)
    p.add_argument("--e2e-seqlen", type=int, default=4096)
    p.add_argument("--e2e-global-batch", type=int, default=32, help="kept whatever the number of ranks")
    p.add_argument("--e2e-micro-batch", type=int, default=1)
    p.add_argument("--e2e-lr", type=float, default=None, help="default: 2e-5 at 2 bits, 1e-5 otherwise")
    p.add_argument("--e2e-warmup", type=float, default=0.03, help="warm-up fraction of the steps")
    p.add_argument("--e2e-max-grad-norm", type=float, default=0.3)
    p.add_argument("--e2e-save-every", type=int, default=50, help="DeepSpeed checkpoint every N steps")
    p.add_argument("--e2e-keep-checkpoints", type=int, default=1,
                   help="newest E2E-QP checkpoints kept on disk (0 = keep all)")
    p.add_argument("--no-grad-checkpointing", action="store_true")
    p.add_argument("--ds-config", default="zero3-offload",
                   help="zero3-offload, zero3, single-gpu (ds_configs/) or a DeepSpeed JSON file")
    p.add_argument("--peer-timeout", type=float, default=600.0,
                   help="seconds without a sign of life from another rank (stopped, hung) before the run stops "
                        "naming it; a dead rank is noticed at once")
    p.add_argument("--no-kernels", action="store_true",
                   help="on a GPU, use the PyTorch layers instead of the Triton kernels (eqat_dist/kernels)")
    p.add_argument("--debug", action="store_true", help="print the traceback of a failure, not only its one line")
    p.add_argument("--take-over-lock", action="store_true",
                   help="take over an output folder whose lock names a process that is gone")
    p.add_argument("--ignore-plan", action="store_true",
                   help="run even when the plan says it will not fit this machine (see `eqat-dist plan`)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p


def build_plan_parser() -> argparse.ArgumentParser:
    """`eqat-dist plan`: every flag of a run, plus the machine to plan for."""
    p = build_parser()
    p.prog, p.description = "eqat-dist plan", ("Per-rank GPU memory, host memory, disk and time of each phase, "
                                               "from the model's config.json alone (no weights read). Exit 0 "
                                               "when the run fits, 1 when it does not.")
    p.add_argument("--ranks", type=int, default=1, help="ranks (GPUs) in all")
    p.add_argument("--ranks-per-node", type=int, default=None, help="default: min(ranks, 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU; 0 plans a CPU-only run")
    p.add_argument("--host-memory", type=float, default=None, help="GiB per node (default: this machine's)")
    p.add_argument("--disk", type=float, default=None, help="free GiB where the run writes (default: unchecked)")
    p.add_argument("--gpu", default="a100", choices=["a100", "h100", "h200", "cpu"], help="for the time estimate")
    p.add_argument("--tflops", type=float, default=None, help="achieved TFLOP/s, replacing the built-in figures")
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        known = {a.dest for a in parser._actions}
        values = _load_config_file(pre.config)
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"--config {pre.config}: unknown settings {', '.join(unknown)}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    validate(args)
    settle_launch(args)
    return args


def settle_launch(args) -> None:
    """Where this process stands in the job (dist/launch.py), exported for DeepSpeed and torch, and its
    device made current before anything touches a GPU. A launcher whose world MPI does not see, or a
    rendezvous port already taken, is refused here, before any work."""
    rendezvous = trains_e2e(args)
    try:
        args.launch = single_process(rendezvous) if args.single_gpu else resolve(rendezvous=rendezvous)
    except LaunchError as err:
        raise UsageError(str(err)) from err
    export_to_environ(args.launch)
    args.device = bind_device(args.device, args.launch)
    if args.device.type == "cuda":  # DeepSpeed (engine, zero.Init) reads LOCAL_RANK as the GPU's ordinal
        os.environ["LOCAL_RANK"] = str(args.device.index)


def _launched():
    """The launcher's own word on rank and world, before any communicator (dist/launch.from_environ)."""
    try:
        return from_environ()
    except LaunchError as err:
        raise UsageError(str(err)) from err


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UsageError(f"--device {spec} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec}: eqat-dist runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: this machine shows {torch.cuda.device_count()} GPU(s) (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}); check CUDA_VISIBLE_DEVICES")
    return device


def _check_at_least(args, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(args, name) < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {minimum}")


def validate(args) -> None:
    """Every check that needs no model weights, so bad input fails in seconds."""
    if not args.model:
        raise UsageError("--model is required (a hub id, a folder, a .gguf file or smollm2-135m)")
    if not args.output:
        raise UsageError("--output is required")
    try:
        args.qcfg = QuantConfig(args.wbits, args.group_size)
    except QuantConfigError as err:
        raise UsageError(str(err)) from err
    _check_at_least(args, 0, "epochs", "train_size", "val_size", "e2e_epochs", "e2e_train_size",
                    "e2e_keep_checkpoints")
    _check_at_least(args, 1, "batch_size", "seqlen", "eval_seqlen", "eval_batch_size", "e2e_seqlen",
                    "e2e_global_batch", "e2e_micro_batch", "e2e_save_every")
    if args.epochs > 0 and args.train_size < 1:
        raise UsageError("--train-size must be >= 1 when --epochs > 0")
    if args.no_kernels:
        os.environ["EQAT_KERNELS"] = "0"  # read by every layer, inherited by launched children
    if args.peer_timeout < 5:
        raise UsageError("--peer-timeout must be >= 5 seconds")
    if args.correction_fraction is not None and not 0 <= args.correction_fraction <= 1:
        raise UsageError("--correction-fraction must be between 0 and 1 (the share of steps on the quantized stream)")
    if args.min_lr_factor < 1:
        raise UsageError("--min-lr-factor must be >= 1 (the cosine ends at lr / factor)")
    from .models.loading import ModelLoadError, check_layers_early, model_config_file
    args.model_config = None  # config.json of --model, when this run needs the model
    if args.phase in ("all", "block-ap") or not args.skip_fp_eval:
        try:
            args.model_config = model_config_file(args.model)
        except ModelLoadError as err:
            raise UsageError(f"--model: {err}") from err
    try:
        check_layers_early(args.model_config, args.qcfg)
    except QuantConfigError as err:
        raise UsageError(str(err)) from err
    args.device = resolve_device(args.device)
    if args.activations == "gpu" and args.device.type != "cuda":
        raise UsageError("--activations gpu needs a CUDA device; use --activations cpu or disk")
    if args.dtype == "auto":
        args.amp_dtype = torch.bfloat16 if args.device.type == "cuda" else None
    else:
        args.amp_dtype = None if args.dtype == "float32" else DTYPES[args.dtype]
    if args.weight_lr is None:
        from .blockap.trainer import default_weight_lr
        args.weight_lr = default_weight_lr(args.wbits)
    if args.e2e_lr is None:
        from .e2e.trainer import default_e2e_lr
        args.e2e_lr = default_e2e_lr(args.wbits)
    import math
    for name in ("quant_lr", "weight_lr", "e2e_lr", "max_grad_norm", "e2e_max_grad_norm", "e2e_warmup"):
        value = getattr(args, name, None)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise UsageError(f"--{name.replace('_', '-')} {value} must be a finite number >= 0")
    from .data.text import DataError
    from .eval.harness import parse_tasks
    try:
        args.zeroshot_tasks = parse_tasks(args.zeroshot_tasks or "")
    except DataError as err:
        raise UsageError(f"--zeroshot-tasks: {err}") from err
    if args.zeroshot_limit is not None and args.zeroshot_limit < 2:
        raise UsageError("--zeroshot-limit must be >= 2 (items per task)")
    if args.eval_max_windows is not None and args.eval_max_windows < 1:
        raise UsageError("--eval-max-windows must be >= 1 (leave it out for every window)")
    from .data.text import check_source
    sources = [("--eval-datasets", d) for d in args.eval_datasets.split(",") if d]
    if trains_blocks(args) or trains_e2e(args):
        sources.append(("--calib-dataset", args.calib_dataset))
    for flag, source in sources:
        try:
            check_source(source)
        except DataError as err:
            raise UsageError(f"{flag}: {err}") from err
    check_context(args)
    if trains_e2e(args):
        from .e2e.ds_config import accumulation_steps, read_ds_config
        try:
            read_ds_config(args.ds_config)
            accumulation_steps(args.e2e_global_batch, args.e2e_micro_batch, 1 if args.single_gpu else _launched().world)
        except ValueError as err:
            raise UsageError(str(err)) from err
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file, not a folder")
    if _launched().rank == 0:  # one run per output folder: a second is refused at once
        from .utils.lock import LockError, check
        try:
            check(out, args.take_over_lock)
        except LockError as err:
            raise UsageError(str(err)) from err
        _check_writable(out)
    if args.overwrite and out.exists():
        check_overwrite(out, args.model, args.from_dir)
    if args.phase in ("e2e", "eval"):
        source = Path(args.from_dir or args.output)
        if not (source / "config.json").exists() or "quantization_config" not in (source / "config.json").read_text():
            raise UsageError(f"--phase {args.phase} needs a packed model from an earlier phase in {source} "
                             "(pass --from DIR)")
        args.from_dir = str(source)
        return
    args.blockap_done = False
    if _contents(out) and not args.overwrite:
        done = finished_phases(out, args)
        wanted = {"block-ap", "e2e"} if args.phase == "all" and args.e2e_epochs > 0 else {"block-ap"}
        if wanted <= done:
            raise UsageError(f"--output {out} already holds a finished run; pass --overwrite to redo it or "
                             "choose another folder")
        if not done and not (out / "blockap" / "manifest.json").exists():
            raise UsageError(f"--output {out} exists and is not empty; pass --overwrite or choose another folder")
        # else: our own unfinished run, continued (the Block-AP manifest refuses other settings); a
        # finished Block-AP (or RTN) phase is not redone, E2E-QP resumes from its checkpoint or starts
        args.blockap_done = "block-ap" in done


def check_context(args) -> None:
    """Windows longer than the model's context are refused up front (config.json, when at hand)."""
    if args.model_config is None:
        return
    context = json.loads(args.model_config.read_text()).get("max_position_embeddings")
    blockap, e2e = trains_blocks(args), trains_e2e(args)
    evaluated = bool([d for d in args.eval_datasets.split(",") if d])  # zero-shot truncates instead
    for flag, value, used in (("--seqlen", args.seqlen, blockap), ("--e2e-seqlen", args.e2e_seqlen, e2e),
                              ("--eval-seqlen", args.eval_seqlen, evaluated)):
        if used and context and value > context:
            raise UsageError(f"{flag} {value} is longer than the model's context ({context} tokens, "
                             f"max_position_embeddings); use {flag} {context} or less")


def _check_writable(out: Path) -> None:
    """The output folder (or the nearest folder above it that exists) takes new files."""
    import tempfile
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output {out}: {existing} is a file, so no folder can be made there; choose another --output")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise UsageError(f"--output {out}: cannot write in {existing} ({err.strerror}); choose a folder you can "
                         "write to") from err


def _contents(folder: Path) -> list[Path]:
    """What a folder holds besides our lock file."""
    from .utils.lock import LOCK
    return [p for p in folder.iterdir() if p.name != LOCK] if folder.is_dir() else []


def is_eqat_run(folder: Path) -> bool:
    """Whether `folder` is empty or recognisably an eqat-dist output folder (what --overwrite may delete)."""
    if not _contents(folder):
        return True
    if any((folder / mark).exists() for mark in ("results.json", "blockap/manifest.json", "e2e_ckpt")):
        return True
    try:
        meta = json.loads((folder / "quantize_config.json").read_text()).get("meta", {})
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(q).startswith("eqat-dist") for q in meta.get("quantizer", []))


def check_overwrite(out: Path, model: str | None, from_dir: str | None) -> None:
    """--overwrite deletes only an eqat-dist run folder, never the model being quantized, the --from
    folder, or a folder holding either."""
    target = out.resolve()
    for flag, value in (("--model", model), ("--from", from_dir)):
        path = Path(value).expanduser() if value else None
        if path is not None and path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise UsageError(f"--output {out} is or holds the {flag} folder {value}; --overwrite would delete it. "
                             "Choose another --output")
    if not is_eqat_run(out):
        raise UsageError(f"--output {out} holds files that are not an eqat-dist run; --overwrite only replaces an "
                         "eqat-dist output folder. Choose another --output (or empty that folder yourself)")


def finished_phases(out: Path, args) -> set:
    """The phases of this run that its results.json says are finished in `out`."""
    from .export.staging import settled
    path = settled(out, "results.json")  # a move of an export cut short is finished when the run starts
    if not path.exists():
        return set()
    try:
        results = json.loads(path.read_text())
    except ValueError as err:
        raise UsageError(f"{path} is not valid JSON ({err}); pass --overwrite to start again or choose another "
                         "folder") from err
    before = results.get("settings", {})
    now = run_settings(args)
    # a setting left to its default (None) in this command matches whatever the run resolved it to
    detail = describe_differences(before, now, keys=[k for k, v in now.items() if v is not None])
    if detail:
        raise UsageError(f"--output {out} holds a run with other settings ({detail}); run with the original "
                         "settings to continue it, or pass --overwrite, or choose another folder")
    return {phase for phase, key in (("block-ap", "quantized"), ("e2e", "quantized_e2e")) if key in results}


def plan_main(argv) -> int:
    from .planning import GIB, Machine, PlanError, load_arch, render, report, settings_from_args, to_json
    from .planning import host_memory

    args = build_plan_parser().parse_args(argv)
    if not args.model:
        print("eqat-dist plan: error: --model is required (a folder with config.json, a hub id, or one of "
              "llama-2-7b, llama-2-70b, llama-3-8b, qwen2.5-72b, smollm2-135m)", file=sys.stderr)
        return 2
    try:
        arch = load_arch(args.model)
        cfg = QuantConfig(args.wbits, args.group_size)
        for name, (out_features, in_features) in arch.linears.items():
            cfg.check_layer(name, in_features, out_features)
    except (PlanError, QuantConfigError) as err:
        print(f"eqat-dist plan: error: {err}", file=sys.stderr)
        return 2
    device = "cpu" if args.gpu_memory == 0 or args.gpu == "cpu" else "gpu"
    ranks_per_node = args.ranks_per_node or min(args.ranks, 8)
    settings = settings_from_args(args, args.ranks, ranks_per_node, device, args.gpu if device == "gpu" else "cpu",
                                  args.tflops)
    machine = Machine(gpu_memory=None if device == "cpu" else args.gpu_memory * GIB,
                      host_memory=(args.host_memory * GIB) if args.host_memory else host_memory(),
                      disk=None if args.disk is None else args.disk * GIB)
    result = report(arch, settings, machine)
    if args.json:
        print(to_json(result))
    else:
        print(render(result))
        if args.terms:
            for name, phase in result["phases"].items():
                print(f"\n{name}:\n" + "\n".join(f"  {v:8.2f} GiB  {k}" for k, v in phase["terms_gib"].items()))
    return 0 if result["fits"] else 1


def _arch_at_hand(args):
    """The architecture from --model's config.json when validate() read it (else None: a GGUF file)."""
    from .planning import PlanError, load_arch

    if args.model_config is None:
        return None
    try:
        return load_arch(str(args.model_config))
    except PlanError:
        return None


def choose_activations(args) -> str | None:
    """Without --activations: the stores stay in host memory when the node's ranks fit them within
    --host-memory-budget, else they go to disk (memory-mapped). Returns the line that says so."""
    if args.activations is not None:
        return None
    args.activations = "cpu"
    arch = _arch_at_hand(args)
    if arch is None or not trains_blocks(args):
        return None
    from .planning import GIB, host_memory, settings_from_args
    from .planning.estimate import block_ap
    from .planning.fit import node_host

    ranks, per_node = args.launch.world, args.launch.local_world
    settings = settings_from_args(args, ranks, per_node, "gpu" if args.device.type == "cuda" else "cpu")
    budget = (args.host_memory_budget or 0.9 * host_memory() / GIB) * GIB
    need = node_host("block-ap", block_ap(arch, settings), settings)
    if need <= budget:
        return None
    args.activations = "disk"
    return (f"[plan] activation stores in host memory would take {need / GIB:.1f} GiB on this node, over the "
            f"{budget / GIB:.1f} GiB budget: they go to disk ({args.activations_dir or Path(args.output) / 'acts'}, "
            "memory-mapped); pass --activations cpu to keep them in memory")


def check_plan(args) -> str | None:
    """The plan for this machine, before any work: None when the run fits, else the reason and the fix."""
    from .planning import report, settings_from_args, this_machine

    arch = _arch_at_hand(args)
    if arch is None:
        return None
    ranks, ranks_per_node = args.launch.world, args.launch.local_world
    device = "gpu" if args.device.type == "cuda" else "cpu"
    gpu = "a100"
    if device == "gpu":
        name = torch.cuda.get_device_name(args.device).lower()
        gpu = next((g for g in ("h200", "h100") if g in name), "a100")
    result = report(arch, settings_from_args(args, ranks, ranks_per_node, device, gpu), this_machine(args.output),
                    phases={"all": None, "block-ap": ("block-ap", "export", "eval"), "e2e": ("e2e", "export", "eval"),
                            "eval": ("eval",)}[args.phase])
    if result["fits"]:
        return None
    needs = "; ".join(f"{p['phase']} needs {p['needed_gib']:.1f} GiB of {p['resource']}, {p['available_gib']:.1f} GiB "
                      "here" for p in result["problems"])
    if result["advice"] and result["fits_with_advice"]:
        fix = f"try {' '.join(result['advice'])}"
    else:
        fix = "no flag makes it fit: use fewer or shorter windows, more ranks or a larger machine"
    return (f"this run will not fit this machine ({needs}); {fix}; `eqat-dist plan` with the same flags shows the "
            "plan; --ignore-plan runs anyway")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    try:
        args = parse_args(argv)
        placement = choose_activations(args)
        if placement and args.launch.rank == 0:
            print(placement, flush=True)
        refusal = None if args.ignore_plan else check_plan(args)
        if refusal:
            raise UsageError(refusal)
        if args.launch.rank == 0:  # every check passed: hold the folder until this process exits
            from .utils.lock import LockError, acquire
            try:
                acquire(Path(args.output), args.take_over_lock)
            except LockError as err:
                raise UsageError(str(err)) from err
    except UsageError as err:
        print(f"eqat-dist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eqat-dist: interrupted before any work started; nothing was written", file=sys.stderr)
        return 130
    from .runner import run
    from .utils.monitor import quiet_library_bars
    quiet_library_bars()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
