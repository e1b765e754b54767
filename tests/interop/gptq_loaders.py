"""Load eqat-dist exports with the standard GPTQ and AWQ loaders and report how their logits differ from ours.

Runs in a separate virtual environment set up as a GPTQModel user has it (gptqmodel + optimum beside
torch; see tests/test_interop.py), not in eqat-dist's own, and imports nothing from eqat-dist.

    python gptq_loaders.py REFERENCE.safetensors EXPORT_DIR [EXPORT_DIR ...]

REFERENCE holds `input_ids` and, per export i, `logits_i`: what eqat-dist's own loader computes in
float32 (and for an AWQ export `weight_i:NAME`: block 0's de-quantized weights in fp16). Prints one JSON
object: {export: {loader: {"max_abs": .., "rel_max": .., "rel_l2": ..}}}.
"""
import collections
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def _errors(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (logits.float() - reference).abs()
    return {"max_abs": diff.max().item(), "rel_max": (diff.max() / reference.abs().max()).item(),
            "rel_l2": ((logits.float() - reference).norm() / reference.norm()).item(),
            "top1_agree": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()}


@torch.no_grad()
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits


def _upcast_scales(model) -> None:
    """transformers refuses `.float()` on a quantized model; its GPTQ layers keep fp16 scales."""
    for module in model.modules():
        if isinstance(getattr(module, "scales", None), torch.Tensor):
            module.scales = module.scales.float()


def _kernel(model) -> str:
    return type(model.model.layers[0].self_attn.q_proj).__name__


def awq(folder: str, i: int, reference: dict, ids: torch.Tensor) -> dict:
    """GPTQModel's AWQ decoder on the file's tensors (exact weights), its torch AWQ kernel, and
    transformers as a user gets it."""
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ref = reference[f"logits_{i}"]
    qc = json.load(open(f"{folder}/config.json"))["quantization_config"]
    index_file = Path(folder) / "model.safetensors.index.json"  # several shards, else one model.safetensors
    index = json.loads(index_file.read_text())["weight_map"] if index_file.exists() else \
        collections.defaultdict(lambda: "model.safetensors")
    exact = []
    for key in (k for k in reference if k.startswith(f"weight_{i}:")):
        name = key.split(":", 1)[1]
        with safe_open(f"{folder}/{index[name + '.qweight']}", "pt") as f:
            weight = dequantize_gemm(f.get_tensor(name + ".qweight"), f.get_tensor(name + ".qzeros"),
                                     f.get_tensor(name + ".scales"), qc["bits"], qc["group_size"])
        exact.append(torch.equal(weight.t(), reference[key]))
    entry = {"decoded_weights_equal": bool(exact) and all(exact), "decoded_layers": len(exact)}
    gq = GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH_AWQ, dtype=torch.float16)
    gq.model.float()  # its AWQ kernel still computes in fp16
    entry["gptqmodel"] = _errors(_logits(gq.model, ids), ref) | {"kernel": _kernel(gq.model)}
    del gq
    hf = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16)
    entry["transformers"] = _errors(_logits(hf, ids), ref) | {"kernel": _kernel(hf)}
    return entry


def main(reference_file: str, exports: list[str]) -> dict:
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    reference = load_file(reference_file)
    ids = reference["input_ids"]
    report = {}
    for i, folder in enumerate(exports):
        ref = reference[f"logits_{i}"]
        if json.load(open(f"{folder}/config.json"))["quantization_config"]["quant_method"] == "awq":
            report[folder] = awq(folder, i, reference, ids)
            continue
        # GPTQModel's torch kernel computes in fp16/bf16 only: load in fp16, then upcast the model.
        gq = GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        gq.model.float()
        entry = {"gptqmodel": _errors(_logits(gq.model, ids), ref)}
        del gq
        # As a user gets it: the kernel transformers picks (at 4 bits on CPU a bf16 aten kernel), fp16 scales.
        hf = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
        entry["transformers"] = _errors(_logits(hf, ids), ref) | {"kernel": _kernel(hf)}
        del hf
        # The same loader asked for its torch kernel, scales upcast: must be our float32 result.
        bits = json.load(open(f"{folder}/config.json"))["quantization_config"]["bits"]
        hf = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32,
                                                  quantization_config=GPTQConfig(bits=bits, backend="torch"))
        _upcast_scales(hf)
        entry["transformers_torch_fp32"] = _errors(_logits(hf, ids), ref) | {"kernel": _kernel(hf)}
        del hf
        report[folder] = entry
    return report


if __name__ == "__main__":
    torch.set_num_threads(2)
    print("INTEROP " + json.dumps(main(sys.argv[1], sys.argv[2:])))
