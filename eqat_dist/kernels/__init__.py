"""Triton kernels for the quantizer and the packed layers (the top-level `cuda/` links here).

The PyTorch code in eqat_dist.quant is the reference and the CPU path; on a CUDA device the layers
call these kernels instead, unless the run's `kernels` setting (the CLI's --no-kernels; set_enabled) or
EQAT_KERNELS=0 in the environment (benchmarks, notebooks) turns them off. Triton
ships with CUDA builds of PyTorch, so GPU users need no compiler; with TRITON_INTERPRET=1 the same
kernels run on CPU tensors in Triton's interpreter, which is how the tests check them.
"""
from __future__ import annotations

import contextlib
import os

import torch


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_SWITCH = {"on": True}  # this process's choice, set by the runner from MachineConfig.kernels


def set_enabled(on: bool) -> None:
    """The run's `kernels` setting, for every layer of this process."""
    _SWITCH["on"] = bool(on)


def enabled_for(tensor: torch.Tensor) -> bool:
    """Whether a layer computing on `tensor` should use the kernels."""
    return (tensor.is_cuda and _SWITCH["on"] and os.environ.get("EQAT_KERNELS", "1") != "0"
            and available())


def on_device_of(tensor: torch.Tensor):
    """The context every kernel launch runs in: Triton launches on the *current* CUDA device and its
    stream, so a rank whose tensors live on cuda:3 must launch with cuda:3 current (else the kernel
    runs on GPU 0: an illegal access, or a race with the rank that owns GPU 0)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
