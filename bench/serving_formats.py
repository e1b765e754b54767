"""Serving formats of one export: conversion time and size, and perplexity through each format's own
reader next to our loader's (what a user of each engine's reference path gets).

    python bench/serving_formats.py --from RUN [--formats compressed-tensors,gguf] [--windows 16]

RUN: a finished eqat-dist output folder (GPTQ v2). Readers, none of them ours: transformers with
compressed-tensors (dequantized to float) and transformers' GGUF loader (de-quantized by the gguf
package). AWQ is read by GPTQModel, which lives in its own venv: tests/test_interop.py checks it.
Perplexity: the bundled wiki and news texts, windows of 512 tokens, float32 on CPU.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from eqat_dist.data.windows import eval_windows
from eqat_dist.eval.perplexity import perplexity
from eqat_dist.export import load_packed_model
from eqat_dist.export.convert import write_format
from eqat_dist.export.packed_source import PackedExport


def _size_mib(folder: Path) -> float:
    """The files of the export itself (not the export-FORMAT/ folders a run writes beside them)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def _reader(name: str, folder: Path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if name == "compressed-tensors":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))
    if name == "gguf":
        file = next(folder.glob("*.gguf"))
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=file.name, dtype=torch.float32)
    raise ValueError(f"no reader here for {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("--formats", default="compressed-tensors,gguf")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = Path(args.source)
    ours, tokenizer = load_packed_model(source)
    windows = {d: eval_windows(tokenizer, d, 512, args.windows) for d in ("wiki", "news")}
    rows = [("gptq_v2 (our loader)", _size_mib(source), 0.0,
             {d: perplexity(ours, w, desc=d) for d, w in windows.items()})]
    del ours
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.formats.split(","):
            folder = Path(tmp) / name
            started = time.time()
            write_format(PackedExport(source), name, folder)
            seconds = time.time() - started
            model = _reader(name, folder)
            rows.append((f"{name} (transformers)", _size_mib(folder), seconds,
                         {d: perplexity(model, w, desc=d) for d, w in windows.items()}))
            del model
    print(f"\nexport {source}, {args.windows} x 512 tokens per text, {args.threads} threads")
    print("| format (reader) | size MiB | convert s | wiki ppl | news ppl |")
    print("|---|---|---|---|---|")
    for name, size, seconds, ppl in rows:
        print(f"| {name} | {size:.1f} | {seconds:.1f} | {ppl['wiki']:.3f} | {ppl['news']:.3f} |")


if __name__ == "__main__":
    main()
