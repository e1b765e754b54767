"""This process's rank and the world's size as its launcher says, before any communicator exists.
An MPI launcher's variables come first: a stale RANK/WORLD_SIZE left in the environment (a shell, an
outer job) must not make two MPI ranks both rank 0."""
from __future__ import annotations

import os


def _first(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def launcher_rank() -> int:
    return int(_first("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "RANK") or 0)


def world_size() -> tuple[int, int]:
    """(ranks, ranks per node) of the launcher that started this process (1, 1 when none)."""
    ranks = int(_first("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "WORLD_SIZE") or 1)
    local = int(_first("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE") or ranks)
    return ranks, min(local, ranks)


DEFAULT_PORT = 29500  # torch.distributed's and DeepSpeed's


def _in_use(port: int) -> bool:
    """Whether something listens on `port`. SO_REUSEADDR as torch's TCPStore binds: a port left in
    TIME_WAIT by a run that just ended is free for it, and must not be refused here."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_master_port() -> str | None:
    """Before any work, on rank 0 of a run that will open a torch.distributed rendezvous: a single
    process with no MASTER_PORT gets a free port (nobody to agree with); otherwise MASTER_PORT (or the
    default) must be free now, not found taken after hours of Block-AP. Returns the problem, or None."""
    if "MASTER_PORT" not in os.environ and world_size()[0] == 1:
        os.environ["MASTER_PORT"] = str(free_port())
        return None
    port = int(os.environ.get("MASTER_PORT", DEFAULT_PORT))
    if _in_use(port):
        return (f"port {port} (MASTER_PORT) is in use on this machine, by another run or service; pass "
                f"--master_port {free_port()} to the deepspeed launcher (or set MASTER_PORT={free_port()})")
    return None
