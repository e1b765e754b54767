"""The official EfficientQAT Block-AP (OpenGVLab/EfficientQAT, quantize/block_ap.py) on the same windows
and settings as ours, on this machine's CPU, one after the other (issue 22, part 4).

    git clone https://github.com/OpenGVLab/EfficientQAT /path/EfficientQAT   # any checkout
    OMP_NUM_THREADS=2 python bench/official_blockap.py --official /path/EfficientQAT --bits 2 --work runs/official

Ours: the real command line (`launch/run.py --phase block-ap`, no evaluation), its Block-AP wall time.
The official: its `block_ap()` called on SmolLM2-135M with our calibration windows, timed from the call
to its return (its set-up of the first block's input included, as ours includes embedding them). It runs
unchanged but for what a CPU and today's transformers need, all done from here:
- every decoder layer is wrapped so that its call `layer(x, attention_mask=..., position_ids=...)[0]`
  reaches a transformers 5 layer (which takes the rotary position embeddings and returns a tensor);
- its activation datasets hold float32 and `half()` of a finished layer does nothing: it hard-codes
  float16 for GPUs, and float16 matmuls on a CPU are emulated (many times slower); ours runs in float32
  on a CPU as well. `torch.cuda.amp.autocast` is off on a CPU (its own code), so both train in float32;
- `torch.cuda.max_memory_allocated` (in its log line) answers 0; `termcolor` (its logger's colours) is
  stubbed when missing.
Equal work: the same windows, epochs, batch, learning rates; it does not clip gradients (the official
code parses `--max_grad_norm` and never applies it) and does not evaluate the loss before training;
ours does both, as in every run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LRS = {2: (2e-2, 2e-3), 3: (5e-3, 5e-4), 4: (1e-4, 1e-5)}


def ours(a, bits: int, work: Path) -> float:
    out = work / f"ours-w{bits}{a.ours_flags.replace(' ', '').replace('--', '-')}"
    if not (out / "results.json").exists():
        qlr, wlr = LRS[bits]
        cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "--model", "smollm2-135m", "--wbits", str(bits),
               "--group-size", str(a.group_size), "--phase", "block-ap", "--train-size", str(a.train_size),
               "--val-size", str(a.val_size), "--seqlen", str(a.seqlen), "--epochs", str(a.epochs),
               "--batch-size", str(a.batch_size), "--quant-lr", str(qlr), "--weight-lr", str(wlr), "--seed", "0",
               "--eval-datasets", "", "--zeroshot-tasks", "", "--skip-fp-eval", "--no-tensorboard",
               "--output", str(out), "--overwrite", "--discard-unfinished", "--recipe", "paper", *a.ours_flags.split()]  # the official code's method
        with open(out.with_suffix(".log"), "w") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return json.loads((out / "results.json").read_text())["blockap_wall_s"]


def official(a, bits: int) -> float:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eqat_dist.data.windows import calibration_windows
    from eqat_dist.models.loading import bundled_model_dir

    if "termcolor" not in sys.modules:
        try:
            import termcolor  # noqa: F401
        except ImportError:
            sys.modules["termcolor"] = types.SimpleNamespace(colored=lambda text, *args, **kw: text)
    sys.path.insert(0, str(a.official))
    import quantize.block_ap as official_block_ap

    class Float32Dataset(official_block_ap.BlockTrainDataset):
        def __init__(self, size, seqlen, hidden_size, batch_size, dtype, **kw):
            super().__init__(size, seqlen, hidden_size, batch_size, torch.float32, **kw)

    official_block_ap.BlockTrainDataset = Float32Dataset
    torch.cuda.max_memory_allocated = lambda *args, **kw: 0
    nn.Module.half = lambda self: self

    class OfficialCall(nn.Module):
        """The official code's call of a decoder layer, on a transformers 5 layer."""

        def __init__(self, layer, rotary):
            super().__init__()
            self.layer, self.rotary = layer, [rotary]  # a list: not a submodule (nothing of it is quantized)

        def forward(self, x, attention_mask=None, position_ids=None, **kw):
            if position_ids is None:
                position_ids = torch.arange(x.shape[1]).unsqueeze(0)
            out = self.layer(x, attention_mask=attention_mask, position_ids=position_ids,
                             position_embeddings=self.rotary[0](x, position_ids))
            return (out[0] if isinstance(out, tuple) else out,)

    folder = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
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
    t0 = time.time()
    official_block_ap.block_ap(model, args, loader(train_ids), loader(val_ids), logger=logger)
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, help="a checkout of OpenGVLab/EfficientQAT")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--val-size", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--which", choices=["both", "ours", "official"], default="both")
    p.add_argument("--work", type=Path, default=Path("runs/official"))
    p.add_argument("--ours-flags", default="", help="more flags for our run, e.g. '--compile'")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    times = {}
    if a.which in ("both", "official"):
        times["official"] = official(a, a.bits)
        print(f"[official] Block-AP w{a.bits}g{a.group_size}: {times['official']:.1f} s", flush=True)
    if a.which in ("both", "ours"):
        times["ours"] = ours(a, a.bits, a.work)
        print(f"[ours] Block-AP w{a.bits}g{a.group_size}: {times['ours']:.1f} s", flush=True)
    if len(times) == 2:
        print(f"ours / official throughput: {times['official'] / times['ours']:.2f}x")
    print(json.dumps({"bits": a.bits, **times}))


if __name__ == "__main__":
    main()
