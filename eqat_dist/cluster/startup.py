"""Start-up checks of a job of several ranks, run by every rank before any long work: the output folder
is the same folder on every node, and every rank reaches rank 0's rendezvous. Each names the fix in
one line instead of failing hours later (a healthy peer blamed after the peer timeout, or E2E-QP's
rendezvous hanging until the store's timeout)."""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from .launch import NODE_ADDR, Launch, LaunchError

from ..run_folder import RunFolder


def check_shared_folder(out: Path, transport, launch: Launch) -> None:
    """Rank 0 writes a fresh random token into the output folder; every other rank must read the same
    token there. Block files, heartbeats and E2E-QP checkpoints are written by one rank and read by
    others, so the folder must be one file system that every node mounts."""
    mark = RunFolder(out).shared_check
    token = None
    if launch.rank == 0:
        token = f"{socket.gethostname()} {os.getpid()} {secrets.token_hex(8)}"
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text(token)
    token = transport.allgather_object(token)[0]  # also the barrier after rank 0's write
    try:
        seen = mark.read_text()
    except OSError as err:
        seen = f"unreadable ({err.strerror})"
    verdicts = transport.allgather_object(None if seen == token else (socket.gethostname(), seen[:80]))
    if launch.rank == 0:
        mark.unlink(missing_ok=True)
    bad = {r: v for r, v in enumerate(verdicts) if v is not None}
    if bad:
        hosts = sorted({host for host, _ in bad.values()})
        raise LaunchError(f"the output folder {Path(out).resolve()} is not shared: rank(s) {', '.join(map(str, bad))} on "
                          f"{', '.join(hosts)} do not see the file rank 0 wrote there; put `output` on a file system "
                          "that every node mounts at the same path (NFS, Lustre, GPFS, ...)")


def _dial(addr: str, port: int, timeout: float) -> str | None:
    """None once a TCP connection to addr:port opens within `timeout` seconds, else why not."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=5):
                return None
        except OSError as err:
            if time.monotonic() > deadline:
                return err.strerror or str(err)
            time.sleep(0.2)


def check_rendezvous_reachable(launch: Launch, transport, timeout: float = 60.0) -> None:
    """Before hours of work: every rank opens a TCP connection to rank 0's rendezvous address and port
    (rank 0 listens there for the check), so a wrong or loopback address fails in seconds, naming the
    ranks that cannot reach it, instead of hanging at E2E-QP's start."""
    listener, problem = None, None
    if launch.rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("", launch.master_port))
            listener.listen(min(launch.world, 1024))
        except OSError as err:
            listener.close()
            raise LaunchError(f"rank 0 cannot listen on port {launch.master_port} ({err.strerror}); set MASTER_PORT "
                              "to a free port") from err
    try:
        transport.barrier()  # rank 0 listens
        problem = _dial(launch.master_addr, launch.master_port, timeout)
        problems = transport.allgather_object(problem)
    finally:
        transport.barrier()
        if listener is not None:
            listener.close()
    failed = [r for r, p in enumerate(problems) if p]
    if failed:
        raise LaunchError(f"rank(s) {', '.join(map(str, failed))} cannot reach rank 0's rendezvous at "
                          f"{launch.master_addr}:{launch.master_port} ({problems[failed[0]]}); set MASTER_ADDR to an "
                          f"address of rank 0's node that every node reaches (or {NODE_ADDR} on every rank) and "
                          "open the port")
