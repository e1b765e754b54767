"""The Block-AP phase (or RTN with --epochs 0): every rank trains its blocks, then rank 0 writes the
export block by block, evaluates it and publishes export and results together."""
from __future__ import annotations

import time

import torch

from ..blockap.trainer import BlockAPSettings
from ..config import DTYPES, RunConfig
from ..data.windows import calibration_windows
from ..export import load_packed_model, writer_for
from ..export.convert import write_serving_formats
from ..export.formats import NATIVE
from ..export.staging import publish, staged
from ..models.lazy import LazyModel
from ..models.quantize import check_model, to_fake_quant, to_packed
from ..blockap.steps import restored_blocks
from ..pipelines.round_robin import StreamSpec, run_blockap
from ..planning import splits_weight_work
from ..run_folder import RunFolder
from ..utils.monitor import Monitor, summary_table
from .evaluation import evaluate_fp, evaluate_packed, log_eval, write_results
from .record import run_record


def blockap_phase(cfg: RunConfig, transport, progress, folder: RunFolder) -> int:
    """Block-AP (or RTN with `epochs` 0) over the ranks, then on rank 0 the export, staged with its evaluation."""
    from transformers import AutoTokenizer

    b, qcfg = cfg.blockap, cfg.quant
    torch.manual_seed(cfg.seed)
    device = cfg.machine.device  # this rank's, made current at start-up (cluster/launch.bind_device)
    t_start = time.time()
    source = LazyModel(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    check_model(source.model, qcfg)  # shapes only: the blocks are still on the meta device
    if len(tokenizer) > source.model.get_input_embeddings().num_embeddings:
        raise ValueError(f"the tokenizer of {cfg.model} has {len(tokenizer)} tokens but the model's embedding "
                         f"only {source.model.get_input_embeddings().num_embeddings}; they do not belong together")
    monitor = Monitor(folder.blockap_logs(transport.rank, transport.world)) if cfg.tensorboard else None
    ev = cfg.evaluation
    results = {"settings": cfg.blockap_record() | {
        "eval_datasets": ev.datasets_text, "eval_seqlen": ev.seqlen, "eval_max_windows": ev.max_windows,
        "bits_per_weight": qcfg.bits_per_weight(source.config.hidden_size), "ranks": transport.world,
        "transport": transport.kind}, "run": run_record(cfg, transport)}
    if b.epochs == 0:
        if transport.rank != 0:
            return wait_for_rank0(transport) if cfg.continues_to_e2e else 0
        results["method"] = "rtn"  # the min/max initialisation, block by block at the export
        blocks = rtn_blocks(source, qcfg)
    else:
        train_ids, val_ids = calibration_windows(tokenizer, b.calib_dataset, b.seqlen, b.train_size, b.val_size,
                                                 cfg.seed)
        settings = BlockAPSettings.of(b, amp_dtype=cfg.machine.amp_dtype, seed=cfg.seed, compile=cfg.machine.compile,
                                      shard_weights=splits_weight_work(cfg))
        streams = StreamSpec(cfg.streams, cfg.machine.store_dtype, prefix=folder.store_prefix(),
                             remove_stale=cfg.machine.launch.local_rank == 0)
        if transport.rank == 0:
            print(f"[block-ap] {len(train_ids)} train + {len(val_ids)} val windows of {b.seqlen} tokens from "
                  f"'{b.calib_dataset}', {b.epochs} epochs, batch {b.batch_size}, {qcfg.tag()}, {qcfg.init} start, "
                  f"{b.loss} loss, "
                  f"student input: {b.student_input}, {transport.world} rank(s) over {transport.kind}"
                  + (f" in {b.groups(transport.world)} group(s) of {b.group_size} ({_layout(b)}, weight work "
                     f"{'split' if settings.splits_weight_work else 'replicated'})" if b.group_size > 1 else ""),
                  flush=True)
        t_blockap = time.time()
        run_blockap(source, qcfg, train_ids, val_ids, settings, folder.blockap, cfg.blockap_record(), device,
                    streams, b.student_input, transport, monitor, progress=progress, correction=b.correction_fraction,
                    data_parallel=b.data_parallel, sequence_parallel=b.sequence_parallel)
        progress.block, progress.phase = None, "waiting for the other ranks"
        transport.barrier()
        results["blockap_wall_s"] = time.time() - t_blockap  # all ranks done
        if monitor:
            monitor.close()
        if transport.rank != 0:
            return wait_for_rank0(transport) if cfg.continues_to_e2e else 0
        results["method"], results["blocks"] = "block-ap", []
        blocks = restored_blocks(source, qcfg, folder.blockap, results["blocks"])
    progress.phase = "export"
    with staged(folder) as stage:  # weights, config, results and report appear in the output together
        t_export = time.time()
        writer_for(NATIVE).write_blocks(source, blocks, tokenizer, stage, qcfg, results["method"],
                                        DTYPES[cfg.export_dtype])
        write_serving_formats(stage, cfg.export_formats[1:], folder)  # converted from what was just written
        results["export_s"] = time.time() - t_export
        if results.get("blocks"):
            print(summary_table(results["blocks"]))
        del source
        progress.phase = "evaluation"
        packed, _ = load_packed_model(stage)  # evaluate what was written, not what is in memory
        results["quantized"] = evaluate_packed(cfg, packed, tokenizer, qcfg.tag())
        del packed
        if not ev.skip_fp:
            results["fp"] = evaluate_fp(cfg, tokenizer)
        results["seconds"] = time.time() - t_start
        write_results(folder, results, within=stage)
        publish(stage, folder.root)
    if cfg.tensorboard:
        if "fp" in results:
            log_eval(folder, "fp", results["fp"])
        log_eval(folder, "quantized", results["quantized"])
    if cfg.continues_to_e2e:
        transport.barrier()  # the other ranks wait here for the export E2E-QP starts from
        print(f"[block-ap] exported to {folder.root} and evaluated ({results['seconds']:.0f} s); E2E-QP next", flush=True)
    else:
        print(f"[done] {folder.root} ({results['seconds']:.0f} s); results in {folder.results()}", flush=True)
    return 0


def _layout(b) -> str:
    """'data parallel', 'sequence parallel' or 'data parallel 2 x sequence parallel 2'."""
    if (b.sequence_parallel or 1) == 1:
        return "data parallel"
    if b.data_parallel == 1:
        return "sequence parallel"
    return f"data parallel {b.data_parallel} x sequence parallel {b.sequence_parallel}"


def rtn_blocks(source: LazyModel, cfg):
    """Round-to-nearest blocks, one at a time (the export writes each and drops it)."""
    for i in range(source.num_blocks):
        yield i, to_packed(to_fake_quant(source.block(i), cfg), cfg)
        source.release(i)


def wait_for_rank0(transport) -> int:
    """Wait while rank 0 exports and evaluates. Its full-precision evaluation spreads the model over the
    node's GPUs, this rank's included: the memory this rank's allocator keeps cached goes back first."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    transport.barrier()  # matched by rank 0 once its export is written
    return 0


