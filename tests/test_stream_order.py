"""The quantized stream handed on in the order its receiver reads it (pipelines/stream_order.py): the
order the sender predicts is the one the trainer reads, the receiver waits only for the rows a step
reads, and the timeline model's gain from it."""
import pytest
import torch

from eqat_dist.blockap.lanes import Lanes, step_generator
from eqat_dist.blockap.steps import make_student
from eqat_dist.blockap.trainer import BlockAPSettings, train_block
from eqat_dist.pipelines.schedules import schedule_named
from eqat_dist.pipelines.stream_order import by_first_read, chunks, receiver_lead
from eqat_dist.planning.timeline import BlockTimes, blockap_seconds
from test_blockap import CFG, _block_setup, _stores


@pytest.mark.parametrize("parts, part", [(1, 0), (2, 1)])
def test_first_reads_predict_the_rows_the_trainer_reads_after_its_switch(parts, part):
    """The sender replays the receiver's draw (lanes.first_reads); the trainer's own reads after the
    switch, seen through rows_ready, must come in exactly that order, or the receiver would wait on
    rows sent last."""
    fp_block, call, x, y = _block_setup()
    x, y = torch.cat([x, x]), torch.cat([y, y])  # 16 windows
    settings = BlockAPSettings(epochs=2, batch_size=4, quant_lr=1e-3, weight_lr=1e-4, seed=3)
    lanes = Lanes(len(x), settings.batch_size, parts, part)
    mine = lanes.windows()
    xs, ys, vx, vy = _stores([x[mine], y[mine], x[:0], y[:0]])
    total = settings.epochs * lanes.steps_per_epoch
    switch_at = schedule_named("pipelined", 0.75).switch_at(total)
    asked, switched = [], []

    def switch():
        switched.append(True)
        return xs, vx
    train_block(make_student(fp_block, CFG, "cpu"), 5, xs, ys, vx, vy, call, settings, "cpu", switch_at=switch_at,
                switch=switch, lanes=lanes, rows_ready=lambda rows: asked.append(list(rows)) if switched else None)
    first = lanes.first_reads(step_generator(settings.seed, 5), settings.epochs, switch_at)
    # the trainer first asks for every training row (no validation windows: its check at the switch reads
    # them all), then for each step's rows in turn
    assert asked[0] == list(range(len(mine)))
    steps = asked[1:]
    assert len(steps) == total - switch_at
    seen = {}
    for k, rows in enumerate(steps):
        for r in rows:
            seen.setdefault(r, switch_at + k)
    assert seen == {r: f for r, f in enumerate(first) if f is not None}


def test_a_student_blocks_reads_from_its_first_step_are_predicted_too():
    """Student mode across groups: the quantized stream is read from the first step (no switch)."""
    fp_block, call, x, y = _block_setup()
    settings = BlockAPSettings(epochs=2, batch_size=2, quant_lr=1e-3, weight_lr=1e-4, seed=1)
    lanes = Lanes(len(x), settings.batch_size)
    xs, ys, vx, vy = _stores([x, y, x[:0], y[:0]])
    asked = []
    train_block(make_student(fp_block, CFG, "cpu"), 2, xs, ys, vx, vy, call, settings, "cpu", lanes=lanes,
                rows_ready=lambda rows: asked.append(list(rows)))
    assert asked[0] == list(range(len(x)))  # the loss before training reads them all (no validation rows)
    seen = {}
    for k, rows in enumerate(asked[1:]):
        for r in rows:
            seen.setdefault(r, k)
    first = lanes.first_reads(step_generator(settings.seed, 2), settings.epochs, 0)
    assert seen == dict(enumerate(first)) and set(first) == set(range(4))


def test_first_reads_start_at_the_switch():
    lanes = Lanes(12, 2)
    all_reads = lanes.first_reads(step_generator(0, 1), 2, 0)
    assert sorted(all_reads) == sorted(list(range(6)) * 2)  # every row in the first epoch, two a step
    late = lanes.first_reads(step_generator(0, 1), 2, 9)
    assert {f for f in late if f is not None} <= set(range(9, 12)) and late.count(None) == 6


def test_chunks_are_ordered_by_their_first_read_each_once():
    first = [7, None, 2, 9, None, None, 0, 5, None]
    order = by_first_read(len(first), 2, first)
    assert sorted(order) == chunks(9, 2) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert order == [(6, 8), (2, 4), (0, 2), (4, 6), (8, 9)]  # read at 0, 2, 7; never: in row order


def test_the_receivers_lead_is_the_wait_for_rows_not_yet_advanced():
    """Hand-checked: 4 rows, one read per step in row order, a chunk per row. The sender advances a row
    every 1 s, the receiver steps every 2 s: it waits only for the first row (1 s, plus 1 s of the
    validation row first); with steps of 0.5 s it waits for every row but the step's own time."""
    first = [0, 1, 2, 3]
    assert receiver_lead(first, 1, 1, 1.0, 2.0, range(4)) == pytest.approx(2.0)
    assert receiver_lead(first, 1, 0, 1.0, 0.5, range(4)) == pytest.approx(4.0 - 3 * 0.5)
    # read in the opposite order: the advance follows the reads, the same lead
    assert receiver_lead(first[::-1], 1, 1, 1.0, 2.0, range(4)) == pytest.approx(2.0)
    # a whole stream in one chunk: the receiver waits for all of it
    assert receiver_lead(first, 4, 0, 1.0, 2.0, range(4)) == pytest.approx(4.0)


def test_a_pipelined_chain_waits_for_the_rows_it_reads_not_the_whole_stream():
    """Hand-checked on 2 ranks, 2 blocks, correction 1/2, train 10 s, forward 4 s, no transfer. Block 0
    runs its fp forward to 4 s, trains to 14 s and advances its quantized stream to 18 s. Block 1 runs
    its fp forward from 4 to 8 s and switches at 13 s. Received whole, it trains its last 5 s from 18 s
    and advances its own stream: 27 s. Read as it comes, 1 s after the advance starts: from 15 to 20 s,
    then its own advance, 24 s."""
    whole = BlockTimes(train=10.0, forward=4.0)
    assert blockap_seconds(2, 2, "pipelined", whole, correction=0.5) == pytest.approx(27.0)
    streamed = BlockTimes(train=10.0, forward=4.0, stream_lead=1.0)
    assert blockap_seconds(2, 2, "pipelined", streamed, correction=0.5) == pytest.approx(24.0)
    assert blockap_seconds(2, 1, "pipelined", streamed, correction=0.5) == \
        blockap_seconds(2, 1, "pipelined", whole, correction=0.5)  # one rank: no hand-off


def test_a_student_chain_across_ranks_starts_on_the_first_rows():
    """Student mode, 2 ranks, 2 blocks, train 10 s, forward 4 s. Block 0 trains 4-14 s and advances its
    stream to 18 s; block 1's fp forward ends at 8 s. Received whole, block 1 trains 18-28 s and
    advances its own: 32 s. Read as it comes, 1 s after the advance starts: 15-25 s, then 29 s."""
    assert blockap_seconds(2, 2, "student", BlockTimes(train=10.0, forward=4.0)) == pytest.approx(32.0)
    assert blockap_seconds(2, 2, "student", BlockTimes(train=10.0, forward=4.0, stream_lead=1.0)) == pytest.approx(29.0)
