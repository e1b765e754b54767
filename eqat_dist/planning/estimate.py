"""Per-rank memory, disk and time of each phase, from the architecture and the run's settings.

The model follows what the code does today (which tensor lives where, in which dtype), term by term,
so each figure can be read and checked. Constants that are not shapes are stated here:
- GPU processes pay CUDA_CONTEXT (context, cuBLAS workspace, allocator slack);
- every process pays HOST_BASE (Python, torch, transformers, DeepSpeed loaded): 0.35 GiB measured on
  a CPU build; a CUDA build maps its libraries too (1.5 GiB assumed);
- activations saved for backward per token and block: ACT_H x hidden + ACT_I x intermediate values
  (attention through SDPA/flash, so no T x T scores are kept); measured on CPU by bench/scaling.py;
- fake quantization keeps FAKE_QUANT_COPIES float32 copies of each weight alive during a step;
- a Block-AP process also holds its libraries' state, the tokenizer and the tokenized calibration
  text: BLOCKAP_PROCESS, measured on CPU (bench/scaling.py: 0.6 GiB beyond the other terms on both
  SmolLM2 and synth-0.4b);
- E2E-QP on a CPU holds more than the terms above: E2E_CPU_FIXED + E2E_CPU_PER_WEIGHT bytes per weight
  + E2E_CPU_PER_WEIGHT_SHARDED / ranks, fitted to the measured peaks of SmolLM2, synth-0.4b and synth-1b
  on 1 and 2 ranks (bench/scaling.py; DeepSpeed's buffers and its libraries, not broken down yet; the
  fit leaves nothing that shrinks with ranks beyond the partitioned terms above). Where it lives on a
  GPU run is not measured here (no GPU), so GPU plans leave it out;
- time = FLOPs / (device peak x efficiency); the efficiencies are fitted to the paper's Llama-2-7B
  times on one A100-80GB (Block-AP 3.3 h, E2E-QP 1.5 h; the plan gives 3.0 h and 1.5 h) and checked
  against its 70B times (Block-AP 30.7 h vs 26.6 h, +15%; E2E-QP +7%). Block-AP's wall time on N ranks
  comes from the schedule's timeline (timeline.py) over per-block training, forward and transfer times.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field, replace

from ..blockap.lanes import Lanes, group_layout, step_generator
from ..config.run_config import BlockAPConfig, E2EConfig, EvalConfig, MachineConfig, StreamsConfig
from ..export.shards import MAX_SHARD_BYTES
from ..quant import QuantConfig
from ..pipelines.stream_order import CHUNK_BATCHES, receiver_lead
from .arch import Arch
from .timeline import BlockTimes, blockap_seconds

GIB = 2**30
CUDA_CONTEXT = 0.6 * GIB
ZERO_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements); the H200's E2E-QP peak showed it
HOST_BASE = {"cpu": 0.4 * GIB, "gpu": 1.5 * GIB}
ACT_H, ACT_I = 18, 5
FAKE_QUANT_COPIES = 3
BLOCKAP_PROCESS = 0.6 * GIB
E2E_CPU_FIXED, E2E_CPU_PER_WEIGHT, E2E_CPU_PER_WEIGHT_SHARDED = 0.69 * GIB, 1.02, 0.0
LINK_BYTES_PER_S = {"gpu": 10e9, "cpu": 2e9}  # activations rank to rank through host memory (assumed)
# A group's collectives (gradient sums, the split weight work's broadcasts and reduce-scatters, the
# sequence split's key/value exchanges) at NCCL's bus bandwidth: an all-reduce of B bytes over W ranks
# takes B x 2 (W-1)/W / bandwidth, a broadcast or reduce-scatter half that. Inside a node NVLink
# (nccl-tests' all_reduce bus bandwidth on 8 GPUs at large sizes: about 230 GB/s on A100 SXM4, 450 on
# H100/H200 SXM5; taken as stated, `link_gbs` overrides), across nodes one 200 Gb/s InfiniBand port per
# GPU (`network_gbs`); on CPUs through MPI or gloo in host memory (not measured as such).
BUS_BYTES_PER_S = {"a100": 230e9, "h100": 450e9, "h200": 450e9, "cpu": 2e9}
NETWORK_BYTES_PER_S = {"gpu": 20e9, "cpu": 1e9}
# The work a step does on the block's weights whatever its batch (fake quantization forward and
# backward, the clipping's norm, AdamW, gradient copies), per quantized weight: memory-bound. Measured
# 18.8 ms for a Llama-2-70B block's 855M weights on an H200 (docs/benchmarks.md, "Second GPU loan"): 22 ps
# a weight; the other GPUs scaled by their memory bandwidth (4.8 / 3.35 / 2.0 TB/s); one CPU core: about
# 11 ns (bench/weight_work.py on a SmolLM2 block). Part of the fitted step time on one rank; a group that
# repeats it on every rank (`weight_work` replicated) does not divide it.
WEIGHT_WORK_S = {"h200": 22e-12, "h100": 22e-12 * 4.8 / 3.35, "a100": 22e-12 * 4.8 / 2.0, "cpu": 11e-9}
PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h200": 989.0, "cpu": 0.09}  # bf16 dense; cpu: 2 cores, measured
EFFICIENCY = {"block-ap": 0.28, "e2e": 0.54, "eval": 0.40}
EVAL_TOKENS = {"wikitext2": 340_000, "c4": 256 * 2048, "wiki": 584_000, "news": 76_000}  # per dataset
ZEROSHOT_TOKENS_PER_ITEM = {"piqa": 2 * 60, "arc_easy": 4 * 40, "arc_challenge": 4 * 45, "hellaswag": 4 * 110,
                            "winogrande": 2 * 30}
ZEROSHOT_ITEMS = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "winogrande": 1267}
PHASES = ("block-ap", "e2e", "export", "eval")


@dataclass(frozen=True)
class Settings:
    """What a plan depends on: the run's settings as its RunConfig parts hold them (config/run_config.py,
    declared there once), and the machine planned for. planning.settings_for makes it from a RunConfig."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    blockap: BlockAPConfig = field(default_factory=BlockAPConfig)
    streams: StreamsConfig = field(default_factory=lambda: StreamsConfig(placement="cpu"))
    e2e: E2EConfig = field(default_factory=E2EConfig)  # epochs 0 where the run trains no E2E-QP
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    machine: MachineConfig = field(default_factory=MachineConfig)  # precision and weight work, as asked
    ranks: int = 1
    ranks_per_node: int = 8
    device: str = "gpu"  # gpu | cpu: what the plan is for (not this process's device)
    gpu: str = "a100"
    link_gbs: float | None = None  # bus bandwidth inside a node, GB/s (default BUS_BYTES_PER_S)
    network_gbs: float | None = None  # across nodes, GB/s (default NETWORK_BYTES_PER_S)
    zero_stage: int = 3  # E2E-QP's DeepSpeed config, as read from `ds_config`
    offload: bool = True
    zero_bucket: int = ZERO_REDUCE_BUCKET  # elements: ZeRO's gradient bucket (`reduce_bucket_size`)
    tflops: float | None = None  # overrides PEAK_TFLOPS x EFFICIENCY

    def changed(self, changes: dict) -> "Settings":
        """These settings with `changes` applied: {"ranks": 1, "blockap.batch_size": 1, ...}."""
        parts, own = {}, {}
        for key, value in changes.items():
            part, _, name = key.rpartition(".")
            (parts.setdefault(part, {}) if part else own)[name] = value
        return replace(self, **own, **{part: replace(getattr(self, part), **v) for part, v in parts.items()})

    @property
    def act_bytes(self) -> int:
        """Bytes of an activation: 16-bit AMP on a GPU, float32 on a CPU (or as `dtype` asks)."""
        if self.machine.dtype == "auto":
            return 2 if self.device == "gpu" else 4
        return 4 if self.machine.dtype == "float32" else 2

    @property
    def on_gpu(self) -> float:
        """Bytes per rank of the host/disk stores kept on the GPU (`activations_on_gpu`)."""
        return (self.streams.on_gpu_gib or 0.0) * GIB

    @property
    def correction(self) -> float:
        """Pipelined: the share of each block's steps on the quantized stream (default 1/groups)."""
        return self.blockap.correction_fraction or self.width / self.ranks

    @property
    def kept_checkpoints(self) -> int:
        """E2E-QP checkpoints on disk at once (`e2e_keep_checkpoints` 0 keeps all: planned as 10)."""
        return self.e2e.keep_checkpoints or 10

    @property
    def layout(self) -> tuple[int, int]:
        """(D, S) as the run chooses them (blockap/lanes.group_layout)."""
        b = self.blockap
        return group_layout(self.ranks, self.ranks_per_node, b.batch_size, b.seqlen, b.data_parallel,
                            b.sequence_parallel, b.student_input in (None, "student"))

    @property
    def data_width(self) -> int:
        """D: the group's ranks that split the windows (each holds 1/D of them)."""
        return self.layout[0]

    @property
    def split(self) -> int:
        """S: the group's ranks that split each window's tokens."""
        return self.layout[1]

    @property
    def width(self) -> int:
        """D x S: ranks that train each block together."""
        d, s = self.layout
        return d * s

    @property
    def splits_weight_work(self) -> bool:
        work = self.machine.weight_work
        return work == "split" or (work == "auto" and self.device == "cpu")

    def bus(self, ranks: int) -> float:
        """Bytes per second of a collective over `ranks` consecutive ranks (inside a node or not)."""
        if ranks <= self.ranks_per_node:
            return self.link_gbs * 1e9 if self.link_gbs else BUS_BYTES_PER_S["cpu" if self.device == "cpu" else self.gpu]
        return self.network_gbs * 1e9 if self.network_gbs else NETWORK_BYTES_PER_S[self.device]

    @property
    def groups(self) -> int:
        """G: groups of ranks the blocks go round-robin over."""
        return self.ranks // self.width

    @property
    def mode(self) -> str:
        return self.blockap.student_input or ("pipelined" if self.groups > 1 and self.split == 1 else "student")

    @property
    def schedule(self):
        """The Block-AP schedule's own description (pipelines/schedules.py)."""
        from ..pipelines.schedules import schedule_named
        return schedule_named(self.mode, self.correction)


@dataclass
class Phase:
    gpu_peak: float = 0.0   # bytes per rank, largest rank (0 on a CPU-only run)
    host_peak: float = 0.0  # bytes per rank, largest rank
    disk: float = 0.0       # bytes per node
    seconds: float = 0.0
    terms: dict = field(default_factory=dict)  # name -> bytes, what the peaks are made of
    note: str = ""
    terms_seconds: dict = field(default_factory=dict)  # Block-AP: one block's training by what it is spent on

    def as_dict(self) -> dict:
        return {"gpu_peak_gib": self.gpu_peak / GIB, "host_peak_gib": self.host_peak / GIB,
                "disk_gib": self.disk / GIB, "hours": self.seconds / 3600,
                "terms_gib": {k: v / GIB for k, v in self.terms.items()}, "note": self.note}


def _flops_per_second(s: Settings, phase: str) -> float:
    if s.tflops:
        return s.tflops * 1e12
    return PEAK_TFLOPS["cpu" if s.device == "cpu" else s.gpu] * 1e12 * (1.0 if s.device == "cpu" else EFFICIENCY[phase])


def _place(phase: Phase, device_terms: dict, host_terms: dict, s: Settings) -> Phase:
    """Device terms go to the GPU (plus its context), or to host memory on a CPU-only run."""
    if s.device == "gpu":
        device_terms = device_terms | {"cuda context": CUDA_CONTEXT}
        phase.gpu_peak = sum(device_terms.values())
        phase.host_peak = sum(host_terms.values())
    else:
        phase.host_peak = sum(device_terms.values()) + sum(host_terms.values())
    phase.terms = {**{f"device: {k}": v for k, v in device_terms.items()}, **{f"host: {k}": v for k, v in host_terms.items()}}
    return phase


def packed_bytes(a: Arch, s: Settings, scale_bytes: int = 2) -> dict:
    """The quantized linears of the whole model: integer codes, zero points, scales, g_idx."""
    groups = a.layers * a.groups(s.quant.group_size)
    return {"qweight": a.layers * a.block_linear_params * s.quant.bits / 8, "qzeros": groups * s.quant.bits / 8,
            "scales": groups * scale_bytes, "g_idx": a.layers * sum(i for _, i in a.linears.values()) * 4}


def pinned_block(nbytes: float) -> float:
    """What PyTorch's caching host allocator reserves for a pinned tensor: the size rounded up to a
    power of two (a 48 MiB batch pins 64 MiB)."""
    return float(2 ** math.ceil(math.log2(nbytes))) if nbytes > 0 else 0.0


def pinned_staging(a: Arch, s: Settings) -> float:
    """Pinned staging buffers between host (or disk) stores and the GPU (blockap/feed.py, stores.py):
    two per store a batch reads (training reads input and target; a stream pass one), and two per
    store the GPU writes rows into (written behind), each of one batch's rows."""
    batch = pinned_block(s.blockap.batch_size // s.data_width * s.blockap.seqlen // s.split * a.hidden * s.act_bytes)
    written = s.schedule.stores_per_split(s.groups) * 2  # stores per split x splits
    return batch * (2 * 2 + 2 * 1 + 2 * written)


def block_ap(a: Arch, s: Settings) -> Phase:
    block, linear, groups = a.block_params, a.block_linear_params, a.groups(s.quant.group_size)
    if s.blockap.epochs == 0:  # round-to-nearest on rank 0, block by block on the host
        host = {"base": HOST_BASE[s.device], "embeddings, lm_head (float32)": a.embedding_params * 4,
                "one block and its packed form": block * 8}
        return _place(Phase(seconds=a.layers * block * 4 / 2e9, note="round-to-nearest (`epochs` 0): no training"),
                      {}, host, s)
    width, d, local = s.width, s.data_width, s.blockap.seqlen // s.split
    tokens = s.blockap.batch_size // d * local  # this rank's share of a step: its windows' rows, its tokens of them
    # this rank's share of the windows (blockap/lanes.py: the largest share), in each of the schedule's
    # stores per split (fp in, fp out unless in place, quantized stream unless in the fp input's), train + val
    train, val = lane_share(s.blockap.train_size, s.blockap.batch_size, d), lane_share(s.blockap.val_size, s.blockap.batch_size, d)
    store = s.schedule.stores_per_split(s.groups) * (train + val) * local * a.hidden * s.act_bytes
    device = {
        "fp block (float32)": block * 4,
        "student weights, grads, Adam (float32)": linear * 16 + 2 * groups * 16 + 2 * a.hidden * 16,
        "fake-quant temporaries": linear * 4 * FAKE_QUANT_COPIES,
        "activations for backward": tokens * (ACT_H * a.hidden + ACT_I * a.intermediate) * s.act_bytes,
        "batch and MSE in float32": tokens * a.hidden * (2 * s.act_bytes + 3 * 4),
    }
    if s.split > 1:  # the window's keys and values gathered, then repeated to every query head
        device["gathered keys and values"] = s.blockap.batch_size // d * s.blockap.seqlen * (2 * a.kv_width + 2 * a.q_width) * s.act_bytes
    if width > 1 and s.splits_weight_work:  # every linear's quantized weight and its gradient (weight_shards.py)
        device["split weight work: gathered weights and their gradients"] = linear * 4 * 2
    host = {"base": HOST_BASE[s.device], "libraries, tokenizer, tokenized calibration text": BLOCKAP_PROCESS,
            "embeddings, lm_head (float32)": a.embedding_params * 4, "fp block read from the checkpoint": block * 4}
    phase = Phase()
    if s.device == "gpu" and s.streams.placement != "gpu":
        host["pinned staging buffers"] = pinned_staging(a, s)
    kept = min(store, s.on_gpu) if s.device == "gpu" and s.streams.placement != "gpu" else 0.0  # rows on the GPU
    if s.streams.placement == "gpu":
        device["activation stores"] = store
    elif s.streams.placement == "cpu":
        host["activation stores"] = store - kept
    else:
        phase.disk = (store - kept) * min(s.ranks, s.ranks_per_node)
    if kept:
        device["activation stores kept on the GPU"] = kept
    phase.disk += sum(packed_bytes(a, s, scale_bytes=4).values()) + a.layers * 2 * a.hidden * 4  # block files
    times = block_times(a, s, train, val)
    phase.seconds = blockap_seconds(a.layers, s.groups, s.schedule, times)
    alone = one_rank_seconds(a, s)
    detail = (f", last {s.correction:.0%} of each block's steps on the quantized stream"
              if s.schedule.receives_quantized_early else "")
    layout = f" over {s.groups} group(s) of {layout_words(s)}{cost_words(times)}" if width > 1 else ""
    split = f" ({kept / GIB:.1f} GiB of them on the GPU)" if kept else ""
    phase.note = (f"{s.mode} mode{detail}{layout}: {alone / phase.seconds:.1f}x the paper's one-rank time; stores "
                  f"{store / GIB:.1f} GiB per rank on {s.streams.placement}{split}")
    phase.terms_seconds = times.parts()
    return _place(phase, device, host, s)


def one_rank_seconds(a: Arch, s: Settings) -> float:
    """The paper's scheme on one rank: student mode, every window and token."""
    one = s.changed({"ranks": 1, "ranks_per_node": 1, "blockap.data_parallel": 1, "blockap.sequence_parallel": 1,
                     "blockap.student_input": "student"})
    return blockap_seconds(a.layers, 1, "student", block_times(a, one, s.blockap.train_size, s.blockap.val_size))


def layout_words(s: Settings) -> str:
    d, sp = s.layout
    what = [f"{d} data-parallel"] if d > 1 else []
    what += [f"{sp} sequence-parallel"] if sp > 1 else []
    work = f", weight work {'split' if s.splits_weight_work else 'replicated'}"
    return f"{s.width} ranks ({' x '.join(what)}{work})"


def cost_words(t: "BlockTimes") -> str:
    """What a group's ranks wait for, as shares of a block's training."""
    parts = {k: v for k, v in t.parts().items() if k != "computing" and v > 0}
    if not parts:
        return ""
    return " (" + ", ".join(f"{k} {v / max(t.train, 1e-9):.0%}" for k, v in parts.items()) + " of training)"


def lane_share(count: int, batch: int, width: int) -> int:
    """Windows of the largest rank's share (blockap/lanes.py: rank 0 holds lanes 0 .. B/D - 1)."""
    return sum(len(range(lane, count, batch)) for lane in range(batch // width))


def exposed_sum_seconds(grad_bytes: float, width: int, step_seconds: float, device: str, bus: float) -> float:
    """The part of one step's gradient sum that the step waits for. A ring all-reduce moves 2 (W-1)/W
    of the bytes per rank. On GPUs (NCCL) the buckets' sums run during the backward, about 4/6 of the
    step's FLOPs (blockap/grad_sum.py): only what exceeds it, and the last bucket, is waited for. MPI and
    gloo on CPUs sum after the backward."""
    from ..blockap.grad_sum import BUCKET_BYTES

    per_byte = 2 * (width - 1) / width / bus
    total = grad_bytes * per_byte
    if device != "gpu":
        return total
    return max(total - 4 / 6 * step_seconds, min(grad_bytes, BUCKET_BYTES) * per_byte)


def block_times(a: Arch, s: Settings, train: int, val: int, rate: float | None = None) -> BlockTimes:
    """One block's times on one rank of a group of D x S ranks that holds `train` + `val` windows of each
    stream (its 1/D of them) and 1/S of each window's tokens: training (its share of every step's token
    work, the weight work, what the step waits for in the group's collectives, the loss evaluations),
    the block forward over its share of a stream (with the split attention's exchanges), and handing
    that share on."""
    rate = rate or _flops_per_second(s, "block-ap")
    block, width, sp = a.block_params, s.width, s.split
    local = s.blockap.seqlen // sp
    per_token = 6 * block + 6 * 2 * a.hidden * s.blockap.seqlen  # + attention: this rank's queries, the window's keys
    steps_tokens = s.blockap.epochs * train * local
    eval_tokens = (s.blockap.epochs + 2) * val * local  # loss before, after each epoch, after (the streams: below)
    steps_per_epoch = -(-s.blockap.train_size // s.blockap.batch_size)
    steps = s.blockap.epochs * steps_per_epoch
    step_tokens = train * local / steps_per_epoch  # this rank's tokens of a step
    step_seconds = per_token * step_tokens / rate
    stream_windows = train + val
    t = BlockTimes(train=(per_token * steps_tokens + 2 * block * eval_tokens) / rate,
                   forward=(2 * block + 2 * 2 * a.hidden * s.blockap.seqlen) * stream_windows * local / rate,
                   transfer=stream_windows * local * a.hidden * s.act_bytes / 2 / LINK_BYTES_PER_S[s.device])
    if width > 1:
        bus = s.bus(width)
        linear = a.block_linear_params
        grads = (linear + 2 * a.groups(s.quant.group_size) + 2 * a.hidden) * 4
        work = WEIGHT_WORK_S["cpu" if s.device == "cpu" else s.gpu] * linear  # one step's, on one rank
        if s.splits_weight_work:  # each rank its 1/W of the work, which the fitted rate already divides; the
            # owners broadcast their quantized weights (in the autocast dtype) before the step, and each
            # owner's gradients are reduced to it (on GPUs during the backward, as they come: weight_shards.py)
            t.weights = steps * linear * s.act_bytes * (width - 1) / width / bus
            reduce = grads * (width - 1) / width / bus
            exposed = reduce if s.device != "gpu" else max(reduce - 4 / 6 * step_seconds, reduce / width)
            t.allreduce = steps * exposed
        else:  # every rank repeats the whole step's weight work; the gradients all-reduce (overlapped on GPUs)
            t.weights = steps * work * (1 - 1 / width)
            t.allreduce = steps * exposed_sum_seconds(grads, width, step_seconds, s.device, bus)
        if sp > 1:  # keys and values of the window to every rank of the S and their gradients back:
            # an all-reduce of the whole window's each way (models/sequence_split.py)
            kv = 2 * s.blockap.batch_size // s.data_width * s.blockap.seqlen * a.kv_width * s.act_bytes
            per_pass = kv * 2 * (sp - 1) / sp / s.bus(sp)
            evals = (s.blockap.epochs + 2) * -(-val // max(1, s.blockap.batch_size // s.data_width))
            t.exchange = steps * 2 * per_pass + evals * per_pass
            t.forward += -(-stream_windows // max(1, s.blockap.batch_size // s.data_width)) * per_pass
        t.train += t.weights + t.allreduce + t.exchange
    if s.schedule.keeps_quantized_stream and s.groups > 1:
        t.stream_lead = stream_lead(s, t, val)
    return t


def stream_lead(s: Settings, t: BlockTimes, val: int) -> float:
    """A block's wait for the rows of its quantized input (stream_order.receiver_lead), on this plan's
    lanes and steps from its switch (pipelined) or its first (student); the run's own order, drawn for
    block 1."""
    lanes = Lanes(s.blockap.train_size, s.blockap.batch_size, s.data_width, 0)
    total = s.blockap.epochs * lanes.steps_per_epoch
    switch = s.schedule.switch_at(total) or 0
    first = lanes.first_reads(step_generator(0, 1), s.blockap.epochs, switch)
    rows = len(first)
    return receiver_lead(first, s.blockap.batch_size // s.data_width * CHUNK_BATCHES, val, t.forward / (rows + val),
                         t.train / total, range(switch, total))


def e2e(a: Arch, s: Settings) -> Phase:
    w = s.act_bytes
    shards = s.ranks if s.zero_stage == 3 else 1
    ints = (a.layers * a.block_linear_params + a.layers * a.groups(s.quant.group_size)) * s.quant.bits / 8
    scales = a.layers * a.groups(s.quant.group_size)
    frozen = a.embedding_params * w + a.layers * 2 * a.hidden * w + ints
    optimizer = scales * ((4 if w == 2 else 0) + 8 + 4)  # fp32 master (16-bit training), Adam m and v, grads
    mb, T = s.e2e.micro_batch, s.e2e.seqlen
    largest = a.largest_linear()
    working = {
        "gathered layers: packed, unpacked codes, dequantized weight": largest * (s.quant.bits / 8 + 4 + w) * 2,  # + prefetch
        "activations (checkpointed layer inputs)": (a.layers if s.e2e.grad_checkpointing else 0) * mb * T * a.hidden * w,
        "activations (one layer recomputed)" if s.e2e.grad_checkpointing else "activations (all layers)":
            (1 if s.e2e.grad_checkpointing else a.layers) * mb * T * (ACT_H * a.hidden + ACT_I * a.intermediate) * w,
        "logits, float32 loss and its gradient": mb * T * a.vocab * (w + 8),
    }
    if s.zero_stage > 0:  # allocated whole on the GPU at the engine's start, whatever is trained (stage3.py)
        working["ZeRO gradient bucket (reduce_bucket_size)"] = s.zero_bucket * w
    if shards > 1:  # the embedding and the output head are gathered whole for their forward (one at a time)
        working["gathered embedding / output head"] = a.vocab * a.hidden * w
    sharded = {"integer weights, embeddings, norms": frozen / shards, "scales": scales * w / shards}
    host = {"base": HOST_BASE[s.device]}
    if s.device == "cpu":
        host["working set measured on CPU (fitted)"] = (E2E_CPU_FIXED + E2E_CPU_PER_WEIGHT * a.total_params
                                                        + E2E_CPU_PER_WEIGHT_SHARDED * a.total_params / shards)
    if s.offload and s.zero_stage == 3:
        host |= {k + " (offloaded)": v for k, v in sharded.items()}
        host["optimizer over scales (offloaded)"] = optimizer / shards
        device = working
    else:
        device = working | sharded | {"optimizer over scales": optimizer / shards}
    phase = Phase()
    phase.disk = s.kept_checkpoints * (optimizer + frozen + scales * w)
    tokens = s.e2e.epochs * s.e2e.train_size * s.e2e.seqlen
    flops = (8 if s.e2e.grad_checkpointing else 6) * a.total_params * tokens
    phase.seconds = flops / s.ranks / _flops_per_second(s, "e2e")
    phase.note = f"ZeRO-{s.zero_stage}{' with CPU offload' if s.offload else ''} over {s.ranks} rank(s)"
    return _place(phase, device, host, s)


def export(a: Arch, s: Settings) -> Phase:
    """Written block by block, also after E2E-QP (each block's partitions gathered in turn, the block's
    integers read from the checkpoint E2E-QP started from): about one block in memory and the shard being
    gathered (export/shards.py), never the model."""
    packed = sum(packed_bytes(a, s, scale_bytes=4).values())
    written = sum(packed_bytes(a, s).values()) + a.embedding_params * 2 + a.layers * 2 * a.hidden * 2
    shard = {"the shard being gathered": min(MAX_SHARD_BYTES, written)}
    host = {"base": HOST_BASE[s.device], "embeddings, lm_head (float32, and their 16-bit copy)": a.embedding_params * 6,
            "one block: float32 weights twice, packed form": a.block_params * 8 + packed / a.layers} | shard
    if s.e2e.epochs > 0:
        after_e2e = {"base": HOST_BASE[s.device], "E2E-QP: embeddings, lm_head read (16-bit)": a.embedding_params * 2,
                     "E2E-QP: one block gathered and the same block read": 2 * packed / a.layers} | shard
        host = max(host, after_e2e, key=lambda terms: sum(terms.values()))
    phase = Phase(disk=written, seconds=written / 1e9 + a.layers * a.block_params * 4 / 2e9, note="block by block")
    return _place(phase, {}, host, s)


def evaluate(a: Arch, s: Settings) -> Phase:
    if not s.evaluation.datasets and not s.evaluation.zeroshot_tasks:
        return Phase(note="skipped (no `eval_datasets`, no `zeroshot_tasks`)")
    tokens = 0
    for name in s.evaluation.datasets:
        cap = EVAL_TOKENS.get(name, 340_000)
        tokens += min(cap, s.evaluation.max_windows * s.evaluation.seqlen) if s.evaluation.max_windows else cap
    for t in s.evaluation.zeroshot_tasks:
        tokens += ZEROSHOT_TOKENS_PER_ITEM[t] * min(ZEROSHOT_ITEMS[t], s.evaluation.zeroshot_limit or ZEROSHOT_ITEMS[t])
    quantized = sum(packed_bytes(a, s, scale_bytes=4).values()) + a.embedding_params * 4
    device = {"packed model (float32 scales and embeddings)": quantized,
              "one layer unpacked and dequantized (float32)": a.largest_linear() * 8,
              "logits and loss (float32)": s.evaluation.batch_size * s.evaluation.seqlen * a.vocab * 8}
    if not s.evaluation.skip_fp:  # loaded after the packed model is freed: the larger of the two counts
        # float32 on a CPU; on GPUs the training dtype, spread over the node's GPUs (accelerate's device map)
        gpus = min(s.ranks, s.ranks_per_node) if s.device == "gpu" else 1
        fp = a.total_params * (2 if s.device == "gpu" else 4) / gpus
        if fp > quantized:
            what = "full-precision model (float32)" if s.device == "cpu" else \
                f"full-precision model (16-bit), 1/{gpus} of it per GPU" if gpus > 1 else "full-precision model (16-bit)"
            device = {what: fp, "logits and loss (float32)": device["logits and loss (float32)"]}
    host = {"base": HOST_BASE[s.device], "model read before moving to the device": max(device.values())}
    models = 1 if s.evaluation.skip_fp else 2
    phase = Phase(seconds=models * 2 * a.total_params * tokens / _flops_per_second(s, "eval"),
                  note=f"rank 0 alone, {models} model(s), about {tokens / 1e6:.1f}M tokens each")
    return _place(phase, device, host, s)


def resolved(a: Arch, s: Settings) -> Settings:
    """`weight_work` auto made what the run does: split on CPUs; on GPUs, of split and replicated, the one
    this plan finds faster for the group (the run asks the same: phases/blockap.py)."""
    if s.machine.weight_work != "auto" or s.device == "cpu" or s.width == 1:
        return s
    train, val = lane_share(s.blockap.train_size, s.blockap.batch_size, s.data_width), lane_share(s.blockap.val_size, s.blockap.batch_size, s.data_width)
    options = [s.changed({"machine.weight_work": w}) for w in ("replicated", "split")]
    return min(options, key=lambda o: block_times(a, o, train, val).train)


def plan(a: Arch, s: Settings) -> dict[str, Phase]:
    s = resolved(a, s)
    return {"block-ap": block_ap(a, s), "e2e": e2e(a, s) if s.e2e.epochs > 0 else Phase(note="skipped"),
            "export": export(a, s), "eval": evaluate(a, s)}
