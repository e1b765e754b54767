"""Where this rank is, for the lines that name it: a failure's, a stop's, the heartbeat's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Progress:
    """Where this rank is: read by the error handler to name the block in its message, and handed to
    `on_change` (the heartbeat) the moment it changes, so a rank killed or stopped right after a move is
    reported where it really was, not where the heartbeat thread last looked."""
    block: int | None = None
    phase: str = "starting"
    on_change: Callable[[], None] | None = None
    share: str = ""  # this rank's part of its group's work ('group 0, tokens 0-511,1536-2047 of 2048')

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("block", "phase") and getattr(self, "on_change", None) is not None:
            self.on_change()

    def where(self) -> str:
        """' at block 7 (training)' or ' (E2E-QP training)' when no block is in hand."""
        share = f"; {self.share}" if self.share and self.block is not None else ""
        return (f" at block {self.block}" if self.block is not None else "") + f" ({self.phase}{share})"
