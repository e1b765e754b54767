"""Signs of life between ranks, so that a rank that is stopped (SIGSTOP, a debugger) or hung does not
stall its peers for ever: a dead rank shows at once (its connection drops), a hung one never does.

Each rank's thread rewrites `folder/rank<r>` every few seconds with a counter and where the rank is
(block and phase); the rank itself rewrites it the moment it moves on (`moved`). A rank waiting on a
peer calls `check()` from its wait loop: a peer whose file has not changed for `timeout` seconds of
this rank's clock (so clocks of other nodes do not matter) is reported as stopped or hung, naming where
it was. A legitimately long wait (rank 1 waits hours for rank 0 to train block 0 in student mode; ranks
wait while rank 0 evaluates) is fine: the peer's thread goes on beating while it works.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .transport import PeerFailure

class Heartbeat:
    def __init__(self, folder: Path, rank: int, world: int, timeout: float, where: Callable[[], str]):
        self.folder, self.rank, self.world, self.timeout, self.where = Path(folder), rank, world, timeout, where
        self.interval = max(0.5, min(10.0, timeout / 6))
        self._seen = {}  # peer -> (last content, when it changed on our clock)
        self._last_check = time.monotonic()
        self._stop = threading.Event()
        self._beats = 0
        self._writing = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="eqat-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, done: bool = False) -> None:
        with self._writing:  # the thread's beats and `moved` from the rank's own thread share one file
            self._beats += 1
            path = self.folder / f"rank{self.rank}"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"beat": self._beats, "pid": os.getpid(), "host": socket.gethostname(),
                                       "where": self.where(), "done": done}))
            os.replace(tmp, path)

    def moved(self) -> None:
        """The rank moved on (a block, a phase): written at once, so a kill right after leaves this."""
        try:
            self._beat()
        except OSError:
            pass  # as in the thread: only a silence as long as the timeout matters

    def _run(self) -> None:
        while not self._stop.wait(self.interval):  # moves are written by `moved`; this only says alive
            try:
                self._beat()
            except OSError:
                pass  # a full or flaky disk: peers see silence only if it lasts the whole timeout

    def check(self) -> None:
        """Raise PeerFailure when a peer has given no sign of life for `timeout` seconds."""
        now = time.monotonic()
        if now - self._last_check > self.timeout / 2:
            # this rank itself did not run meanwhile (the whole job stopped and continued, a suspended
            # machine): its peers' silence in that time says nothing, so their clocks start again
            self._seen = {peer: (last, now) for peer, (last, _) in self._seen.items()}
        self._last_check = now
        for peer in range(self.world):
            if peer == self.rank:
                continue
            try:
                content = (self.folder / f"rank{peer}").read_text()
            except OSError:
                content = None  # not started yet, or between write and rename
            last, since = self._seen.get(peer, (None, now))
            if content is not None and json.loads(content).get("done"):
                continue  # finished its part: nobody should be waiting on it any more
            if content is not None and content != last:
                self._seen[peer] = (content, now)
            elif now - since > self.timeout:
                where = json.loads(last)["where"] if last else "before its first sign of life"
                raise PeerFailure(f"rank {peer} has given no sign of life for {now - since:.0f} s (last seen{where}); "
                                  "it is stopped or hung (`peer_timeout` sets this bound)")
            else:
                self._seen.setdefault(peer, (last, since))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._beat(done=True)
        except OSError:
            pass


def unfinished_ranks(folder: Path) -> list[str]:
    """Where each rank of an earlier run on this folder was when it stopped without finishing (a kill
    leaves its last heartbeat): MPI's own banner names only a pid; this names the rank and block. The
    files are removed once read."""
    lines = []
    for path in sorted(Path(folder).glob("rank*")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not state.get("done"):
            lines.append(f"{path.name.replace('rank', 'rank ')} (pid {state.get('pid')} on {state.get('host')}) was"
                         f"{state.get('where', '')} when the earlier run stopped")
        path.unlink(missing_ok=True)
    return lines
