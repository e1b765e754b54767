"""The job: load, evaluate fp, quantize (RTN or Block-AP), export, evaluate the export, report."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .blockap.trainer import BlockAPSettings, NonFiniteLossError
from .blockap.checkpoint import ResumeError
from .cli import DTYPES, run_settings
from .data.windows import calibration_windows, eval_windows
from .eval import perplexity
from .export import load_packed_model, save_packed_model
from .models import load_model
from .models.quantize import check_model, quantize_rtn
from .pipelines.local import StreamSpec, run_blockap_local
from .utils.monitor import Monitor, summary_table


def evaluate(model, tokenizer, args, device, label: str) -> dict:
    out = {}
    model.to(device)
    for name in [d for d in args.eval_datasets.split(",") if d]:
        windows = eval_windows(tokenizer, name, args.eval_seqlen, args.eval_max_windows)
        out[name] = {"ppl": perplexity(model, windows, args.eval_batch_size, device, desc=f"{label} {name}"),
                     "windows": len(windows), "seqlen": args.eval_seqlen}
        print(f"[eval] {label:>10} {name:>6}: perplexity {out[name]['ppl']:.3f} ({len(windows)} x {args.eval_seqlen})")
    model.cpu()
    return out


def run(args) -> int:
    out = Path(args.output)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    device = args.device
    t_start = time.time()
    model, tokenizer = load_model(args.model)
    check_model(model, args.qcfg)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        print(f"eqat-dist: error: the tokenizer of {args.model} has {len(tokenizer)} tokens but the model's "
              f"embedding only {model.get_input_embeddings().num_embeddings}; they do not belong together.")
        return 2
    monitor = None if args.no_tensorboard else Monitor(out / "tb")
    results = {"settings": {k: v for k, v in run_settings(args).items()} | {
        "eval_datasets": args.eval_datasets, "eval_seqlen": args.eval_seqlen,
        "eval_max_windows": args.eval_max_windows, "bits_per_weight": args.qcfg.bits_per_weight(
            model.config.hidden_size)}}
    if not args.skip_fp_eval:
        results["fp"] = evaluate(model, tokenizer, args, device, "fp")
    if args.epochs == 0:
        quantize_rtn(model, args.qcfg)
        results["method"] = "rtn"
    else:
        train_ids, val_ids = calibration_windows(tokenizer, args.calib_dataset, args.seqlen, args.train_size,
                                                 args.val_size, args.seed)
        settings = BlockAPSettings(epochs=args.epochs, batch_size=args.batch_size, quant_lr=args.quant_lr,
                                   weight_lr=args.weight_lr, min_lr_factor=args.min_lr_factor,
                                   max_grad_norm=args.max_grad_norm, train_norms=not args.no_train_norms,
                                   amp_dtype=args.amp_dtype, seed=args.seed)
        streams = StreamSpec(args.activations, torch.float32 if args.amp_dtype is None else args.amp_dtype,
                             Path(args.activations_dir) if args.activations_dir else out / "acts")
        print(f"[block-ap] {len(train_ids)} train + {len(val_ids)} val windows of {args.seqlen} tokens from "
              f"'{args.calib_dataset}', {args.epochs} epochs, batch {args.batch_size}, {args.qcfg.tag()}, "
              f"student input: {args.student_input}")
        try:
            reports = run_blockap_local(model, args.qcfg, train_ids, val_ids, settings, out / "blockap",
                                        run_settings(args), device, streams, args.student_input, monitor)
        except (NonFiniteLossError, ResumeError) as err:
            print(f"eqat-dist: error: {err}")
            return 1
        print(summary_table(reports))
        results["method"] = "block-ap"
        results["blocks"] = reports
    model = model.to(DTYPES[args.export_dtype]) if args.export_dtype != "float32" else model
    save_packed_model(model, tokenizer, out, args.qcfg)
    del model
    packed, _ = load_packed_model(out)  # evaluate what was written, not what is in memory
    results["quantized"] = evaluate(packed, tokenizer, args, device, args.qcfg.tag())
    results["seconds"] = time.time() - t_start
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    if monitor:
        for name, r in results["quantized"].items():
            monitor.scalar(f"eval/{name}_ppl", r["ppl"], 0)
        monitor.close()
    print(f"[done] {out} ({results['seconds']:.0f} s); results in {out / 'results.json'}")
    return 0
