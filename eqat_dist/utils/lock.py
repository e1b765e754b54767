"""One run per output folder: a lock file naming the host and process that holds the folder."""
from __future__ import annotations

import atexit
import os
import socket
import time
from pathlib import Path

from ..run_folder import LOCK  # noqa: F401  (the layout is run_folder.py's; the messages name flags: only the command line locks)


class LockError(RuntimeError):
    pass


_held: list[tuple[Path, str]] = []  # (lock file, its text) this process holds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check(folder: Path, take_over: bool = False) -> str | None:
    """Refuse a folder held by a live process on this host, or by one on another host (its process
    cannot be checked from here), unless take_over. Returns a line when a stale lock will be taken
    over (a killed run on this host: the same command still resumes), else None."""
    path = folder / LOCK
    if not path.exists():
        return None
    held = path.read_text().split()
    host, pid = (held[0], int(held[1])) if len(held) >= 2 and held[1].isdigit() else ("?", -1)
    since = " ".join(held[2:]) or "an unknown time"
    here = host == socket.gethostname()
    if here and pid == os.getpid():
        return None  # ours already (the command validated twice in one process)
    if not take_over and here and pid > 0 and _alive(pid):
        raise LockError(f"--output {folder} is in use by eqat-dist (pid {pid} on {host}, since {since}); wait for it "
                        f"to finish or choose another --output (if pid {pid} is no eqat-dist run, pass --take-over-lock)")
    if not take_over and not here:
        raise LockError(f"--output {folder} has a lock from pid {pid} on host {host} (since {since}), which cannot be "
                        "checked from here; if no run uses that folder, pass --take-over-lock")
    state = "no longer running" if here and not _alive(pid) else "--take-over-lock"
    return f"[lock] taking over {folder / LOCK} of pid {pid} on {host} (since {since}): {state}"


def acquire(folder: Path, take_over: bool = False, log=print) -> Path:
    """Hold `folder` for this process until it exits: FOLDER/.eqat-dist.lock with host, pid and time."""
    note = check(folder, take_over)
    path = folder / LOCK
    if note:
        log(note)
        path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    me = f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if check(folder, take_over) is None and path.read_text().split()[1:2] == [str(os.getpid())]:
            return path
        raise LockError(f"--output {folder} was locked by another run a moment ago; choose another --output") from None
    with os.fdopen(fd, "w") as f:
        f.write(me + "\n")
    _held.append((path, me))
    atexit.register(release, path, me)
    return path


def release(path: Path, me: str) -> None:
    """Remove the lock if it is still this process's."""
    try:
        if path.read_text().strip() == me:
            path.unlink()
    except OSError:
        pass


def held() -> list[tuple[Path, str]]:
    """The locks this process holds, as (file, text)."""
    return list(_held)


def share(locks: list[tuple[Path, str]]) -> None:
    """Hold rank 0's locks on another rank of the same job too: whichever rank stops the job (MPI's
    Abort kills the others before they can) releases the output."""
    _held.extend((Path(path), text) for path, text in locks if (Path(path), text) not in _held)


def release_held() -> None:
    """Every lock this process holds, now: for an exit that skips atexit (MPI's Abort, os._exit), so that
    the next run, perhaps on another node of the cluster, finds the folder free."""
    while _held:
        release(*_held.pop())
