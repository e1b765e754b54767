"""The E2E-QP phase: the step sizes trained end to end on DeepSpeed from a packed export, then the export
written one gathered block at a time by rank 0, evaluated, and published with its results."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ..config import DTYPES, RunConfig
from ..data.chat import chat_examples, is_chat_source
from ..data.windows import TextWindows, calibration_windows
from ..export import load_packed_model, writer_for
from ..export.convert import write_serving_formats
from ..export.formats import NATIVE
from ..export.staging import publish, staged
from ..models.family import blocks_name
from ..run_folder import RunFolder
from ..utils.memory import reset_peak_memory
from ..utils.monitor import Monitor
from .evaluation import evaluate_packed, log_eval, write_results
from .record import run_record


def e2e_phase(cfg: RunConfig, transport, progress, folder: RunFolder, from_dir: Path) -> int:
    """E2E-QP from the packed model in `from_dir`, exported to the output (rank 0), then evaluated."""
    import torch.distributed as torch_dist
    from transformers import AutoTokenizer

    from ..e2e.ds_setup import build_packed_model, gathered_blocks, init_distributed, load_ds_config, partition_report
    from ..e2e.trainer import E2ESettings, train_e2e

    e = cfg.e2e
    device = cfg.machine.device  # this rank's, made current at start-up (cluster/launch.bind_device)
    progress.block, progress.phase = None, "E2E-QP setup"
    reset_peak_memory(device)  # E2E-QP's own peaks (model build included), not Block-AP's or an evaluation's
    init_distributed()
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    bf16 = cfg.machine.e2e_bf16
    ds_config, accum = load_ds_config(e.ds_config, e.micro_batch, e.global_batch, world, e.max_grad_norm, bf16)
    record = run_record(cfg, transport)
    record["ds_config_resolved"] = copy.deepcopy(ds_config)  # as given to DeepSpeed (which may add to it)
    if rank == 0:
        print(f"[e2e] global batch {e.global_batch} = micro batch {e.micro_batch} x "
              f"{accum} accumulation steps x {world} rank(s); DeepSpeed config {e.ds_config}", flush=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, qcfg = build_packed_model(from_dir, ds_config, dtype)
    partitions = partition_report(model)
    tokenizer = AutoTokenizer.from_pretrained(from_dir)
    data = training_rows(cfg, tokenizer, rank)
    settings = E2ESettings.of(e, seed=cfg.seed)
    monitor = Monitor(folder.e2e_logs(rank, world)) if cfg.tensorboard else None
    progress.phase = "E2E-QP training"
    report = train_e2e(model, data, settings, ds_config, accum, folder.e2e_checkpoints, device,
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
    report["ds_config"] = e.ds_config
    report["run"] = record
    results = folder.read_results() or {}
    writer = writer_for(NATIVE)
    with staged(folder) as stage:  # the E2E-QP weights, results and report replace the earlier ones together
        t_export = time.time()
        report |= writer.write_retrained(from_dir, gathered, blocks_name(engine.module), tokenizer, stage,
                                         writer.method_after_e2e(from_dir), DTYPES[cfg.export_dtype])
        write_serving_formats(stage, cfg.export_formats[1:], folder)  # converted from what was just written
        report["export_s"] = time.time() - t_export
        if monitor:
            monitor.close()
        del engine, model
        results["e2e"] = report
        progress.phase = "evaluation after E2E-QP"
        reloaded, _ = load_packed_model(stage)
        results["quantized_e2e"] = evaluate_packed(cfg, reloaded, tokenizer, qcfg.tag() + "+e2e")
        del reloaded
        write_results(folder, results, within=stage)
        publish(stage, folder.root)
    if cfg.tensorboard:
        log_eval(folder, "quantized_e2e", results["quantized_e2e"])
    print(f"[done] {folder.root}: E2E-QP {report['steps']} steps; results in {folder.results()}", flush=True)
    return 0


def training_rows(cfg: RunConfig, tokenizer, rank: int):
    """E2E-QP's data: windows of a text source (the calibration set's by default, other windows than
    Block-AP's), or conversations trained on the assistant's tokens (data/chat.py)."""
    e = cfg.e2e
    if not is_chat_source(e.data):
        windows, _ = calibration_windows(tokenizer, e.data, e.seqlen, e.train_size, 0, cfg.seed + 1)
        return TextWindows(windows)
    data = chat_examples(tokenizer, e.data, e.seqlen, e.train_size, cfg.seed + 1)
    if rank == 0:
        trained = int((data.labels != -100).sum())
        print(f"[e2e] {len(data)} conversations from '{e.data}' (chat template; the loss on the assistant's "
              f"{trained:,} of {int(data.lengths.sum()):,} tokens)"
              + (f"; the set has fewer than `e2e_train_size` {e.train_size}" if len(data) < e.train_size else ""),
              flush=True)
    return data
