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
