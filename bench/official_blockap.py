"""The official EfficientQAT Block-AP (OpenGVLab/EfficientQAT, quantize/block_ap.py) and ours on the same
windows, settings and device, one after the other (issues 22 and 43).

    git clone https://github.com/OpenGVLab/EfficientQAT /path/EfficientQAT   # any checkout; none enters this repo
    OMP_NUM_THREADS=2 python bench/official_blockap.py --official /path/EfficientQAT --bits 2 --work runs/official
    python bench/official_blockap.py --official /path/EfficientQAT --device cuda --shape llama-2-7b --layers 4
    python bench/official_blockap.py --official /path/EfficientQAT --device cuda --shape llama-2-70b --layers 1

The model: the bundled SmolLM2-135M, or with --shape a random-weight model of a real model's shape
(bench/synthetic_models.py; --layers keeps its first blocks: tokens per second per block need not train
all 80). Ours: the real command line (`launch/run.py --phase block-ap`, no evaluation; --single-gpu on a
GPU). The official: its `block_ap()` called on our calibration windows, timed from the call to its
return (its set-up of the first block's input included, as ours includes embedding them); its training
time is read from its own log line per block and epoch.

Each in its own mode: on a GPU the official code runs as it is (float16 activation stores, float16
autocast, a GradScaler), ours in bfloat16 autocast; on a CPU both train in float32, and the official
code needs a few things from here:
- every decoder layer is wrapped so that its call `layer(x, attention_mask=..., position_ids=...)[0]`
  reaches a transformers 5 layer (which takes the rotary position embeddings and returns a tensor), on
  every device;
- (CPU only) its activation datasets hold float32 and `half()` of a finished layer does nothing: it
  hard-codes float16, and float16 matmuls on a CPU are emulated (many times slower);
  `torch.cuda.max_memory_allocated` answers 0; `termcolor` (its logger's colours) is stubbed when missing.
Equal work: the same windows, epochs, batch, learning rates; it does not clip gradients (the official
code parses `--max_grad_norm` and never applies it) and does not evaluate the loss before training;
ours does both, as in every run. On a GPU the GPU's utilisation is sampled every 0.2 s during each
(nvidia-smi), and each one's peak GPU memory reported.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LRS = {2: (2e-2, 2e-3), 3: (5e-3, 5e-4), 4: (1e-4, 1e-5)}  # the paper's Block-AP learning rates (quant, weight)


class GpuSampler:
    """The GPU's utilisation every 0.2 s while it runs (nvidia-smi; nothing on a CPU)."""

    def __init__(self, device: str):
        self.samples: list[int] = []
        self.proc = None
        if device == "cuda":
            try:
                self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                              "-i", "0", "-lms", "200"], stdout=subprocess.PIPE, text=True)
            except OSError:
                return
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def stop(self) -> dict:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
        if not self.samples:
            return {}
        ordered = sorted(self.samples)
        return {"gpu_util_mean": sum(ordered) / len(ordered), "gpu_util_median": ordered[len(ordered) // 2],
                "gpu_util_idle_share": sum(u < 10 for u in ordered) / len(ordered), "gpu_util_samples": len(ordered)}


def model_folder(a) -> str:
    """The bundled model, or a random-weight model of --shape (its first --layers blocks) in the work folder."""
    if not a.shape:
        return a.model
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic_models import shaped_model
    folder = a.work / f"{a.shape}-{a.layers or 'all'}layers"
    return str(shaped_model(folder, a.shape, tokenizer_from=a.model, layers=a.layers, device=a.device))


def ours(a, bits: int, work: Path, model: str) -> dict:
    out = work / f"ours-{a.device}-{Path(model).name}-w{bits}{a.ours_flags.replace(' ', '').replace('--', '-')}"
    sampler = None
    if not (out / "results.json").exists():
        qlr, wlr = LRS[bits]
        cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "--model", model, "--wbits", str(bits),
               "--group-size", str(a.group_size), "--phase", "block-ap", "--train-size", str(a.train_size),
               "--val-size", str(a.val_size), "--seqlen", str(a.seqlen), "--epochs", str(a.epochs),
               "--batch-size", str(a.batch_size), "--quant-lr", str(qlr), "--weight-lr", str(wlr), "--seed", "0",
               "--eval-datasets", "", "--zeroshot-tasks", "", "--skip-fp-eval", "--no-tensorboard",
               "--output", str(out), "--overwrite", "--discard-unfinished", "--recipe", "paper",  # the official code's method
               *(["--single-gpu"] if a.device == "cuda" else []), *a.ours_flags.split()]
        sampler = GpuSampler(a.device)
        with open(out.with_suffix(".log"), "w") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    r = json.loads((out / "results.json").read_text())
    blocks = r["blocks"]
    training_s = sum(b["seconds"] for b in blocks)
    report = {"wall_s": r["blockap_wall_s"], "blocks": len(blocks), "training_s": training_s,
              "peak_gpu_gib": max(b["peak_mem_mib"] for b in blocks) / 1024 if a.device == "cuda" else None}
    return report | (sampler.stop() if sampler else {})


class EpochTimes(logging.Handler):
    """The official code's per block and epoch log line ('blocks 3 epoch 0 recon_loss:... time 12.3 ')."""

    LINE = re.compile(r"blocks (\d+) epoch (\d+) .* time ([0-9.]+)")

    def __init__(self):
        super().__init__()
        self.seconds: dict[tuple[int, int], float] = {}

    def emit(self, record):
        found = self.LINE.search(record.getMessage())
        if found:
            self.seconds[(int(found[1]), int(found[2]))] = float(found[3])


def official(a, bits: int, model_dir: str) -> dict:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eqat_dist.data.windows import calibration_windows
    from eqat_dist.models.loading import BUNDLED, bundled_model_dir

    if "termcolor" not in sys.modules:
        try:
            import termcolor  # noqa: F401
        except ImportError:
            sys.modules["termcolor"] = types.SimpleNamespace(colored=lambda text, *args, **kw: text)
    sys.path.insert(0, str(a.official))
    import quantize.block_ap as official_block_ap

    on_gpu = a.device == "cuda"
    if not on_gpu:  # its float16 stores and half() would be emulated on a CPU; see the docstring
        class Float32Dataset(official_block_ap.BlockTrainDataset):
            def __init__(self, size, seqlen, hidden_size, batch_size, dtype, **kw):
                super().__init__(size, seqlen, hidden_size, batch_size, torch.float32, **kw)

        official_block_ap.BlockTrainDataset = Float32Dataset
        torch.cuda.max_memory_allocated = lambda *args, **kw: 0
        nn.Module.half = lambda self: self

    class OfficialCall(nn.Module):
        """The official code's call of a decoder layer, on a transformers 5 layer, on the layer's device."""

        def __init__(self, layer, rotary):
            super().__init__()
            self.layer, self.rotary = layer, [rotary]  # a list: not a submodule (nothing of it is quantized)

        def forward(self, x, attention_mask=None, position_ids=None, **kw):
            if position_ids is None:
                position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            rotary = self.rotary[0].to(x.device)  # the official code moves the model's rotary back to the CPU
            out = self.layer(x, attention_mask=attention_mask, position_ids=position_ids.to(x.device),
                             position_embeddings=rotary(x, position_ids.to(x.device)))
            return (out[0] if isinstance(out, tuple) else out,)

    folder = bundled_model_dir(model_dir) if model_dir in BUNDLED else model_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # as its main_block_ap.py loads a model: float16 on the CPU, the layers moved to the GPU one at a time
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16 if on_gpu else torch.float32)
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = OfficialCall(layers[i], model.model.rotary_emb)
    train_ids, val_ids = calibration_windows(tokenizer, "boolq", a.seqlen, a.train_size, a.val_size, 0)
    loader = lambda ids: [(row.unsqueeze(0), row.unsqueeze(0)) for row in ids]  # noqa: E731
    qlr, wlr = LRS[bits]
    args = argparse.Namespace(train_size=a.train_size, val_size=a.val_size, training_seqlen=a.seqlen,
                              batch_size=a.batch_size, off_load_to_disk=False, cache_dir=None, wbits=bits,
                              group_size=a.group_size, epochs=a.epochs, quant_lr=qlr, weight_lr=wlr,
                              min_lr_factor=20, wd=0, early_stop=0, real_quant=False)
    logger = logging.getLogger("official")
    epochs = EpochTimes()
    logger.addHandler(epochs)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    sampler = GpuSampler(a.device)
    t0 = time.time()
    official_block_ap.block_ap(model, args, loader(train_ids), loader(val_ids), logger=logger)
    wall = time.time() - t0
    report = {"wall_s": wall, "blocks": len(layers), "training_s": sum(epochs.seconds.values()) or None,
              "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None}
    logger.removeHandler(epochs)
    return report | sampler.stop()


def row(name: str, a, r: dict) -> str:
    """One line of the table: tokens per second per block, over its training and over its whole wall."""
    tokens = a.train_size * a.seqlen * a.epochs * r["blocks"]  # trained on, over every block
    training = f"{tokens / r['training_s']:.0f}" if r.get("training_s") else "?"
    util = (f"{r['gpu_util_mean']:.0f}% mean, {r['gpu_util_median']}% median, {100 * r['gpu_util_idle_share']:.0f}% "
            f"of samples under 10%" if "gpu_util_mean" in r else "")
    peak = f"{r['peak_gpu_gib']:.1f} GiB" if r.get("peak_gpu_gib") is not None else ""
    return (f"| {name} | {r['wall_s']:.1f} s ({r['wall_s'] / r['blocks']:.2f} s a block) | {training} | "
            f"{tokens / r['wall_s']:.0f} | {util} | {peak} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, help="a checkout of OpenGVLab/EfficientQAT")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="smollm2-135m", help="a bundled model or a folder (and --shape's tokenizer)")
    p.add_argument("--shape", help="a random-weight model of this shape instead (llama-2-7b, llama-2-70b, ...)")
    p.add_argument("--layers", type=int, help="with --shape: keep its first N blocks")
    p.add_argument("--bits", type=int, default=2, choices=sorted(LRS))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--train-size", type=int, help="windows (default 64; the paper's 4096 costs hours at 7B)")
    p.add_argument("--val-size", type=int, help="validation windows (default: 64 on a CPU, 16 on a GPU)")
    p.add_argument("--seqlen", type=int, help="tokens a window (default: 256 on a CPU, the paper's 2048 on a GPU)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, help="windows a step (default: 4 on a CPU, the paper's 2 on a GPU)")
    p.add_argument("--which", choices=["both", "ours", "official"], default="both")
    p.add_argument("--work", type=Path, default=Path("runs/official"))
    p.add_argument("--ours-flags", default="", help="more flags for our run, e.g. '--compile'")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    a.train_size = a.train_size or 64
    a.val_size = a.val_size if a.val_size is not None else (16 if gpu else 64)
    a.seqlen = a.seqlen or (2048 if gpu else 256)
    a.batch_size = a.batch_size or (2 if gpu else 4)
    if a.which != "ours" and not (a.official and (a.official / "quantize" / "block_ap.py").exists()):
        p.error(f"--official {a.official} is not a checkout of OpenGVLab/EfficientQAT (no quantize/block_ap.py); "
                "clone it and give its path, or run --which ours")
    if gpu:
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device on this machine")
    a.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = model_folder(a)
    print(f"Block-AP w{a.bits}g{a.group_size} on {a.device}, {Path(model).name}: {a.train_size} + {a.val_size} windows "
          f"x {a.seqlen} tokens, {a.epochs} epochs, batch {a.batch_size}", flush=True)
    header = ["| | Block-AP wall | training tokens/s a block | wall tokens/s a block | GPU utilisation | peak GPU memory |",
              "|---|---|---|---|---|---|"]
    results = {}
    if a.which in ("both", "official"):
        results["official"] = official(a, a.bits, model)
        print(row("official (quantize/block_ap.py)", a, results["official"]), flush=True)
    if a.which in ("both", "ours"):
        results["ours"] = ours(a, a.bits, a.work, model)
        print(row("ours (launch/run.py --phase block-ap)", a, results["ours"]), flush=True)
    print("\n" + "\n".join(header + [row(k, a, v) for k, v in results.items()]))
    if len(results) == 2:
        wall = results["official"]["wall_s"] / results["ours"]["wall_s"]
        both = [results[k].get("training_s") for k in ("official", "ours")]
        training = f"; training alone {both[0] / both[1]:.2f}x" if all(both) else ""
        print(f"ours / official throughput: {wall:.2f}x on the wall{training}")
    print(json.dumps({"bits": a.bits, "device": a.device, "model": Path(model).name, **results}))


if __name__ == "__main__":
    main()
