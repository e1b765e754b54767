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

from ..cluster.launch import Launch
from ..pipelines.schedules import SCHEDULES, schedule_named
from ..quant import QuantConfig
from ..utils.compare import RECORD_DEFAULTS
from ..utils.stop import DEFAULT as STOP_DEFAULT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PHASES = ("all", "block-ap", "e2e", "eval")
STUDENT_INPUTS = tuple(SCHEDULES)  # Block-AP schedules by name (pipelines/schedules.py)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it in backquotes and says the fix."""


@dataclass(frozen=True)
class BlockAPConfig:
    """Block-AP: the official code's settings, plus how the student's input stream is scheduled."""
    epochs: int = 2  # 0 = round-to-nearest only
    batch_size: int = 2
    train_size: int = 4096
    val_size: int = 64
    seqlen: int = 2048
    quant_lr: float = 1e-4
    weight_lr: float = 2e-5
    min_lr_factor: float = 20.0
    max_grad_norm: float = 1.0
    train_norms: bool = True
    calib_dataset: str = "boolq"
    student_input: str = "student"
    correction_fraction: float | None = None  # pipelined only: share of steps on the quantized stream
    correction_lr: str | None = None  # pipelined only: "continue" or "restart"
    data_parallel: int | None = None  # D: group ranks that split the windows; None: chosen at start
    sequence_parallel: int | None = None  # S: group ranks that split each window's tokens; None: chosen at start
    loss: str = "mse"  # what a block minimises (blockap/losses.py); mse is the paper's

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
    placement: str = "cpu"  # gpu | cpu | disk
    folder: Path | None = None  # disk stores: None = the run folder's own (RunFolder.activations)
    host_memory_budget_gib: float | None = None  # per node; None = 90% of this machine's memory
    on_gpu_gib: float | None = None  # per rank, of host/disk stores kept on the GPU; None = as the plan needs


@dataclass(frozen=True)
class E2EConfig:
    """E2E-QP on DeepSpeed (paper defaults)."""
    epochs: int = 1  # 0 = no E2E-QP
    train_size: int = 4096
    seqlen: int = 4096
    global_batch: int = 32
    micro_batch: int = 1
    lr: float = 2e-5
    warmup: float = 0.03
    max_grad_norm: float = 0.3
    save_every: int = 50
    keep_checkpoints: int = 1
    grad_checkpointing: bool = True
    ds_config: str = "zero3-offload"
    data: str = "boolq"  # a text source (windows) or chat data (data/chat.py); from the flags: the calibration set's


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity and zero-shot accuracy after each phase."""
    datasets: tuple[str, ...] = ("wiki", "news")
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    zeroshot_tasks: tuple[str, ...] = ()
    zeroshot_limit: int | None = None
    skip_fp: bool = False

    @property
    def datasets_text(self) -> str:
        """As results.json has always recorded them: one comma list."""
        return ",".join(self.datasets)


@dataclass(frozen=True)
class MachineConfig:
    """This process: its device (bound at start-up), precision, and place in the job."""
    device: torch.device = torch.device("cpu")
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16, as asked
    amp_dtype: torch.dtype | None = None  # resolved: autocast dtype, None = float32
    launch: Launch | None = None  # None only in a plan (no process is launched)
    single_gpu: bool = False
    peer_timeout: float = 600.0
    kernels: bool = True
    compile: bool = False  # Block-AP's block step through torch.compile (blockap/compiled.py)
    weight_work: str = "auto"  # data-parallel Block-AP: split | replicated | auto (blockap/weight_shards.py)
    stop_signals: tuple[str, ...] = STOP_DEFAULT  # besides SIGTERM and SIGINT (utils/stop.py)

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
    model: str
    output: Path
    quant: QuantConfig
    blockap: BlockAPConfig = field(default_factory=BlockAPConfig)
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    machine: MachineConfig = field(default_factory=MachineConfig)
    phase: str = "all"
    from_dir: Path | None = None  # --phase e2e/eval: the packed model to start from (resolved: never None there)
    seed: int = 0
    export_dtype: str = "float16"
    export_formats: tuple[str, ...] = ("gptq_v2",)  # gptq_v2 first, always written; then serving formats
    tensorboard: bool = True
    overwrite: bool = False
    discard_unfinished: bool = False  # with overwrite: also an unfinished run of the same settings
    take_over_lock: bool = False
    ignore_plan: bool = False
    debug: bool = False
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
        if schedule_named(b.student_input).has_correction:
            record |= {"correction_fraction": b.correction_fraction, "correction_lr": b.correction_lr}
        return record
