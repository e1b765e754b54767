"""Block-AP over N ranks (N = 1: the paper's single-GPU mode, same code): the rank loop and the
hand-off of activations; what a block trains on, and when, is its schedule's (schedules.py).

The N ranks form G = N / D groups of D consecutive ranks (D: `data_parallel`). Block i is trained by
group i mod G; inside a group every rank trains the same block on its own share of the calibration
windows (blockap/lanes.py), the gradients summed over the group every step, so the D ranks take the
steps one rank would take with all the windows, each holding 1/D of every stream. D = 1 is the plain
round-robin over ranks; G = 1 is pure data parallelism (no hand-off at all).

The full-precision ("teacher") stream flows from group to group in chunks: the owner of block i runs
the fp block on each chunk of its input as it arrives and sends the result on to the owner of block i+1
at once (non-blocking), so every group starts early; rank d of a group hands its share to rank d of the
next. A schedule that keeps the quantized stream advances it with the finished block and hands it on,
chunk by chunk in the order the receiving block's steps will read it, and the receiver trains as its
rows come in (stream_order.py): from its first step (student), or from its switch (pipelined, the
stream received into the fp input's store, whose rows the block no longer reads then: two stores, not
three; the sender waits at most until the switch). Streams are updated in place where the schedule
allows.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..blockap.checkpoint import finished_blocks, open_run, save_block
from ..blockap.lanes import Lanes, step_generator
from ..blockap.steps import advance, finish_student, gptq_start, make_student, restore_block
from ..blockap.stores import ActivationStore, describe_memory, remove_stale_stores
from ..blockap.trainer import BlockAPSettings, train_block
from ..cluster.transport import LocalTransport, Transport
from ..config.run_config import StreamsConfig
from ..models.lazy import LazyModel
from ..models.sequence_split import TokenSplit, use_split_attention
from ..quant import QuantConfig
from ..utils.progress import Progress
from ..utils.monitor import Monitor, block_line, stalled_warning
from .schedules import Schedule, schedule_named
from .stream_order import CHUNK_BATCHES, by_first_read, chunks

SPLITS = ("train", "val")
STALL_CHECK_BLOCKS = 2  # a rank's first trained blocks: none moved its loss -> a warning while it is early


@dataclass(frozen=True)
class StreamSpec:
    """This rank's activation stores: where the run puts them (its StreamsConfig as it is: placement, disk
    folder, GiB of their first rows kept on the GPU) and what this process adds."""
    where: StreamsConfig = field(default_factory=lambda: StreamsConfig(placement="cpu"))
    dtype: torch.dtype = torch.float32  # the training precision
    prefix: str = "eqat"  # disk stores: file names of this run (RunFolder.store_prefix), the same on resume
    remove_stale: bool = False  # disk stores: this rank removes the run's files a killed run left (one per node)


def _tag(block: int, stream: int, split: int) -> int:
    return (block * 2 + stream) * 2 + split  # stream 0 = fp, 1 = student; per-pair FIFO keeps chunk order


class _Rank:
    """One rank's state and per-block work (kept apart from `run_blockap` for readability)."""

    def __init__(self, source: LazyModel, cfg, windows, settings, ckpt_dir, device, streams, schedule: Schedule,
                 transport, monitor, progress, data_parallel: int = 1, sequence_parallel: int = 1):
        self.source, self.cfg, self.settings = source, cfg, settings
        self.ckpt_dir, self.device, self.streams, self.schedule = Path(ckpt_dir), torch.device(device), streams, schedule
        self.transport, self.monitor, self.progress = transport, monitor, progress
        self.num_blocks = source.num_blocks
        self.width = data_parallel * sequence_parallel  # D x S: ranks per group
        self.groups = transport.world // self.width  # G: blocks go round-robin over these
        self.group, self.member = divmod(transport.rank, self.width)
        lane_part, token_part = divmod(self.member, sequence_parallel)  # member d*S + s: windows d, tokens s
        cuda = self.device.type == "cuda"
        self.reducer = transport.data_parallel_group(self.width, cuda=cuda)  # sums a step over windows and tokens
        if self.reducer is not None and sequence_parallel > 1:
            self.reducer.role = "Block-AP group"
        tokens = next(iter(windows.values())).shape[1]
        window_group = transport.data_parallel_group(sequence_parallel, cuda=cuda)  # a window's S ranks
        if window_group is not None:
            window_group.role = "sequence-parallel group"
            window_group.exchanges = "attention's exchange of keys and values"
        self.split = TokenSplit(tokens, sequence_parallel, token_part, window_group)
        # this rank's share of each split, and which of its rows each step takes
        self.lanes = {k: Lanes(len(v), settings.batch_size, data_parallel, lane_part) for k, v in windows.items()}
        self.splits = {k: v[self.lanes[k].windows()] for k, v in windows.items()}
        self.batch_size = settings.batch_size // data_parallel  # this rank's rows per step
        self.chunk_rows = self.batch_size * CHUNK_BATCHES
        seqlen = self.split.local_tokens  # a store row: this rank's tokens of a window
        hidden = source.config.hidden_size
        # the same share of every store's rows on the GPU, as far as `device_bytes` goes
        row_bytes = seqlen * hidden * torch.tensor([], dtype=streams.dtype).element_size()
        all_rows = schedule.stores_per_split(self.groups) * sum(len(v) for v in self.splits.values())
        device_bytes = (streams.where.on_gpu_gib or 0.0) * 2**30
        on_device = min(1.0, device_bytes / (all_rows * row_bytes)) if all_rows else 0.0

        def stores(role):
            label = schedule.store_label(role)
            return {k: ActivationStore(len(v), seqlen, hidden, streams.dtype, streams.where.placement, self.device,
                                       streams.where.folder, f"{streams.prefix}-{label}-{k}-r{transport.rank}",
                                       device_rows=int(on_device * len(v)))
                    for k, v in self.splits.items()}

        # per split: the fp stream's input and output (one store when in place), the quantized stream
        self.fp_in = stores("fp_in")
        self.fp_out = self.fp_in if schedule.fp_stream_in_place else stores("fp_out")
        self.shared_q = schedule.shares_fp_input(self.groups)
        self.q = self.fp_in if self.shared_q else stores("q") if schedule.keeps_quantized_stream else None
        self.q_due = None  # the block whose quantized stream comes into the fp input's store at the switch
        self.posted = {}  # receives of the quantized stream posted early: (split, first row) -> receive
        self.start = time.time()
        self.wait_s = 0.0

    def _own_stores(self) -> dict:
        """Every store this rank holds, by its name in the memory line, in the order they were made."""
        named = {f"fp_{k}": s for k, s in self.fp_in.items()}
        if not self.schedule.fp_stream_in_place:
            named |= {f"fp_out_{k}": s for k, s in self.fp_out.items()}
        if self.q is not None and not self.shared_q:
            named |= {f"q_{k}": s for k, s in self.q.items()}
        return named

    def memory_line(self) -> str:
        return describe_memory(self._own_stores())

    def _recv_into(self, store: ActivationStore, a: int, b: int, src: int, tag: int) -> None:
        """Rows a..b from `src`, straight into the store's host memory (a GPU store's through the host)."""
        rows = store.host_rows(a, b)
        buf = rows if rows is not None else torch.empty(b - a, *store.shape, dtype=store.dtype)
        t0 = time.time()
        self.transport.recv(buf, src, tag)
        self.wait_s += time.time() - t0
        if rows is None:
            store.put(list(range(a, b)), buf)

    def _send_from(self, store: ActivationStore, a: int, b: int, dst: int, tag: int) -> None:
        """Rows a..b to `dst`, straight from the store's host memory (unchanged until wait_sends, which
        every block calls before its stores are rewritten); a GPU store's rows come through the host."""
        rows = store.host_rows(a, b)
        self.transport.send(rows if rows is not None else store.get(list(range(a, b))).cpu().contiguous(), dst, tag)

    def owner(self, block: int) -> int:
        """The rank of block `block`'s group that holds the same share as this one (its peer)."""
        return (block % self.groups) * self.width + self.member

    def mine(self) -> list[int]:
        return list(range(self.group, self.num_blocks, self.groups))

    def teacher_stream(self, i: int, fp_block, call) -> None:
        """fp input of block i (embedded, received, or already here) -> fp output, sent on chunk by chunk."""
        remote_in, remote_out = self.groups > 1 and i > 0, self.groups > 1 and i + 1 < self.num_blocks
        src, dst = self.owner(i - 1), self.owner(i + 1)
        for s, (k, ids) in enumerate(self.splits.items()):
            fp_in, fp_out = self.fp_in[k], self.fp_out[k]
            for a, b in chunks(len(ids), self.chunk_rows):
                if i == 0:
                    for c, d in chunks(b - a, self.batch_size):
                        fp_in.put(list(range(a + c, a + d)), self.split.cut(self.source.embed(ids[a + c:a + d])))
                    if self.q is not None and not self.shared_q:  # the student stream starts from the same embeddings
                        self.q[k].put(list(range(a, b)), fp_in.get(list(range(a, b))))
                elif remote_in:
                    self._recv_into(fp_in, a, b, src, _tag(i, 0, s))
                advance(fp_block, fp_in, fp_out, call, self.batch_size, self.settings.amp_dtype, rows=(a, b))
                if remote_out:
                    self._send_from(fp_out, a, b, dst, _tag(i + 1, 0, s))
                self.transport.poll()

    def student_stream_in(self, i: int) -> None:
        """Block i's quantized input before it trains (student; its receives were posted at the block's
        start): the validation rows now, the training rows as the steps read them (quantized_rows_ready),
        or all of them before GPTQ reads them (train_or_restore)."""
        if not self.schedule.starts_on_quantized_stream or i == 0 or self.groups == 1:
            return  # block 0: the embeddings; one group: the stream is already in place
        self.student_stream_ready(val_only=True)

    def post_student_stream(self, i: int) -> None:
        """Receive block i's quantized input from the block's start, while its fp stream runs (straight
        into the store's memory when it is in host memory or on disk); pipelined, into the fp input's
        store, only once the fp phase is over (student_stream_ready posts it then)."""
        if not self.schedule.keeps_quantized_stream or i == 0 or self.groups == 1:
            return
        if self.shared_q:
            self.q_due = i
        else:
            self._post_recvs(i)

    def quantized_chunks(self, i: int) -> list[tuple[int, str, int, int]]:
        """Block i's quantized input as (split index, split, first row, end row), in the order its
        sender advances and sends the chunks and this rank posts their receives: the validation rows
        first, then the training rows in the order block i's steps read them (from its switch, in
        pipelined mode; stream_order.py)."""
        lanes = self.lanes["train"]
        total = self.settings.epochs * lanes.steps_per_epoch
        first = lanes.first_reads(step_generator(self.settings.seed, i), self.settings.epochs,
                                  self.schedule.switch_at(total) or 0)
        index = {k: s for s, k in enumerate(self.splits)}  # a split's index in the message tags
        return ([(index["val"], "val", a, b) for a, b in chunks(len(self.splits["val"]), self.chunk_rows)]
                + [(index["train"], "train", a, b) for a, b in by_first_read(len(first), self.chunk_rows, first)])

    def _post_recvs(self, i: int) -> None:
        for s, k, a, b in self.quantized_chunks(i):
            rows = self.q[k].host_rows(a, b)
            buf = rows if rows is not None else torch.empty(b - a, *self.q[k].shape, dtype=self.q[k].dtype)
            self.posted[k, a] = (k, a, b, buf, rows is None,
                                 self.transport.post_recv(buf, self.owner(i - 1), _tag(i, 1, s)))

    def _wait_posted(self, keys) -> None:
        """Wait for these posted receives (a GPU store's rows then copied in from host memory)."""
        entries = [self.posted.pop(key) for key in keys]
        if not entries:
            return
        t0 = time.time()
        self.transport.wait_recvs([h for *_, h in entries])
        self.wait_s += time.time() - t0
        for k, a, b, buf, copy, _ in entries:
            if copy:
                self.q[k].put(list(range(a, b)), buf)

    def student_stream_ready(self, val_only: bool = False) -> dict:
        """The quantized stream is in (waits for receives posted early); returns its stores. Before a
        block trains on it (`val_only`) only its validation rows are waited for: the training rows are
        waited for as the steps read them (quantized_rows_ready)."""
        if self.q_due is not None:  # the fp input is spent: the stream may land in its store now
            self._post_recvs(self.q_due)
            self.q_due = None
        self._wait_posted([key for key in self.posted if not val_only or key[0] == "val"])
        return self.q

    def quantized_rows_ready(self, rows) -> None:
        """Wait for the chunks of the quantized stream's training split that hold `rows`."""
        if self.posted:
            self._wait_posted({("train", r - r % self.chunk_rows) for r in rows} & self.posted.keys())

    def student_stream_out(self, i: int, packed, call) -> None:
        """Advance the quantized stream with the finished block i and send it on to block i+1's rank,
        each chunk as soon as it is advanced, in the order quantized_chunks gives."""
        if self.q is None:
            return
        self.student_stream_ready()
        packed_dev = packed.to(self.device)
        send = self.groups > 1 and i + 1 < self.num_blocks
        order = self.quantized_chunks(i + 1) if send else [(s, k, 0, len(ids)) for s, (k, ids) in
                                                            enumerate(self.splits.items())]
        for s, k in dict.fromkeys((s, k) for s, k, _, _ in order):  # split by split, as their chunks come

            def sent(a, b, s=s, k=k):
                self._send_from(self.q[k], a, b, self.owner(i + 1), _tag(i + 1, 1, s))
                self.transport.poll()
            advance(packed_dev, self.q[k], self.q[k], call, self.batch_size, self.settings.amp_dtype,
                    spans=[(a, b) for t, _, a, b in order if t == s], span_done=sent if send else None)
        packed.cpu()

    def split_block(self, block: torch.nn.Module) -> torch.nn.Module:
        """The block as this rank runs it: its attention across the window's ranks when they split it."""
        return use_split_attention(block) if self.split.splits else block

    def timeline(self, block: int) -> None:
        if self.monitor:  # which block this rank trains when (-1: not training): shows pipeline bubbles
            self.monitor.scalar("timeline/training_block", block, int((time.time() - self.start) * 10))

    def train_or_restore(self, i: int, call, steps_bar) -> tuple[torch.nn.Module, dict]:
        """(block i packed, its report): trained here, or read back when a resumed run finished it."""
        if i in self.done:
            packed, report = restore_block(self.source.block(i), self.cfg, self.ckpt_dir, i)
            return self.split_block(packed), report
        inputs = self.q if self.schedule.starts_on_quantized_stream else self.fp_in
        targets = self.fp_out
        t_start = time.time()
        student = self.split_block(make_student(self.source.block(i), self.cfg, self.device))
        if self.cfg.init == "gptq":  # from GPTQ on this block's own training inputs, not round-to-nearest
            if self.schedule.starts_on_quantized_stream:
                self.progress.phase = "waiting for the student stream"
                self.student_stream_ready()  # GPTQ reads every row of it
            self.progress.phase = "GPTQ start"
            fp_block = self.split_block(self.source.block(i).to(self.device))
            gptq_start(student, fp_block, inputs["train"], call, self.batch_size, self.settings.amp_dtype,
                       self.reducer)
            fp_block.cpu()
            self.progress.phase = "training"
        total = self.settings.epochs * self.lanes["train"].steps_per_epoch
        steps_bar.reset(total=total)
        def switch():
            self.progress.phase = "waiting for the quantized stream"
            q = self.student_stream_ready(val_only=True)
            self.progress.phase = "training on the quantized stream"
            return q["train"], q["val"]
        switch_at = self.schedule.switch_at(total)
        self.timeline(i)
        t0 = time.time()
        start_s = t0 - t_start
        rep = train_block(student, i, inputs["train"], targets["train"], inputs["val"], targets["val"], call,
                          self.settings, self.device, log=self.monitor.for_block(i) if self.monitor else None,
                          progress=steps_bar, on_step=self.transport.poll, switch_at=switch_at, switch=switch,
                          lanes=self.lanes["train"], group=self.reducer, rows_ready=self.quantized_rows_ready,
                          split=self.split)
        self.timeline(-1)
        t_pack = time.time()
        packed = finish_student(student, self.cfg)
        report = rep.to_dict() | {"wall_s": t_pack - t0, "rank": self.transport.rank, "group": self.group,
                                  "wait_s": self.wait_s, "fp_stream_s": self.fp_stream_s, "start_s": start_s,
                                  "pack_s": time.time() - t_pack}
        if self.member == 0:  # the group's ranks hold the same block: one writes it
            save_block(self.ckpt_dir, i, packed, report)
        report["pack_save_s"] = time.time() - t_pack
        if self.monitor:
            for tag in ("loss_before", "loss_after", "seconds", "tokens_per_s", "peak_mem_mib", "wait_s"):
                self.monitor.scalar(f"blockap_blocks/{tag}", report[tag], i)
        return packed, report

    def run(self, calls) -> list[dict]:
        self.done = finished_blocks(self.ckpt_dir, self.num_blocks)
        mine = self.mine()
        reports = []
        bar = tqdm(total=len(mine), desc=f"Block-AP rank {self.transport.rank}", unit="block", disable=None)
        steps_bar = tqdm(total=0, desc="steps", leave=False, disable=None)
        trained_s, trained, trained_reports = 0.0, 0, []
        for i in mine:
            t_turn = time.time()  # the block's whole turn: streams, start, training, packing (the ETA's unit)
            self.progress.block, self.progress.phase = i, "finishing the previous block's sends"
            self.transport.wait_sends()  # the stores are about to be rewritten
            call = self.split.call(calls[i].to(self.device))  # this rank's tokens of every window
            self.post_student_stream(i)
            self.progress.phase = "full-precision stream"
            fp_block = self.split_block(self.source.block(i).to(self.device))
            t_stream = time.time()
            self.teacher_stream(i, fp_block, call)
            self.fp_stream_s = time.time() - t_stream  # the block forward over the stream (timeline model)
            fp_block.cpu()
            self.progress.phase = "waiting for the student stream"
            self.student_stream_in(i)
            self.progress.phase = "training"
            restored = i in self.done
            packed, report = self.train_or_restore(i, call, steps_bar)
            reports.append(report)
            self.progress.phase = "student stream"
            self.student_stream_out(i, packed, call)
            report["turn_s"] = time.time() - t_turn
            if not restored:
                trained_s, trained = trained_s + report["turn_s"], trained + 1
            if self.member == 0:  # one line per block, from its group's first rank
                tqdm.write(block_line(report | {"restored": restored}, self.num_blocks, self.transport.rank, len(reports),
                                      len(mine), trained_s, trained))
                if not restored:
                    trained_reports.append(report)
                if len(trained_reports) == STALL_CHECK_BLOCKS and not restored:  # once, early enough to stop
                    warning = stalled_warning(trained_reports, self.settings.epochs * self.lanes["train"].steps_per_epoch,
                                              self.settings.quant_lr, self.settings.weight_lr)
                    if warning:
                        tqdm.write(warning)
            if not self.schedule.fp_stream_in_place and self.groups == 1:
                self.fp_in, self.fp_out = self.fp_out, self.fp_in  # block i's output is block i+1's input
            self.source.release(i)
            bar.update(1)
        self.progress.phase = "finishing sends"
        self.transport.wait_sends()
        steps_bar.close()
        bar.close()
        for store in self._own_stores().values():
            store.close()
        return reports


def correction_start(total_steps: int, correction: float) -> int:
    """The step from which a pipelined block trains on the quantized stream (schedules.Pipelined)."""
    return schedule_named("pipelined", correction).switch_at(total_steps)


def run_blockap(source: LazyModel, cfg: QuantConfig, train_ids: torch.Tensor, val_ids: torch.Tensor,
                settings: BlockAPSettings, ckpt_dir: Path, record: dict, device, streams: StreamSpec,
                student_input: str = "student", transport: Transport | None = None,
                monitor: Monitor | None = None, log=print, progress: Progress | None = None,
                correction: float = 0.5, data_parallel: int = 1, sequence_parallel: int = 1) -> list[dict]:
    """Train this rank's blocks (all of them with one rank); each finished block is saved to
    `ckpt_dir` and reused on a restart, whatever the number of ranks and `data_parallel`; `record`
    (RunConfig.blockap_record) is what its manifest keeps and a restart must match. Returns this rank's
    reports."""
    schedule = schedule_named(student_input, correction)
    transport = transport or LocalTransport()
    progress = progress or Progress()
    ckpt_dir = Path(ckpt_dir)
    if transport.rank == 0:
        open_run(ckpt_dir, record)
    if streams.where.placement == "disk" and streams.remove_stale:
        stale = remove_stale_stores(streams.where.folder, streams.prefix)
        if stale:
            log(f"[resume] removed {len(stale)} activation store file(s) a stopped run left in {streams.where.folder}")
    transport.barrier()
    if transport.rank != 0:
        open_run(ckpt_dir, record)  # checks the manifest rank 0 wrote or found
    calls = source.calls(train_ids[:1])
    rank = _Rank(source, cfg, {"train": train_ids, "val": val_ids}, settings, ckpt_dir, device, streams,
                 schedule, transport, monitor, progress, data_parallel, sequence_parallel)
    shares = [f"{len(rank.splits['train'])} of {len(train_ids)} train windows"] if data_parallel > 1 else []
    shares += [f"tokens {_spans(rank.split.positions)} of {rank.split.tokens}"] if sequence_parallel > 1 else []
    group = f" (group {rank.group}, {', '.join(shares)})" if shares else ""
    progress.share = group[2:-1]
    log(f"[rank {transport.rank}/{transport.world}] pid {os.getpid()} on {socket.gethostname()}, blocks "
        f"{rank.mine()}{group}; " + rank.memory_line())
    return rank.run(calls)


def _spans(positions: torch.Tensor) -> str:
    """'0-63,192-255': runs of consecutive positions."""
    runs, start = [], None
    values = positions.tolist()
    for k, p in enumerate(values):
        start = p if start is None else start
        if k + 1 == len(values) or values[k + 1] != p + 1:
            runs.append(f"{start}-{p}")
            start = None
    return ",".join(runs)
