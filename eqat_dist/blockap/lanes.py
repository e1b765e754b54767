"""Which calibration windows each Block-AP step trains on: the same steps whatever the number of
data-parallel ranks that share them.

Window w belongs to lane w mod B (B: the global batch). Every step takes one window from each lane, in
an order drawn per epoch and per lane from the block's generator; when B does not divide the windows,
the longer lanes' leftover windows make a last, smaller step. A data-parallel group of D ranks splits
the lanes: rank d holds lanes d*B/D .. (d+1)*B/D - 1 and only their windows, so its stores hold 1/D of
the windows, its share of every step is already in them, and the D shares of a step together are the
step one rank takes at batch B. (A plain shuffle of all windows would put any window in any rank's
share: every rank would have to hold every window, or receive them every step.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def step_generator(seed: int, block: int) -> torch.Generator:
    """The generator block `block`'s steps are drawn from (the same on every rank and on a resume): the
    trainer draws them, and the rank that sends a block its quantized input replays them to send the
    rows in the order they will be read."""
    return torch.Generator().manual_seed(seed * 1_000_003 + block)


def group_width(ranks: int, batch: int, asked: int | None = None) -> int:
    """D, the ranks of a data-parallel group: as asked, else the largest number that divides both the
    ranks and the global batch (each rank then holds whole lanes; docs/benchmarks.md, the batch-size
    question, for why D does not grow past the batch)."""
    return asked or math.gcd(ranks, batch)


def group_layout(ranks: int, node_ranks: int, batch: int, seqlen: int, data_parallel: int | None = None,
                 sequence_parallel: int | None = None, exact: bool = True, splittable: bool = True) -> tuple[int, int]:
    """(D, S): a group's ranks that split the windows and that split each window's tokens, as asked,
    else chosen. `exact` (the schedule keeps the paper's arithmetic: student mode): one group of every
    rank of a node, D the largest that divides it and the global batch, S the rest where the windows cut
    into 2S chunks (models/sequence_split.py). Otherwise, where they do not cut, or for a model whose
    attention is not `splittable`, S = 1 and D as group_width chooses (the groups then take blocks
    round-robin)."""
    if sequence_parallel is not None:
        return group_width(ranks // sequence_parallel, batch, data_parallel), sequence_parallel
    if data_parallel is not None or not exact or not splittable:
        return group_width(ranks, batch, data_parallel), 1
    width = node_ranks if 0 < node_ranks <= ranks and ranks % node_ranks == 0 else ranks
    d = group_width(width, batch)
    s = width // d
    if s > 1 and seqlen % (2 * s) == 0:
        return d, s
    return group_width(ranks, batch), 1


@dataclass(frozen=True)
class Step:
    rows: list[int]  # this rank's rows (positions in its own stores), in lane order
    windows: int  # windows in the whole step, over every rank of the group
    lanes: tuple[int, ...] = ()  # the global lane of each of this rank's rows (where the group's rows meet)
    batch: int = 0  # lanes in all (the global batch)


@dataclass(frozen=True)
class Lanes:
    count: int  # windows in the split
    batch: int  # global batch: lanes
    parts: int = 1  # ranks sharing each step (the data-parallel group's size)
    part: int = 0  # this rank's place in the group

    def __post_init__(self):
        if self.batch < 1 or self.parts < 1 or not 0 <= self.part < self.parts:
            raise ValueError(f"lanes: batch {self.batch}, part {self.part} of {self.parts}")
        if self.batch % self.parts:
            raise ValueError(f"`batch_size` {self.batch} is the global batch and must split evenly over the "
                             f"{self.parts} ranks of a `data_parallel` group: use a multiple of {self.parts}")

    @property
    def own_lanes(self) -> range:
        share = self.batch // self.parts
        return range(self.part * share, (self.part + 1) * share)

    def windows(self) -> list[int]:
        """The windows this rank holds, in the order of its store's rows."""
        return [w for w in range(self.count) if w % self.batch in self.own_lanes]

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.count // self.batch)

    def _lane_length(self, lane: int) -> int:
        return len(range(lane, self.count, self.batch))

    def epoch(self, generator: torch.Generator) -> list[Step]:
        """This epoch's steps. Every rank draws every lane's order (the generator advances the same way
        whatever `parts`), and keeps its own."""
        orders = [torch.randperm(self._lane_length(lane), generator=generator).tolist() for lane in range(self.batch)]
        position = {w: i for i, w in enumerate(self.windows())}
        steps = []
        for k in range(self.steps_per_epoch):
            lanes = [lane for lane in self.own_lanes if k < len(orders[lane])]
            rows = [position[lane + self.batch * orders[lane][k]] for lane in lanes]
            steps.append(Step(rows, sum(k < len(order) for order in orders), tuple(lanes), self.batch))
        return steps

    def first_reads(self, generator: torch.Generator, epochs: int, from_step: int = 0) -> list[int | None]:
        """For each of this rank's rows, the first step from `from_step` on that reads it (None: none
        does), over `epochs` epochs drawn from `generator` as the trainer draws them."""
        first: list[int | None] = [None] * len(self.windows())
        step = 0
        for _ in range(epochs):
            for this in self.epoch(generator):
                if step >= from_step:
                    for row in this.rows:
                        if first[row] is None:
                            first[row] = step
                step += 1
        return first
