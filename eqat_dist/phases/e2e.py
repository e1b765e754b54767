"""The E2E-QP phase: the step sizes trained end to end on DeepSpeed from a packed export, then the export
written one gathered block at a time by rank 0, evaluated, and published with its results."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.windows import calibration_windows
from ..export import load_packed_model
from ..export.gptq_v2 import method_after_e2e
from ..export.staging import publish, settled, staged
from ..export.streaming import write_e2e_blocks
from ..models.blocks import blocks_name
from ..utils.memory import reset_peak_memory
from ..utils.monitor import Monitor
from ..utils.settings import DTYPES
from .evaluation import evaluate, log_eval, write_results


def e2e_phase(args, transport, progress, out: Path, from_dir: Path) -> int:
    """E2E-QP from the packed model in `from_dir`, exported to `out` (rank 0), then evaluated."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from ..e2e.ds_setup import build_packed_model, gathered_blocks, init_distributed, load_ds_config, partition_report
    from ..e2e.trainer import E2ESettings, train_e2e

    progress.block, progress.phase = None, "E2E-QP setup"
    reset_peak_memory(args.device)  # E2E-QP's own peaks (model build included), not Block-AP's or an evaluation's
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = args.device  # this rank's, made current at start-up (dist/launch.bind_device)
    bf16 = device.type == "cuda" if args.dtype == "auto" else args.dtype == "bfloat16"
    ds_config, accum = load_ds_config(args.ds_config, args.e2e_micro_batch, args.e2e_global_batch, world,
                                      args.e2e_max_grad_norm, bf16)
    if rank == 0:
        print(f"[e2e] global batch {args.e2e_global_batch} = micro batch {args.e2e_micro_batch} x "
              f"{accum} accumulation steps x {world} rank(s); DeepSpeed config {args.ds_config}", flush=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, qcfg = build_packed_model(from_dir, ds_config, dtype)
    partitions = partition_report(model)
    tokenizer = AutoTokenizer.from_pretrained(from_dir)
    windows, _ = calibration_windows(tokenizer, args.calib_dataset, args.e2e_seqlen, args.e2e_train_size, 0,
                                     args.seed + 1)
    settings = E2ESettings(epochs=args.e2e_epochs, global_batch=args.e2e_global_batch,
                           micro_batch=args.e2e_micro_batch, lr=args.e2e_lr, warmup=args.e2e_warmup,
                           max_grad_norm=args.e2e_max_grad_norm, grad_checkpointing=not args.no_grad_checkpointing,
                           save_every=args.e2e_save_every, keep_checkpoints=args.e2e_keep_checkpoints,
                           seed=args.seed)
    monitor = None if args.no_tensorboard else Monitor(out / "tb" / ("e2e" if world == 1 else f"e2e-rank{rank}"))
    progress.phase = "E2E-QP training"
    report = train_e2e(model, windows, settings, ds_config, accum, out / "e2e_ckpt", device,
                       log=lambda m: print(m, flush=True), monitor=monitor)
    engine = report.pop("engine")
    progress.phase = "E2E-QP export"
    gathered = gathered_blocks(engine.module)  # one block at a time, on every rank in step
    if rank != 0:
        for _ in gathered:
            pass
        if monitor:
            monitor.close()
        return 0  # done: rank 0 evaluates alone, nobody waits on it in a collective that can time out
    report["partition"] = partitions
    report["ds_config"] = args.ds_config
    results = json.loads(settled(out, "results.json").read_text()) if settled(out, "results.json").exists() else {}
    with staged(out) as stage:  # the E2E-QP weights, results and report replace the earlier ones together
        report |= write_e2e_blocks(from_dir, gathered, blocks_name(engine.module), tokenizer, stage,
                                   method_after_e2e(from_dir), DTYPES[args.export_dtype])
        if monitor:
            monitor.close()
        del engine, model
        results["e2e"] = report
        progress.phase = "evaluation after E2E-QP"
        reloaded, _ = load_packed_model(stage)
        results["quantized_e2e"] = evaluate(reloaded, tokenizer, args, device, qcfg.tag() + "+e2e")
        del reloaded
        write_results(stage, results)
        publish(stage, out)
    if not args.no_tensorboard:
        log_eval(out, "quantized_e2e", results["quantized_e2e"])
    print(f"[done] E2E-QP {report['steps']} steps; {out / 'results.json'}")
    return 0
