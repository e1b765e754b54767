"""Block-AP schedules: where each block's student input comes from, and when. One object per schedule,
read by the rank loop (round_robin.py), the planner's memory terms (planning/estimate.py), its wall-time
model (planning/timeline.py) and the command line's help, so that a schedule is described once.

Every schedule runs the full-precision ("fp") stream from block to block; the target of block i is the
fp block's output on it. They differ in the student's input:

  student    the quantized stream (the output of the already-quantized blocks before it), from the
             first step: the paper's scheme. Blocks train one after another, whatever the ranks.
  teacher    the fp stream, every step: blocks train concurrently; worse at 2-3 bits.
  pipelined  the fp stream first, then the quantized stream for the last `correction` share of the
             steps: concurrent up to the correction, the paper's inputs at the end.

A schedule says which stores a rank holds per split (train, val), which store each role uses, when the
quantized stream is received, and from which step a block trains on it.

Pipelined over several groups holds two stores per split, not three: its fp input is spent once the block
switches to the quantized stream, so that stream is received into the fp input's store at the switch
(the rank sending it waits at most until then; at the default correction share, 1/G, the switch comes
as the previous block ends). At 70B that is 65 GiB less host memory per rank (planning/estimate.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Schedule:
    """What the rank loop, the planner and the timeline need to know of a schedule."""
    correction: float = 0.0  # share of each block's steps on the quantized stream

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    keeps_quantized_stream: ClassVar[bool] = True  # the quantized stream is advanced and handed on
    fp_stream_in_place: ClassVar[bool] = False  # the fp block's output overwrites its input: one fp store
    receives_quantized_early: ClassVar[bool] = False  # trains on the fp stream first, awaits the quantized one at the switch
    quantized_into_fp_input: ClassVar[bool] = False  # with several groups: received into the spent fp input's store
    has_correction: ClassVar[bool] = False  # its correction share (and the learning rate through it) is a setting

    def shares_fp_input(self, groups: int) -> bool:
        """Whether the quantized stream lands in the fp input's store: only across groups (one group keeps
        the quantized stream in place from block to block, while the fp stream moves through its input)."""
        return self.quantized_into_fp_input and self.keeps_quantized_stream and groups > 1

    def stores_per_split(self, groups: int = 1) -> int:
        """Activation stores a rank holds per split over `groups` groups: fp input, fp output unless in
        place, the quantized stream unless it lands in the fp input's store."""
        separate_q = self.keeps_quantized_stream and not self.shares_fp_input(groups)
        return 1 + (not self.fp_stream_in_place) + separate_q

    @property
    def starts_on_quantized_stream(self) -> bool:
        """Whether the student trains on the quantized stream from its first step (received first)."""
        return self.keeps_quantized_stream and not self.receives_quantized_early

    def switch_at(self, total_steps: int) -> int | None:
        """The step from which a block that starts on the fp stream trains on the quantized stream; None
        when it never switches."""
        return None

    def store_label(self, role: str) -> str:
        """A store's name in file names and the memory line: 'fp', 'fp-out' or 'q'."""
        return {"fp_in": "fp", "fp_out": "fp-out", "q": "q"}[role]


@dataclass(frozen=True)
class Student(Schedule):
    correction: float = 1.0
    name: ClassVar[str] = "student"
    summary: ClassVar[str] = "the paper's scheme (quantized stream, blocks one after another)"
    fp_stream_in_place: ClassVar[bool] = True  # two stores: the fp stream and the quantized stream


@dataclass(frozen=True)
class Teacher(Schedule):
    correction: float = 0.0
    name: ClassVar[str] = "teacher"
    summary: ClassVar[str] = "full-precision stream (blocks train concurrently, worse at 2-3 bits)"
    keeps_quantized_stream: ClassVar[bool] = False


@dataclass(frozen=True)
class Pipelined(Schedule):
    correction: float = 0.5
    name: ClassVar[str] = "pipelined"
    summary: ClassVar[str] = ("full-precision stream first, the quantized stream for the last --correction-fraction "
                              "of each block's steps (concurrent up to that part)")
    receives_quantized_early: ClassVar[bool] = True
    quantized_into_fp_input: ClassVar[bool] = True
    has_correction: ClassVar[bool] = True

    def switch_at(self, total_steps: int) -> int | None:
        """The last `correction` share of the steps (at least one when the share is above 0)."""
        if self.correction <= 0:
            return total_steps
        return min(total_steps - 1, round(total_steps * (1 - self.correction))) if total_steps else 0


SCHEDULES = {s.name: s for s in (Student, Teacher, Pipelined)}


def schedule_named(name: str, correction: float | None = None) -> Schedule:
    """The schedule `name`; `correction` is used by the schedules that have one (pipelined)."""
    if name not in SCHEDULES:
        raise ValueError(f"`student_input` {name!r}: use one of {', '.join(SCHEDULES)}")
    kind = SCHEDULES[name]
    return kind(correction) if kind is Pipelined and correction is not None else kind()
