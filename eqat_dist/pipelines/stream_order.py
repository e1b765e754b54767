"""The order in which a block's quantized input is advanced, handed on and received, and how long its
receiver waits for it in that order.

Streams move between ranks in chunks of CHUNK_BATCHES batches of rows. A pipelined block
(schedules.Pipelined) reads the quantized stream only in its last share of steps, in an order drawn
in advance (blockap/lanes.py). So the rank that advances the stream does it chunk by chunk in the
order the receiver will read it, and sends each chunk as soon as it is done: the validation rows
first (the switch evaluates them), then the training chunks by the first step after the switch that
reads one of their rows, then the chunks no step reads again. The receiver trains as soon as its next
step's rows are in, not when the whole stream is. At 70B that takes most of the stream's advance
(87 s a block) off the chain of blocks that bounds a pipelined run (planning/timeline.py).
"""
from __future__ import annotations

CHUNK_BATCHES = 4  # batches of rows per chunk sent


def chunks(count: int, rows: int) -> list[tuple[int, int]]:
    """Rows 0..count as spans of `rows` (the last may be shorter)."""
    return [(a, min(a + rows, count)) for a in range(0, count, rows)]


def by_first_read(count: int, rows: int, first_reads: list[int | None]) -> list[tuple[int, int]]:
    """The spans of chunks(count, rows) ordered by the first step that reads one of their rows;
    spans no step reads keep their place at the end (the sort is stable)."""
    def first(span):
        reads = [f for f in first_reads[span[0]:span[1]] if f is not None]
        return min(reads) if reads else float("inf")
    return sorted(chunks(count, rows), key=first)


def receiver_lead(first_reads: list[int | None], rows: int, val_rows: int, row_s: float, step_s: float,
                  steps: range) -> float:
    """How much later than the start of the stream's advance the receiver ends its `steps`, less the
    steps' own time (`step_s` each): the wait for rows the advance has not reached yet. The receiver
    is at its switch when the advance starts; the sender advances `row_s` seconds a row, the `val_rows`
    first (the switch evaluates them), then the training chunks (of `rows` rows) in by_first_read order.
    Without that order (a stream received whole) it would be the whole advance."""
    ready = [0.0] * len(first_reads)  # when each row is in
    done = val_rows
    for a, b in by_first_read(len(first_reads), rows, first_reads):
        done += b - a
        ready[a:b] = [done * row_s] * (b - a)
    needs: dict[int, float] = {}  # step -> when the last of the rows it reads first is in
    for r, step in enumerate(first_reads):
        if step is not None:
            needs[step] = max(needs.get(step, 0.0), ready[r])
    clock = val_rows * row_s
    for step in steps:
        clock = max(clock, needs.get(step, 0.0)) + step_s
    return clock - len(steps) * step_s
