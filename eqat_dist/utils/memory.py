"""Peak memory of this process: what a user compares between offload settings and rank counts."""
from __future__ import annotations

import resource
import sys

import torch


def host_peak_rss_mib() -> float:
    """Peak resident set size of this process so far. Linux: the memory map's high-water mark (VmHWM).
    Not ru_maxrss: exec keeps the larger of the new and the old image's peak, so a process started by a
    big parent (a benchmark, a launcher that imported torch) reports the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring a phase's own peaks: the GPU's allocated and reserved high-water marks, and the
    host's (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current resident size), so a
    phase does not report what an earlier one (Block-AP, an evaluation) used."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the host peak is then the process's whole history


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peaks since the last `reset_peak_memory`: {"host_rss": MiB, and on a CUDA device "device": MiB
    allocated, "device_reserved": MiB reserved by PyTorch's caching allocator}."""
    device = torch.device(device)
    peaks = {"host_rss": host_peak_rss_mib()}
    if device.type == "cuda":
        peaks["device"] = torch.cuda.max_memory_allocated(device) / 2**20
        peaks["device_reserved"] = torch.cuda.max_memory_reserved(device) / 2**20
    return peaks


def return_freed_memory() -> None:
    """Hand memory freed inside the C heap back to the OS (glibc's malloc_trim). After a block's weights
    are dropped, glibc keeps its smaller tensors' chunks (its mmap threshold rises to 32 MB once large
    chunks are freed), and a rank's resident memory grew by ~33 MB per block read (1B model, measured)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do
