"""Signals that stop a run the way Ctrl-C does. A cluster stops a job with SIGTERM (Slurm's scancel,
every time limit, most preemptions; SIGKILL follows after a grace period), and Slurm's
`--signal=USR1@SECONDS` warns a job before its time limit. Each becomes a `Stopped` raised in the main
thread at its next Python instruction (seconds at most, even inside a long tensor operation), which
the runner handles as it handles Ctrl-C: a line saying where the rank was and what is kept, the
output's lock released, exit code 128 + the signal's number.

Stopping anywhere is safe for the files: every file a run writes is written aside and renamed in
(the same guarantee that lets a SIGKILL at any moment resume to identical bits)."""
from __future__ import annotations

import signal

ALWAYS = ("TERM",)  # SIGINT keeps Python's own handler: KeyboardInterrupt, which Stopped extends
OPTIONAL = ("USR1", "USR2", "HUP", "XCPU")  # what a scheduler may send before a limit, when asked to
DEFAULT = ("USR1",)  # Slurm's --signal=USR1@120, the usual way to ask for a warning


class Stopped(KeyboardInterrupt):
    """A stop signal, raised where the main thread was. A KeyboardInterrupt, so every path that lets
    Ctrl-C through (and no `except Exception`) lets it through too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(err: BaseException) -> int:
    """The signal behind an interruption: its own for Stopped, SIGINT for Ctrl-C."""
    return getattr(err, "signum", signal.SIGINT)


def exit_code(err: BaseException) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(signal_of(err))


def signal_name(err: BaseException) -> str:
    return signal.Signals(signal_of(err)).name


def parse_signals(text: str) -> tuple[str, ...]:
    """`stop_signals` as given ('USR1,USR2', 'none', ''): the names of the optional signals; ValueError
    naming the ones that are not."""
    names = [s.strip().upper().removeprefix("SIG") for s in (text or "").split(",") if s.strip()]
    if names in (["NONE"], []):
        return ()
    unknown = [n for n in names if n not in OPTIONAL + ALWAYS]
    if unknown:
        raise ValueError(f"`stop_signals` {text}: {', '.join(unknown)} is not one of {', '.join(OPTIONAL)} "
                         "(SIGTERM and SIGINT always stop a run cleanly; 'none' adds no other)")
    return tuple(dict.fromkeys(n for n in names if n not in ALWAYS))


def _raise_stopped(signum, _frame):
    # One stop at a time: a second signal (Slurm repeats SIGTERM to every process of the step) must not
    # cut short the handling of the first (its line, the lock's release).
    for name in _installed:
        signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_IGN)
    raise Stopped(signum)


_installed: tuple[str, ...] = ()


def stop_on(optional: tuple[str, ...] = DEFAULT) -> None:
    """Stop on SIGTERM and on the `optional` signals from now on (main thread only, as Python requires)."""
    global _installed
    wanted = tuple(dict.fromkeys(ALWAYS + tuple(optional)))
    for name in set(_installed) - set(wanted):  # installed earlier (the defaults, before the flags were read)
        signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_DFL)
    _installed = wanted
    for name in _installed:
        signal.signal(getattr(signal, f"SIG{name}"), _raise_stopped)
