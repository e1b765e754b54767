"""The Block-AP phase (or RTN with --epochs 0): every rank trains its blocks, then rank 0 writes the
export block by block, evaluates it and publishes export and results together."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..blockap.checkpoint import MANIFEST
from ..blockap.trainer import BlockAPSettings
from ..data.windows import calibration_windows
from ..export import load_packed_model
from ..export.staging import publish, staged
from ..export.streaming import write_packed_blocks
from ..models.lazy import LazyModel
from ..models.quantize import check_model, to_fake_quant, to_packed
from ..blockap.stores import store_prefix
from ..pipelines.round_robin import StreamSpec, restored_blocks, run_blockap
from ..utils.monitor import Monitor, summary_table
from ..utils.settings import DTYPES, run_settings
from .evaluation import evaluate, evaluate_fp, log_eval, write_results


def blockap_phase(args, transport, progress, out: Path) -> int:
    """Block-AP (or RTN with --epochs 0) over the ranks, then on rank 0 the export, staged with its evaluation."""
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    if args.student_input is None:
        args.student_input = default_student_input(out / "blockap", transport.world)
    if args.correction_fraction is None and args.student_input == "pipelined":
        args.correction_fraction = default_correction(out / "blockap", transport.world)
    if args.correction_lr is None and args.student_input == "pipelined":
        args.correction_lr = _from_manifest(out / "blockap", "correction_lr") or "continue"
    device = args.device  # this rank's, made current at start-up (dist/launch.bind_device)
    t_start = time.time()
    source = LazyModel(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    check_model(source.model, args.qcfg)  # shapes only: the blocks are still on the meta device
    if len(tokenizer) > source.model.get_input_embeddings().num_embeddings:
        raise ValueError(f"the tokenizer of {args.model} has {len(tokenizer)} tokens but the model's embedding "
                         f"only {source.model.get_input_embeddings().num_embeddings}; they do not belong together")
    log_dir = None if args.no_tensorboard else (out / "tb" if transport.world == 1 else out / "tb" / f"rank{transport.rank}")
    monitor = Monitor(log_dir) if log_dir else None
    results = {"settings": run_settings(args) | {
        "eval_datasets": args.eval_datasets, "eval_seqlen": args.eval_seqlen, "eval_max_windows": args.eval_max_windows,
        "bits_per_weight": args.qcfg.bits_per_weight(source.config.hidden_size), "ranks": transport.world,
        "transport": transport.kind}}
    if args.epochs == 0:
        if transport.rank != 0:
            return 0 if args.phase == "block-ap" or args.e2e_epochs == 0 else wait_for_rank0(transport)
        results["method"] = "rtn"  # the min/max initialisation, block by block at the export
        blocks = rtn_blocks(source, args.qcfg)
    else:
        train_ids, val_ids = calibration_windows(tokenizer, args.calib_dataset, args.seqlen, args.train_size,
                                                 args.val_size, args.seed)
        settings = BlockAPSettings(epochs=args.epochs, batch_size=args.batch_size, quant_lr=args.quant_lr,
                                   weight_lr=args.weight_lr, min_lr_factor=args.min_lr_factor,
                                   max_grad_norm=args.max_grad_norm, train_norms=not args.no_train_norms,
                                   amp_dtype=args.amp_dtype, seed=args.seed,
                                   restart_at_switch=args.correction_lr != "continue")
        streams = StreamSpec(args.activations, torch.float32 if args.amp_dtype is None else args.amp_dtype,
                             Path(args.activations_dir) if args.activations_dir else out / "acts",
                             prefix=store_prefix(out), remove_stale=args.launch.local_rank == 0)
        if transport.rank == 0:
            print(f"[block-ap] {len(train_ids)} train + {len(val_ids)} val windows of {args.seqlen} tokens from "
                  f"'{args.calib_dataset}', {args.epochs} epochs, batch {args.batch_size}, {args.qcfg.tag()}, "
                  f"student input: {args.student_input}, {transport.world} rank(s) over {transport.kind}", flush=True)
        t_blockap = time.time()
        run_blockap(source, args.qcfg, train_ids, val_ids, settings, out / "blockap", run_settings(args), device,
                    streams, args.student_input, transport, monitor, progress=progress,
                    correction=args.correction_fraction)
        progress.block, progress.phase = None, "waiting for the other ranks"
        transport.barrier()
        results["blockap_wall_s"] = time.time() - t_blockap  # all ranks done
        if monitor:
            monitor.close()
        if transport.rank != 0:
            return 0 if args.phase == "block-ap" or args.e2e_epochs == 0 else wait_for_rank0(transport)
        results["method"], results["blocks"] = "block-ap", []
        blocks = restored_blocks(source, args.qcfg, out / "blockap", results["blocks"])
    progress.phase = "export"
    with staged(out) as stage:  # weights, config, results and report appear in `out` together
        write_packed_blocks(source, blocks, tokenizer, stage, args.qcfg, results["method"], DTYPES[args.export_dtype])
        if results.get("blocks"):
            print(summary_table(results["blocks"]))
        del source
        progress.phase = "evaluation"
        packed, _ = load_packed_model(stage)  # evaluate what was written, not what is in memory
        results["quantized"] = evaluate(packed, tokenizer, args, device, args.qcfg.tag())
        del packed
        if not args.skip_fp_eval:
            results["fp"] = evaluate_fp(args, tokenizer, device)
        results["seconds"] = time.time() - t_start
        write_results(stage, results)
        publish(stage, out)
    if not args.no_tensorboard:
        if "fp" in results:
            log_eval(out, "fp", results["fp"])
        log_eval(out, "quantized", results["quantized"])
    if args.phase == "all" and args.e2e_epochs > 0:
        transport.barrier()  # the other ranks wait here for the export E2E-QP starts from
    print(f"[done] {out} ({results['seconds']:.0f} s); results in {out / 'results.json'}")
    return 0


def _from_manifest(ckpt_dir: Path, key: str):
    """A setting of the run whose blocks are in `ckpt_dir`, if any: a run resumed on another number of
    ranks keeps the schedule its finished blocks were trained with."""
    try:
        return json.loads((ckpt_dir / MANIFEST).read_text()).get(key)
    except (OSError, ValueError):
        return None  # none yet, or open_run names the problem


def default_student_input(ckpt_dir: Path, ranks: int) -> str:
    """The paper's scheme on one rank, pipelined on several (or what the resumed run used)."""
    return _from_manifest(ckpt_dir, "student_input") or ("pipelined" if ranks > 1 else "student")


def default_correction(ckpt_dir: Path, ranks: int) -> float:
    """1/N: the largest share of each block's steps on the quantized stream that keeps N ranks busy
    (timeline.py), or what the resumed run used."""
    return _from_manifest(ckpt_dir, "correction_fraction") or 1.0 / ranks


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


