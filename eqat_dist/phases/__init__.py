"""One module per phase of a run: Block-AP (or RTN) with its export, E2E-QP with its export, evaluation.
runner.py calls them in order on every rank and turns failures into one line."""
from __future__ import annotations

import os

import torch


def rank_device(args, transport) -> torch.device:
    """This rank's GPU (LOCAL_RANK) when several ranks share a node, else --device."""
    if args.device.type == "cuda" and transport.world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", transport.rank)) % torch.cuda.device_count())
    return args.device
