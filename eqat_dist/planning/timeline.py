"""Block-AP wall time of each schedule on N ranks, from three per-block times: training one block
(`train`, its loss evaluations included), running one block forward over the calibration set
(`forward`: the fp stream, and in student/pipelined mode the quantized stream after training) and
handing one stream to the next rank (`transfer`). With data-parallel groups (D ranks each) the "ranks"
here are the G groups and the times are one rank's, on its 1/D of the windows (planning/estimate.py).

It replays what pipelines/round_robin.py does. Block i belongs to rank i mod N; each rank takes its
blocks in order, and for each:
  1. starts when it is free and block i's fp input is in (block i-1's fp output, sent as its owner
     ran it), and runs the fp block forward;
  2. trains: teacher mode all steps on the fp stream; student mode all steps on the quantized stream,
     which it first waits for; pipelined mode the first (1 - c) of the steps on the fp stream, then
     waits for the quantized stream (block i-1 finished and advanced) and trains the last c;
  3. student/pipelined: runs the finished block over the quantized stream and sends it on.
Pipelined across ranks receives the quantized stream into its spent fp input's store at the switch
(schedules.py): the transfer starts when both sides are there, and the sender's next block waits for it
(its own stream is in that store). The sender advances the quantized stream in the order the receiver
reads it (stream_order.py): the receiver trains on it `stream_lead` after the advance starts (not once
it is done), from its first step (student) or its switch (pipelined), and ends no earlier than the
whole stream is in.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..pipelines.schedules import SCHEDULES, Schedule, schedule_named


@dataclass
class BlockTimes:
    train: float  # seconds to train one block (all its steps)
    forward: float  # seconds to run one block over the calibration windows
    transfer: float = 0.0  # seconds to hand one stream to the next rank (0 on one rank)
    allreduce: float = 0.0  # of `train`: summing the gradients over the group (to their owners, when split)
    weights: float = 0.0  # of `train`: the weight work a group repeats, or the owners' broadcasts when split
    exchange: float = 0.0  # of `train`: the split attention's keys and values over the S ranks
    stream_lead: float | None = None  # pipelined: how long the receiver waits for its rows once the
    # quantized stream's advance starts (stream_order.receiver_lead); None: the whole advance

    def parts(self) -> dict[str, float]:
        """`train` by what it is spent on (seconds per block)."""
        return {"computing": self.train - self.allreduce - self.weights - self.exchange,
                "gradient sums": self.allreduce, "weight work repeated or broadcast": self.weights,
                "key/value exchange": self.exchange}


def blockap_seconds(blocks: int, ranks: int, schedule: str | Schedule, t: BlockTimes,
                    correction: float = 0.5) -> float:
    """Wall time from the first block's start to the last block's end, for a schedule (schedules.py)
    or its name (`correction`: pipelined's share of steps on the quantized stream)."""
    schedule = schedule if isinstance(schedule, Schedule) else schedule_named(schedule, correction)
    c = schedule.correction  # student 1, teacher 0
    hop = t.transfer if ranks > 1 else 0.0
    free = [0.0] * ranks
    fp_out = q_out = 0.0  # when block i-1's fp output / quantized output reached block i's rank
    q_start = 0.0  # when block i-1's rank started advancing the quantized stream
    lead = t.forward if t.stream_lead is None else min(t.stream_lead, t.forward)
    end = 0.0
    for i in range(blocks):
        r = i % ranks
        start = max(free[r], fp_out if i else 0.0)
        fp_done = start + t.forward
        fp_out = fp_done + (hop if (i + 1) % ranks != r else 0.0)
        if not schedule.keeps_quantized_stream:  # every step on the fp stream: nothing to wait for
            end = free[r] = fp_done + t.train
            continue
        first = fp_done + (1 - c) * t.train
        if i and ranks > 1:  # handed on in reading order: trained on as its rows come in (stream_order.py)
            if schedule.shares_fp_input(ranks):  # received once this rank is at its switch, into the spent
                all_in = max(first, q_out) + hop  # fp input's store; the sender's is in use until sent
                rows_in = max(first, q_start + lead) + hop
                sender = (i - 1) % ranks
                free[sender] = max(free[sender], all_in)
            else:  # received as sent (posted at the block's start)
                all_in, rows_in = q_out + hop, q_start + lead + hop
            second = max(max(first, rows_in) + c * t.train, all_in)
        else:  # one rank: the stream is in place
            second = max(first, q_out if i else 0.0) + c * t.train
        q_start = second
        end = free[r] = second + t.forward  # the finished block advances the quantized stream
        q_out = end
    return end


def speedups(blocks: int, t: BlockTimes, correction: float = 0.5, ranks=(1, 2, 4, 8)) -> dict:
    """{schedule: {N: speed-up over student mode on one rank}}."""
    base = blockap_seconds(blocks, 1, "student", t)
    return {s: {n: base / blockap_seconds(blocks, n, s, t, correction) for n in ranks} for s in SCHEDULES}
