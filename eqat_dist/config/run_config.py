"""The settings of one run, typed and frozen: built once from the flags and the config file (from_flags.py)
with every default resolved there, then read by the phases, the planner and the pipelines. Nothing
below the command line sees argparse.

Settings are named as the config file spells them (`wbits`, `e2e_lr`, ...). A library error names the
setting in backquotes (`group_size`); the command line shows the flag instead (cli.flag_message).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..quant import QuantConfig
from ..utils.compare import RECORD_DEFAULTS
from ..utils.stop import DEFAULT as STOP_DEFAULT, OPTIONAL as STOP_OPTIONAL
from .declare import setting

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PHASES = ("all", "block-ap", "e2e", "eval")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it in backquotes and says the fix."""


# What --model takes (its help) and the one line a run without it gets (the CLI, the config builder).
MODEL_FORMS = "hub id, local folder, .gguf file, or bundled name (smollm2-135m)"
MODEL_REQUIRED = f"--model is required ({MODEL_FORMS})"

@dataclass(frozen=True)
class BlockAPConfig:
    """Block-AP: the official code's settings, plus how the student's input stream is scheduled."""
    epochs: int = setting(2, help="Block-AP epochs per block (0 = round-to-nearest only)", minimum=0)
    batch_size: int = setting(2, minimum=1)
    train_size: int = setting(4096, help="calibration windows for training", minimum=0)
    val_size: int = setting(64, help="calibration windows for validation", minimum=0)
    seqlen: int = setting(2048, help="calibration window length in tokens", minimum=1)
    quant_lr: float = setting(1e-4, finite=True)
    weight_lr: float | None = setting(None, help="default: 2e-5 at 2 bits, 1e-5 at 3/4/8 bits", finite=True)
    min_lr_factor: float = setting(20.0, help="cosine decays to lr / this factor", minimum=1,
                                   why="the cosine ends at lr / factor")
    max_grad_norm: float = setting(1.0, help="gradient-norm clip (0 = off)", finite=True)
    loss: str = setting("mse", by_rule=True, help=(
        "Block-AP's reconstruction loss: mse (the paper's), relative (each token's squared error over its "
        "target's mean square) or huber (the MSE, but a token whose error is over 100x the batch's median "
        "counts with its square root: a spurious massive activation no longer takes the steps); default: "
        "the recipe's"))  # what a block minimises (blockap/losses.py); mse is the paper's
    train_norms: bool = setting(True, dest="no_train_norms", negated=True, help="keep the blocks' norm weights frozen")
    calib_dataset: str = setting("boolq", help="bundled (boolq), hub (redpajama, c4, wikitext2-train) or a "
                                               ".txt/.jsonl/.parquet file")
    student_input: str | None = setting(None)  # a schedule's name (pipelines/schedules.py: its choices and help)
    data_parallel: int | None = setting(None, metavar="D", minimum=1, why="ranks per group", help=(
        "ranks that train each block together, each on 1/D of the windows, gradients summed every step (the "
        "steps of one rank at --batch-size, which stays the global batch); the N ranks form N/(D x S) groups "
        "(--sequence-parallel S), blocks round-robin over the groups. Default: the largest D that divides both "
        "the group and --batch-size (at the paper's batch 2 on 2 ranks: 2, pure data parallel)"))
    sequence_parallel: int | None = setting(None, metavar="S", help=(
        "ranks that split each window's tokens (two chunks each, zig-zag, for the causal mask's balance), "
        "attention gathering the window's keys and values over them: a group of D x S ranks takes the steps of "
        "one rank at --batch-size, each doing 1/(D x S) of the work and holding 1/(D x S) of every stream "
        "(--seqlen a multiple of 2 x S). Default: in student mode (the paper's arithmetic) one group of a "
        "node's every rank, D as large as the batch allows and S the rest; 1 when --data-parallel, pipelined "
        "or teacher is asked"))
    correction_fraction: float | None = setting(None, help=(
        "pipelined: the fraction of each block's steps trained on the quantized stream (default 1/groups, the "
        "most that keeps every rank busy; 1 = student, 0 = teacher)"))
    correction_lr: str | None = setting(None, choices=("restart", "continue"), help=(
        "pipelined: go on down the block's one cosine learning-rate schedule through the steps on the "
        "quantized stream (default), or restart it there (measured worse at w2g64: docs/benchmarks.md)"))

    @property
    def group_size(self) -> int:
        """Ranks that train each block together: D x S."""
        return (self.data_parallel or 1) * (self.sequence_parallel or 1)

    def groups(self, world: int) -> int:
        """Groups of ranks the blocks go round-robin over."""
        return world // self.group_size


@dataclass(frozen=True)
class StreamsConfig:
    """Where Block-AP's activation stores live."""
    placement: str | None = setting(None, dest="activations", choices=("gpu", "cpu", "disk"), help=(
        "where activation stores live (default: cpu, as the paper's single-GPU mode)"))  # None: the plan's choice
    folder: Path | None = setting(None, dest="activations_dir", to_value=Path, help=(
        "folder for --activations disk (default: OUTPUT/acts)"))  # None = the run folder's (RunFolder.activations)
    on_gpu_gib: float | None = setting(None, dest="activations_on_gpu", metavar="GIB", minimum=0,
                                       why="GiB per rank of the stores kept on the GPU", help=(
        "GiB per rank of the host (or disk) activation stores to keep on the GPU, in the memory a block's "
        "training leaves free (default: 0, or what keeps the stores in host memory when they would not fit it "
        "otherwise)"))
    host_memory_budget_gib: float | None = setting(None, dest="host_memory_budget", help=(
        "GiB of host memory per node the run may use; without --activations, stores that in memory would "
        "exceed it keep part of their rows on the GPU where it has the room, else go to disk (default: 90%% of "
        "this machine's memory)"))


@dataclass(frozen=True)
class E2EConfig:
    """E2E-QP on DeepSpeed (paper defaults)."""
    FLAG_PREFIX = "e2e_"
    epochs: int = setting(1, help="E2E-QP epochs (0 = skip E2E-QP)", minimum=0)
    train_size: int = setting(4096, minimum=0)
    seqlen: int = setting(4096, minimum=1)
    data: str | None = setting(None, help=(
        "E2E-QP's training data (default: --calib-dataset): a text source as --calib-dataset takes, or chat "
        "data for an instruction-tuned model, a .jsonl of {\"messages\": [...]} or the bundled 'sciq-chat': "
        "rendered with the tokenizer's chat template, the loss on the assistant's tokens only, one conversation "
        "per row cut at --e2e-seqlen"))  # a text source (windows) or chat data (data/chat.py)
    global_batch: int = setting(32, help="kept whatever the number of ranks", minimum=1)
    micro_batch: int = setting(1, minimum=1)
    lr: float | None = setting(None, help="default: 2e-5 at 2 bits, 1e-5 otherwise", finite=True)
    warmup: float = setting(0.03, help="warm-up fraction of the steps", finite=True)
    max_grad_norm: float = setting(0.3, finite=True)
    save_every: int = setting(50, help="DeepSpeed checkpoint every N steps", minimum=1)
    keep_checkpoints: int = setting(1, help="newest E2E-QP checkpoints kept on disk (0 = keep all)", minimum=0)
    grad_checkpointing: bool = setting(True, dest="no_grad_checkpointing", negated=True)
    ds_config: str = setting("zero3-offload", dest="ds_config", help=(
        "zero3-offload, zero3, single-gpu (ds_configs/) or a DeepSpeed JSON file"))


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity and zero-shot accuracy after each phase."""
    FLAG_PREFIX = "eval_"
    datasets: tuple[str, ...] = setting(("wiki", "news"), listed=True, help=(
        "comma list: wiki, news (bundled), wikitext2, c4 (hub)"))
    seqlen: int = setting(2048, minimum=1)
    max_windows: int | None = setting(None, minimum=1, why="leave it out for every window", help=(
        "cap on windows per dataset (default: all)"))
    batch_size: int = setting(1, minimum=1)
    zeroshot_tasks: tuple[str, ...] = setting(("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"),
                                              dest="zeroshot_tasks", listed=True, help=(
        "comma list of zero-shot tasks, scored by lm-evaluation-harness on the bundled validation data ('' = none)"))
    zeroshot_limit: int | None = setting(None, dest="zeroshot_limit", minimum=2, why="items per task", help=(
        "items per zero-shot task, a fixed random subset (default: the whole split)"))
    skip_fp: bool = setting(False, dest="skip_fp_eval", help="do not evaluate the full-precision model")

    @property
    def datasets_text(self) -> str:
        """As results.json has always recorded them: one comma list."""
        return ",".join(self.datasets)


@dataclass(frozen=True)
class MachineConfig:
    """This process: its device (bound at start-up), precision, and place in the job."""
    dtype: str = setting("auto", choices=("auto", *DTYPES), help=(
        "training precision: auto = bf16 autocast on GPU, float32 on CPU"))  # as asked
    single_gpu: bool = setting(False, help="the paper's single-GPU mode (one process)")
    peer_timeout: float = setting(600.0, minimum=5, unit="seconds", help=(
        "seconds without a sign of life from another rank (stopped, hung) before the run stops naming it; a "
        "dead rank is noticed at once"))
    kernels: bool = setting(True, dest="no_kernels", negated=True, help=(
        "on a GPU, use the PyTorch layers instead of the Triton kernels (eqat_dist/kernels)"))
    compile: bool = setting(False, help=(
        "Block-AP: run the block's forward and backward through torch.compile (fused element-wise work: fewer "
        "passes over the activations; the first block pays the compile once). Not bit-identical to the plain "
        "run: float sums in another order"))  # blockap/compiled.py
    weight_work: str = setting("auto", choices=("auto", "split", "replicated"), help=(
        "data-parallel Block-AP: split the work on the block's weights (fake quantization, clipping, optimizer) "
        "among a group's ranks, each linear's by one rank that sends the others its quantized weight, or repeat "
        "it on every rank. auto: split on the CPU; on GPUs as the plan finds faster. The same steps either way "
        "(float sums in another order)"))  # blockap/weight_shards.py
    stop_signals: tuple[str, ...] = setting(STOP_DEFAULT, listed=True, metavar="SIG[,SIG]", help=(
        "signals that stop the run cleanly besides SIGTERM and SIGINT (every rank stops within seconds, says "
        "where it was and what is kept, releases the output, exits 128 + the signal), from "
        f"{', '.join(STOP_OPTIONAL)}, or none. Default: USR1, which Slurm sends before a time limit with "
        "--signal=USR1@SECONDS"))  # utils/stop.py
    # settled at start-up (startup.py), not flags
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None  # autocast dtype, None = float32
    launch: object | None = None  # cluster.launch.Launch; None only in a plan (no process is launched)

    @property
    def splits_weight_work(self) -> bool:
        """Whether a group splits the work on the block's weights (fake quantization, clipping, optimizer)
        among its ranks, as far as the settings alone tell: split, or auto on the CPU, where that work costs
        a third of a batch-1 step and the gather is a copy through shared memory (docs/benchmarks.md). On
        GPUs auto is the plan's choice (planning.splits_weight_work)."""
        return self.weight_work == "split" or (self.weight_work == "auto" and self.device.type == "cpu")

    @property
    def world(self) -> int:
        return 1 if self.launch is None else self.launch.world

    @property
    def rank(self) -> int:
        return 0 if self.launch is None else self.launch.rank

    @property
    def store_dtype(self) -> torch.dtype:
        """Activation stores hold the training precision."""
        return torch.float32 if self.amp_dtype is None else self.amp_dtype

    @property
    def model_dtype(self) -> torch.dtype:
        """The full-precision model's dtype on a GPU (bfloat16 by default: 70B in float32 is 280 GB)."""
        return torch.bfloat16 if self.dtype == "auto" else DTYPES[self.dtype]

    @property
    def e2e_bf16(self) -> bool:
        return self.device.type == "cuda" if self.dtype == "auto" else self.dtype == "bfloat16"


@dataclass(frozen=True)
class Invocation:
    """The command that made the run: as typed, every flag's value (the config file's and the defaults
    included), and the one command line that gives those values again. results.json records it, so that
    a run can be repeated or compared from its own results."""
    argv: tuple[str, ...] = ()
    flags: dict = field(default_factory=dict)  # setting -> value, as the parser gave them
    command: str = ""


@dataclass(frozen=True)
class RunConfig:
    model: str = setting(help=MODEL_FORMS)
    output: Path = setting(to_value=Path, help="output folder (the exported model, results.json, checkpoints, logs)")
    quant: QuantConfig = field(default_factory=QuantConfig)  # its settings are declared in quant/config.py
    blockap: BlockAPConfig = field(default_factory=BlockAPConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    machine: MachineConfig = field(default_factory=MachineConfig)
    overwrite: bool = setting(False, help=(
        "wipe an existing output folder first; refused where it holds an unfinished run of the same settings (run "
        "without --overwrite to resume it), unless --discard-unfinished"))
    discard_unfinished: bool = setting(False, help=(
        "with --overwrite: start over even where the output holds an unfinished run of the same settings (its "
        "finished blocks and checkpoints are deleted)"))
    seed: int = setting(0)
    export_dtype: str = setting("float16", choices=tuple(DTYPES), help=(
        "dtype of the unquantized tensors (embeddings, norms, lm_head) in the export"))
    export_formats: tuple[str, ...] = setting(("gptq_v2",), dest="export_format", listed=True,
                                              metavar="FORMAT[,FORMAT]")  # gptq_v2 first, always; the help: cli.py
    tensorboard: bool = setting(True, dest="no_tensorboard", negated=True)
    phase: str = setting("all", choices=PHASES, help=(
        "all: Block-AP (or RTN with --epochs 0), E2E-QP, evaluation; or one phase alone"))
    from_dir: Path | None = setting(None, option="--from", to_value=Path, help=(
        "for --phase e2e/eval: a packed model folder from an earlier phase (default: --output)"))
    debug: bool = setting(False, help="print the traceback of a failure, not only its one line")
    take_over_lock: bool = setting(False, help="take over an output folder whose lock names a process that is gone")
    ignore_plan: bool = setting(False, help=(
        "run even when the plan says it will not fit this machine (see `eqat-dist plan`)"))
    model_config: Path | None = None  # the model's config.json, when this run needs the model and has one
    invocation: Invocation = field(default_factory=Invocation, compare=False)  # what made it (not a setting)

    @property
    def trains_blocks(self) -> bool:
        """Whether this run trains Block-AP (not RTN, not a later phase alone)."""
        return self.blockap.epochs > 0 and self.phase in ("all", "block-ap")

    @property
    def trains_e2e(self) -> bool:
        return self.e2e.epochs > 0 and self.phase in ("all", "e2e")

    @property
    def continues_to_e2e(self) -> bool:
        """Whether E2E-QP follows Block-AP in this run."""
        return self.phase == "all" and self.e2e.epochs > 0

    def blockap_record(self) -> dict:
        """What must match for finished blocks (and a finished Block-AP phase) to be reused: the
        manifest's and results.json's `settings`, compared key by key on resume."""
        b = self.blockap
        record = {"model": self.model, "wbits": self.quant.bits, "group_size": self.quant.group_size,
                  "epochs": b.epochs, "batch_size": b.batch_size, "train_size": b.train_size,
                  "val_size": b.val_size, "seqlen": b.seqlen, "quant_lr": b.quant_lr, "weight_lr": b.weight_lr,
                  "min_lr_factor": b.min_lr_factor, "max_grad_norm": b.max_grad_norm,
                  "train_norms": b.train_norms, "calib_dataset": b.calib_dataset,
                  "student_input": b.student_input, "dtype": self.machine.dtype, "seed": self.seed}
        for key, value in (("init", self.quant.init), ("loss", b.loss), ("grid", self.quant.grid)):
            if value != RECORD_DEFAULTS[key]:  # absent at the default: earlier records stay comparable
                record[key] = value
        if b.correction_fraction is not None:  # a schedule with a correction (settle.py leaves it None elsewhere)
            record |= {"correction_fraction": b.correction_fraction, "correction_lr": b.correction_lr}
        return record


# The parts whose fields are the run's settings, in the order `--help` shows them, and their headings
SETTING_PARTS = (RunConfig, QuantConfig, BlockAPConfig, StreamsConfig, MachineConfig, EvalConfig, E2EConfig)
SETTING_TITLES = {QuantConfig: "quantization", BlockAPConfig: "Block-AP (the official code's names)",
                  StreamsConfig: "Block-AP's activation stores", MachineConfig: "this machine and the job",
                  EvalConfig: "evaluation", E2EConfig: "E2E-QP (the paper's defaults)"}


def per_width_lr(asked: float | None, bits: int) -> float:
    """`weight_lr` and `e2e_lr` when left out: the paper's, 2e-5 at 2 bits and 1e-5 at 3, 4 and 8 bits."""
    return asked if asked is not None else (2e-5 if bits <= 2 else 1e-5)
