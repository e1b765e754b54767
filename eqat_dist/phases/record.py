"""What results.json says about how a phase was run: the command (as typed, every flag's value, and
the command line that gives them again), every setting as resolved (defaults chosen per width, world
or model filled in), the launch and the package versions. Enough to repeat a run, or to tell why two
runs differ, from its results alone."""
from __future__ import annotations

import dataclasses
import platform
import socket
import time
from importlib import metadata
from pathlib import Path

import torch

from ..config import RunConfig

PACKAGES = ("eqat-dist", "torch", "transformers", "deepspeed", "accelerate", "safetensors", "datasets", "numpy",
            "mpi4py", "triton", "lm-eval")


def plain(value):
    """A settings value as JSON holds it (paths, devices and dtypes as text; dataclasses as dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    return value


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return found


def run_record(cfg: RunConfig, transport) -> dict:
    """The record of this command, for the phase it ran (results.json `run`, `e2e.run`, `eval.run`)."""
    m = cfg.machine
    parts = [f.name for f in dataclasses.fields(cfg) if f.name not in ("machine", "invocation")
             and dataclasses.is_dataclass(getattr(cfg, f.name))]  # quant, Block-AP, streams, E2E-QP, evaluation
    settings = {name: plain(getattr(cfg, name)) for name in parts}
    settings |= {"seed": cfg.seed, "export_dtype": cfg.export_dtype, "export_formats": list(cfg.export_formats),
                 "machine": {"device": str(m.device), "dtype": m.dtype, "amp_dtype": plain(m.amp_dtype),
                             "kernels": m.kernels, "compile": m.compile, "weight_work": m.weight_work,
                             "splits_weight_work": m.splits_weight_work}}
    device = torch.cuda.get_device_name(m.device) if m.device.type == "cuda" else platform.processor() or "cpu"
    return {"command": cfg.invocation.command, "argv": list(cfg.invocation.argv), "flags": plain(cfg.invocation.flags),
            "settings": settings, "launch": {"ranks": transport.world, "transport": transport.kind,
                                             "host": socket.gethostname(), "device": device},
            "versions": versions(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
