"""The settings a run is made with, and comparing them to the settings of the command resuming it."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def describe_differences(before: dict, now: dict, keys=None) -> str:
    """'lr: was 0.001, now 0.002; ...' over `keys` (default: every key of either), '' when they agree."""
    keys = set(before) | set(now) if keys is None else keys
    return "; ".join(f"{k}: was {before.get(k)!r}, now {now.get(k)!r}"
                     for k in sorted(keys) if before.get(k) != now.get(k))


def run_settings(args) -> dict:
    """What must match for finished blocks to be reused."""
    return {"model": args.model, "wbits": args.wbits, "group_size": args.group_size, "epochs": args.epochs,
            "batch_size": args.batch_size, "train_size": args.train_size, "val_size": args.val_size,
            "seqlen": args.seqlen, "quant_lr": args.quant_lr, "weight_lr": args.weight_lr,
            "min_lr_factor": args.min_lr_factor, "max_grad_norm": args.max_grad_norm,
            "train_norms": not args.no_train_norms, "calib_dataset": args.calib_dataset,
            "student_input": args.student_input, "dtype": args.dtype, "seed": args.seed} | (
                {"correction_fraction": args.correction_fraction, "correction_lr": args.correction_lr}
                if args.student_input == "pipelined" else {})


def trains_blocks(args) -> bool:
    """Whether this command runs Block-AP training (not RTN, not a later phase alone)."""
    return args.epochs > 0 and args.phase in ("all", "block-ap")


def trains_e2e(args) -> bool:
    """Whether this command runs E2E-QP."""
    return args.e2e_epochs > 0 and args.phase in ("all", "e2e")
