"""The job on every rank: Block-AP (or RTN) over the ranks, then on rank 0 export and evaluation."""
from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from .blockap.checkpoint import MANIFEST, ResumeError
from .blockap.trainer import BlockAPSettings, NonFiniteLossError
from .utils.settings import DTYPES, run_settings
from .data.text import DataError
from .data.windows import calibration_windows, eval_windows
from .dist.heartbeat import FOLDER as HEARTBEATS, Heartbeat, unfinished_ranks
from .dist.transport import LocalTransport, PeerFailure, make_transport
from .eval import perplexity
from .eval.harness import zero_shot
from .eval.report import write_report
from .export import load_packed_model
from .export.gptq_v2 import method_after_e2e, read_quant_config
from .export.staging import new_stage, publish, recover, settled
from .export.streaming import write_e2e_blocks, write_packed_blocks
from .models import load_model
from .models.loading import ModelLoadError
from .utils.tensors import CheckpointError
from .models.blocks import blocks_name
from .models.lazy import LazyModel
from .models.quantize import check_model, to_fake_quant, to_packed
from .pipelines.round_robin import Progress, StreamSpec, restored_blocks, run_blockap
from .utils.lock import LOCK
from .utils.monitor import Monitor, summary_table


def evaluate(model, tokenizer, args, device, label: str) -> dict:
    """Perplexity on each --eval-datasets source and zero-shot accuracy on --zeroshot-tasks."""
    out = {"perplexity": {}, "zero_shot": {}}
    spread = len(set(getattr(model, "hf_device_map", {}).values())) > 1  # placed by accelerate: leave it there
    if spread:
        device = model.device  # where the embedding is; accelerate's hooks move activations on
    else:
        model.to(device)
    for name in [d for d in args.eval_datasets.split(",") if d]:
        windows = eval_windows(tokenizer, name, args.eval_seqlen, args.eval_max_windows)
        ppl = perplexity(model, windows, args.eval_batch_size, device, desc=f"{label} {name}")
        out["perplexity"][name] = {"ppl": ppl, "windows": len(windows), "seqlen": args.eval_seqlen}
        print(f"[eval] {label:>10} {name:>13}: perplexity {ppl:.3f} ({len(windows)} x {args.eval_seqlen})")
    if args.zeroshot_tasks:
        out["zero_shot"] = zero_shot(model, tokenizer, args.zeroshot_tasks, device, args.zeroshot_limit, label,
                                     max_length=args.eval_seqlen)
    if not spread:
        model.cpu()
    return out


def evaluate_fp(args, tokenizer, device) -> dict:
    """The full-precision baseline, in the training dtype (bfloat16 on a GPU: Llama-2-70B in float32 is
    280 GB) and, on a node with several GPUs, spread over all of them by accelerate's device map."""
    if device.type != "cuda":
        fp_model, _ = load_model(args.model)
    else:
        dtype = torch.bfloat16 if args.dtype == "auto" else DTYPES[args.dtype]
        spread = "balanced" if torch.cuda.device_count() > 1 else None
        fp_model, _ = load_model(args.model, dtype=dtype, device_map=spread)
    result = evaluate(fp_model, tokenizer, args, device, "fp")
    del fp_model
    return result


def _log_eval(out: Path, label: str, result: dict) -> None:
    """Final figures as TensorBoard scalars beside the training curves."""
    writer = Monitor(out / "tb" / "eval")
    for name, r in result["perplexity"].items():
        writer.scalar(f"eval/{label}/{name}_ppl", r["ppl"], 0)
    for name, r in result["zero_shot"].items():
        writer.scalar(f"eval/{label}/{name}_acc", r["acc"], 0)
    writer.close()


def _rank_device(args, transport) -> torch.device:
    if args.device.type == "cuda" and transport.world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", transport.rank)) % torch.cuda.device_count())
    return args.device


def run(args) -> int:
    transport = make_transport() if not args.single_gpu else LocalTransport()
    progress = Progress()
    out = Path(args.output)
    heartbeat = None
    try:
        if transport.rank == 0:
            for line in recover(out):  # an export a kill cut short: finish its move or drop it
                print(f"[resume] {line}", flush=True)
            for line in unfinished_ranks(out / HEARTBEATS):
                print(f"[resume] {line}", flush=True)
        transport.barrier()  # every rank validated the output folder before anyone writes to it
        if transport.world > 1:  # a stopped or hung peer ends the run after --peer-timeout, naming it
            heartbeat = Heartbeat(out / HEARTBEATS, transport.rank, transport.world, args.peer_timeout, progress.where)
            transport.watchdog = heartbeat.check
        if args.phase == "e2e":
            return _e2e(args, transport, progress, out, Path(args.from_dir))
        if args.phase == "eval":
            progress.phase = "evaluation"
            return _eval_phase(args, out) if transport.rank == 0 else 0
        if transport.rank == 0:
            if args.overwrite and out.exists():
                for item in out.iterdir():  # everything but our lock: the folder stays ours meanwhile
                    if item.name not in (LOCK, HEARTBEATS):
                        shutil.rmtree(item) if item.is_dir() else item.unlink()
            out.mkdir(parents=True, exist_ok=True)
        transport.barrier()
        if args.blockap_done:
            code = 0
            if transport.rank == 0:
                print(f"[block-ap] finished earlier in {out} (results.json): going on with E2E-QP", flush=True)
        else:
            code = _run(args, transport, progress, out)
        if code == 0 and args.phase == "all" and args.e2e_epochs > 0:
            transport.barrier()
            code = _e2e(args, transport, progress, out, out)
        return code
    except (NonFiniteLossError, ResumeError) as err:
        transport.fail(f"eqat-dist: error (rank {transport.rank}): {err}")
    except PeerFailure as err:
        transport.fail(f"eqat-dist: rank {transport.rank} stopping{progress.where()}: {err}.{_kept(out)}")
    except KeyboardInterrupt:  # Ctrl-C or SIGINT to one rank: stop every rank (MPI: Abort), not only this one
        transport.fail(f"eqat-dist: rank {transport.rank} interrupted{progress.where()}.{_kept(out)}")
        return 130
    except (ModelLoadError, CheckpointError, DataError, OSError) as err:  # the input or the machine: its message says it
        if getattr(args, "debug", False):
            traceback.print_exc()
        transport.fail(f"eqat-dist: rank {transport.rank} failed{progress.where()}: {err}{_kept(out)}")
    except Exception as err:  # noqa: BLE001 - any failure must stop every rank, not hang them
        if getattr(args, "debug", False):
            traceback.print_exc()
        transport.fail(f"eqat-dist: rank {transport.rank} failed{progress.where()}: {type(err).__name__}: "
                       f"{' '.join(str(err).split())[:500]}{_kept(out)}"
                       f"{'' if getattr(args, 'debug', False) else ' (--debug prints the traceback)'}")
    finally:
        if heartbeat is not None:
            heartbeat.close()
    return 1


def _kept(out: Path) -> str:
    """What a user can resume from after a failure, when there is any."""
    kept = [what for what, there in (("Block-AP blocks", any((out / "blockap").glob("block_*"))),
                                     ("E2E-QP checkpoints", (out / "e2e_ckpt" / "latest").exists()),
                                     ("an export", (out / "config.json").exists())) if there]
    if not kept:
        return ""
    return f" Finished work is kept in {out} ({', '.join(kept)}); run the same command again to resume."


def _run(args, transport, progress, out: Path) -> int:
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    if args.student_input is None:
        args.student_input = default_student_input(out / "blockap", transport.world)
    if args.correction_fraction is None and args.student_input == "pipelined":
        args.correction_fraction = default_correction(out / "blockap", transport.world)
    device = _rank_device(args, transport)
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
            return 0 if args.phase == "block-ap" or args.e2e_epochs == 0 else _wait_for_rank0(transport)
        results["method"] = "rtn"  # the min/max initialisation, block by block at the export
        blocks = _rtn_blocks(source, args.qcfg)
    else:
        train_ids, val_ids = calibration_windows(tokenizer, args.calib_dataset, args.seqlen, args.train_size,
                                                 args.val_size, args.seed)
        settings = BlockAPSettings(epochs=args.epochs, batch_size=args.batch_size, quant_lr=args.quant_lr,
                                   weight_lr=args.weight_lr, min_lr_factor=args.min_lr_factor,
                                   max_grad_norm=args.max_grad_norm, train_norms=not args.no_train_norms,
                                   amp_dtype=args.amp_dtype, seed=args.seed)
        streams = StreamSpec(args.activations, torch.float32 if args.amp_dtype is None else args.amp_dtype,
                             Path(args.activations_dir) if args.activations_dir else out / "acts")
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
            return 0 if args.phase == "block-ap" or args.e2e_epochs == 0 else _wait_for_rank0(transport)
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
        _write_results(stage, results)
        publish(stage, out)
    if not args.no_tensorboard:
        if "fp" in results:
            _log_eval(out, "fp", results["fp"])
        _log_eval(out, "quantized", results["quantized"])
    if args.phase == "all" and args.e2e_epochs > 0:
        transport.barrier()  # the other ranks wait here for the export E2E-QP starts from
    print(f"[done] {out} ({results['seconds']:.0f} s); results in {out / 'results.json'}")
    return 0


@contextmanager
def staged(out: Path):
    """A stage folder for an export (export/staging.py), deleted if the export fails before its move."""
    stage = new_stage(out)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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


def _rtn_blocks(source: LazyModel, cfg):
    """Round-to-nearest blocks, one at a time (the export writes each and drops it)."""
    for i in range(source.num_blocks):
        yield i, to_packed(to_fake_quant(source.block(i), cfg), cfg)
        source.release(i)


def _wait_for_rank0(transport) -> int:
    transport.barrier()  # matched by rank 0 once its export is written
    return 0


def _write_results(out: Path, results: dict) -> None:
    """results.json and its human-readable twin report.md, each replaced atomically."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    write_report(out / "report.md", results)


def _eval_phase(args, out: Path) -> int:
    """--phase eval: evaluate the packed model in --from (default --output), results into --output."""
    source = Path(args.from_dir)
    out.mkdir(parents=True, exist_ok=True)
    packed, tokenizer = load_packed_model(source)
    qcfg = read_quant_config(source)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    results.setdefault("settings", {"model": args.model, "wbits": qcfg.bits, "group_size": qcfg.group_size})
    entry = {"model_dir": str(source.resolve()), "settings": {
        "eval_datasets": args.eval_datasets, "eval_seqlen": args.eval_seqlen, "eval_max_windows": args.eval_max_windows,
        "zeroshot_tasks": args.zeroshot_tasks, "zeroshot_limit": args.zeroshot_limit}}
    entry["quantized"] = evaluate(packed, tokenizer, args, args.device, qcfg.tag())
    del packed
    if not args.skip_fp_eval:
        entry["fp"] = evaluate_fp(args, tokenizer, args.device)
    results["eval"] = entry
    _write_results(out, results)
    if not args.no_tensorboard:
        _log_eval(out, "eval", entry["quantized"])
    print(f"[done] evaluation of {source}; {out / 'results.json'}, {out / 'report.md'}")
    return 0


def _e2e(args, transport, progress, out: Path, from_dir: Path) -> int:
    """E2E-QP from the packed model in `from_dir`, exported to `out` (rank 0), then evaluated."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from .e2e.ds_setup import build_packed_model, gathered_blocks, init_distributed, load_ds_config, partition_report
    from .e2e.trainer import E2ESettings, train_e2e

    progress.block, progress.phase = None, "E2E-QP setup"
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _rank_device(args, transport)
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
        _write_results(stage, results)
        publish(stage, out)
    if not args.no_tensorboard:
        _log_eval(out, "quantized_e2e", results["quantized_e2e"])
    print(f"[done] E2E-QP {report['steps']} steps; {out / 'results.json'}")
    return 0
