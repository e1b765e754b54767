"""Evaluation: perplexity and zero-shot accuracy of the packed model (and the full-precision one),
results.json and report.md, and `--phase eval` on any packed export."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..config import EvalConfig, RunConfig
from ..data.windows import eval_windows
from ..eval import perplexity
from ..eval.harness import zero_shot
from ..eval.report import write_report
from ..export import load_packed_model
from ..export.gptq_v2 import METHODS, export_method, read_quant_config
from ..models import load_model
from ..models.loading import resolve_folder
from ..utils.memory import peak_memory_mib, reset_peak_memory
from ..run_folder import RunFolder
from ..utils.monitor import Monitor


def dispatched(model) -> bool:
    """Whether accelerate placed the model's layers over several devices (its hooks move activations
    between them): such a model must never be moved as a whole."""
    return len(set(getattr(model, "hf_device_map", {}).values())) > 1


def evaluate(model, tokenizer, settings: EvalConfig, amp: torch.dtype | None, device, label: str) -> dict:
    """Perplexity on each evaluation dataset and zero-shot accuracy on each task, under the training's
    autocast dtype `amp` (bf16 on a GPU by default), so that packed layers run 16-bit kernels."""
    out = {"perplexity": {}, "zero_shot": {}}
    t_start = time.time()
    reset_peak_memory(device)
    spread = dispatched(model)
    if spread:
        device = model.device  # where the embedding is; accelerate's hooks move activations on
    else:
        model.to(device)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for name in settings.datasets:
            windows = eval_windows(tokenizer, name, settings.seqlen, settings.max_windows)
            ppl = perplexity(model, windows, settings.batch_size, device, desc=f"{label} {name}")
            out["perplexity"][name] = {"ppl": ppl, "windows": len(windows), "seqlen": settings.seqlen}
            print(f"[eval] {label:>10} {name:>13}: perplexity {ppl:.3f} ({len(windows)} x {settings.seqlen})")
        if settings.zeroshot_tasks:
            out["zero_shot"] = zero_shot(model, tokenizer, list(settings.zeroshot_tasks), settings.zeroshot_limit,
                                         label, max_length=settings.seqlen)
    out["peak_memory_mib"] = peak_memory_mib(device)  # this evaluation's own (the model was loaded before)
    out["seconds"] = time.time() - t_start
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


def evaluate_fp(cfg: RunConfig, tokenizer) -> dict:
    """The full-precision baseline, in the training dtype (bfloat16 on a GPU: Llama-2-70B in float32 is
    280 GB), placed by `fp_device_map`."""
    device, world = cfg.machine.device, cfg.machine.world
    folder = resolve_folder(cfg.model)  # once: a hub id is looked up, a GGUF file converted
    if RunFolder(folder).holds_packed_model():  # --model is itself an export
        fp_model, _ = load_packed_model(folder)
    elif device.type != "cuda":
        fp_model, _ = load_model(str(folder))
    else:
        if torch.cuda.device_count() > 1 and world > 1:
            torch.cuda.empty_cache()  # this rank's cached blocks: the other GPUs' are freed by their ranks
        placement = fp_device_map(device, world, torch.cuda.device_count())
        fp_model, _ = load_model(str(folder), dtype=cfg.machine.model_dtype, device_map=placement)
    result = evaluate(fp_model, tokenizer, cfg.evaluation, cfg.machine.amp_dtype, device, "fp")
    del fp_model
    return result


def evaluate_packed(cfg: RunConfig, model, tokenizer, label: str) -> dict:
    """The packed model's figures, on this rank's device under the training's autocast dtype."""
    return evaluate(model, tokenizer, cfg.evaluation, cfg.machine.amp_dtype, cfg.machine.device, label)


def log_eval(folder: RunFolder, label: str, result: dict) -> None:
    """Final figures as TensorBoard scalars beside the training curves."""
    writer = Monitor(folder.eval_logs())
    for name, r in result["perplexity"].items():
        writer.scalar(f"eval/{label}/{name}_ppl", r["ppl"], 0)
    for name, r in result["zero_shot"].items():
        writer.scalar(f"eval/{label}/{name}_acc", r["acc"], 0)
    writer.close()


def write_results(folder: RunFolder, results: dict, within: Path | None = None) -> None:
    """results.json and its human-readable twin report.md, each replaced atomically, in the output or
    in a stage (`within`) that will be moved into it."""
    path = folder.results(within)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    write_report(folder.report(within), results)


def eval_phase(cfg: RunConfig, folder: RunFolder, transport) -> int:
    """--phase eval: evaluate the packed model in `from_dir` (default the output), results into the output."""
    from .record import run_record

    source, ev = cfg.from_dir, cfg.evaluation
    folder.root.mkdir(parents=True, exist_ok=True)
    packed, tokenizer = load_packed_model(source)
    qcfg = read_quant_config(source)
    method = export_method(source)
    results = folder.read_results() or {}
    results.setdefault("settings", {"model": cfg.model, "wbits": qcfg.bits, "group_size": qcfg.group_size})
    entry = {"model_dir": str(source.resolve()), "method": method, "settings": {
        "eval_datasets": ev.datasets_text, "eval_seqlen": ev.seqlen, "eval_max_windows": ev.max_windows,
        "zeroshot_tasks": list(ev.zeroshot_tasks), "zeroshot_limit": ev.zeroshot_limit},
        "run": run_record(cfg, transport)}
    label = qcfg.tag() + ("+e2e" if method and "e2e" in method else "")
    print(f"[eval] {source}: {qcfg.tag()} {METHODS.get(method, 'packed model')}", flush=True)
    entry["quantized"] = evaluate_packed(cfg, packed, tokenizer, label)
    del packed
    if not ev.skip_fp:
        entry["fp"] = evaluate_fp(cfg, tokenizer)
    results["eval"] = entry
    write_results(folder, results)
    if cfg.tensorboard:
        log_eval(folder, "eval", entry["quantized"])
    print(f"[done] evaluation of {source}; {folder.results()}, {folder.report()}")
    return 0
