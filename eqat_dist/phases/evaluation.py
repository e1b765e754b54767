"""Evaluation: perplexity and zero-shot accuracy of the packed model (and the full-precision one),
results.json and report.md, and `--phase eval` on any packed export."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..data.windows import eval_windows
from ..eval import perplexity
from ..eval.harness import zero_shot
from ..eval.report import write_report
from ..export import load_packed_model
from ..export.gptq_v2 import read_quant_config
from ..models import load_model
from ..utils.memory import peak_memory_mib, reset_peak_memory
from ..utils.monitor import Monitor
from ..utils.settings import DTYPES


def dispatched(model) -> bool:
    """Whether accelerate placed the model's layers over several devices (its hooks move activations
    between them): such a model must never be moved as a whole."""
    return len(set(getattr(model, "hf_device_map", {}).values())) > 1


def evaluate(model, tokenizer, args, device, label: str) -> dict:
    """Perplexity on each --eval-datasets source and zero-shot accuracy on --zeroshot-tasks, under the
    training's autocast dtype (bf16 on a GPU by default), so that packed layers run 16-bit kernels."""
    out = {"perplexity": {}, "zero_shot": {}}
    reset_peak_memory(device)
    spread = dispatched(model)
    if spread:
        device = model.device  # where the embedding is; accelerate's hooks move activations on
    else:
        model.to(device)
    amp = getattr(args, "amp_dtype", None)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for name in [d for d in args.eval_datasets.split(",") if d]:
            windows = eval_windows(tokenizer, name, args.eval_seqlen, args.eval_max_windows)
            ppl = perplexity(model, windows, args.eval_batch_size, device, desc=f"{label} {name}")
            out["perplexity"][name] = {"ppl": ppl, "windows": len(windows), "seqlen": args.eval_seqlen}
            print(f"[eval] {label:>10} {name:>13}: perplexity {ppl:.3f} ({len(windows)} x {args.eval_seqlen})")
        if args.zeroshot_tasks:
            out["zero_shot"] = zero_shot(model, tokenizer, args.zeroshot_tasks, args.zeroshot_limit, label,
                                         max_length=args.eval_seqlen)
    out["peak_memory_mib"] = peak_memory_mib(device)  # this evaluation's own (the model was loaded before)
    if not spread:
        model.cpu()
    return out


def fp_device_map(device: torch.device, ranks: int, gpus: int):
    """Where the full-precision model's layers go as they are read: straight onto this rank's device in
    a one-process run (--single-gpu means one GPU, however many are visible), spread over the node's
    GPUs by accelerate when a multi-rank job evaluates on rank 0 alone (Llama-2-70B in 16 bits is
    138 GB: more than one 80 GB GPU)."""
    if device.type != "cuda":
        return None
    if ranks > 1 and gpus > 1:
        return "balanced"
    return {"": device.index if device.index is not None else 0}


def evaluate_fp(args, tokenizer, device) -> dict:
    """The full-precision baseline, in the training dtype (bfloat16 on a GPU: Llama-2-70B in float32 is
    280 GB), placed by `fp_device_map`."""
    if device.type != "cuda":
        fp_model, _ = load_model(args.model)
    else:
        dtype = torch.bfloat16 if args.dtype == "auto" else DTYPES[args.dtype]
        if torch.cuda.device_count() > 1 and args.launch.world > 1:
            torch.cuda.empty_cache()  # this rank's cached blocks: the other GPUs' are freed by their ranks
        placement = fp_device_map(device, args.launch.world, torch.cuda.device_count())
        fp_model, _ = load_model(args.model, dtype=dtype, device_map=placement)
    result = evaluate(fp_model, tokenizer, args, device, "fp")
    del fp_model
    return result


def log_eval(out: Path, label: str, result: dict) -> None:
    """Final figures as TensorBoard scalars beside the training curves."""
    writer = Monitor(out / "tb" / "eval")
    for name, r in result["perplexity"].items():
        writer.scalar(f"eval/{label}/{name}_ppl", r["ppl"], 0)
    for name, r in result["zero_shot"].items():
        writer.scalar(f"eval/{label}/{name}_acc", r["acc"], 0)
    writer.close()


def write_results(out: Path, results: dict) -> None:
    """results.json and its human-readable twin report.md, each replaced atomically."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    write_report(out / "report.md", results)


def eval_phase(args, out: Path) -> int:
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
    write_results(out, results)
    if not args.no_tensorboard:
        log_eval(out, "eval", entry["quantized"])
    print(f"[done] evaluation of {source}; {out / 'results.json'}, {out / 'report.md'}")
    return 0


