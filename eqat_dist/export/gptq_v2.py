"""Save and load a quantized model as a Hugging Face folder in the GPTQ v2 format:
config.json with `quantization_config` (gptq, asymmetric, no act-order, checkpoint_format gptq_v2),
safetensors with per-layer qweight / qzeros / scales (fp16) / g_idx, and the tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import __version__
from ..models.blocks import blocks_name, decoder_layers
from ..models.quantize import packed_linears, packed_skeleton
from ..quant import QuantConfig
from .staging import new_stage, publish
from ..utils.tensors import CheckpointError, LazyTensors  # noqa: F401  (re-exported)

EXPORT_DTYPE = torch.float16  # GPTQ kernels expect fp16 scales


METHODS = {"rtn": "round-to-nearest (min/max initialisation)", "block-ap": "EfficientQAT Block-AP",
           "block-ap+e2e-qp": "EfficientQAT Block-AP + E2E-QP", "e2e-qp": "EfficientQAT E2E-QP"}


def quantization_config(cfg: QuantConfig, method: str | None = None) -> dict:
    """The fields GPTQModel writes for an asymmetric gptq_v2 checkpoint, each valid for the GPTQ config
    parsers of GPTQModel, transformers and vLLM. No `damp_percent`: it describes GPTQ's Hessian damping,
    which EfficientQAT does not use, and both parsers refuse 0 (the only honest value). What made the
    checkpoint goes under `meta`, where loaders ignore it."""
    meta = {"quantizer": [f"eqat-dist:{__version__}"]}
    if method is not None:
        meta |= {"method": method, "method_detail": METHODS[method]}
    return {
        "quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size, "sym": False,
        "desc_act": False, "lm_head": False, "checkpoint_format": "gptq_v2", "format": "gptq_v2",
        "pack_dtype": "int32", "meta": meta,
    }


def _g_idx(layer) -> torch.Tensor:
    group = layer.cfg.effective_group(layer.in_features)
    return (torch.arange(layer.in_features) // group).to(torch.int32)


def save_packed_model(model, tokenizer, out_dir: str | os.PathLike, cfg: QuantConfig,
                      method: str | None = None) -> Path:
    """Write the model (its blocks' linears already PackedLinear) as an HF GPTQ-v2 folder, atomically;
    `method` (a key of METHODS) is recorded in the config's `meta`."""
    out_dir = Path(out_dir)
    tmp = new_stage(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for i, block in enumerate(decoder_layers(model)):
        prefix = _block_prefix(model, i)
        for name, layer in packed_linears(block).items():
            state[f"{prefix}{name}.scales"] = state[f"{prefix}{name}.scales"].to(EXPORT_DTYPE)
            state[f"{prefix}{name}.g_idx"] = _g_idx(layer)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    model.save_pretrained(tmp, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["quantization_config"] = quantization_config(cfg, method)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    # vLLM's gptq config and AutoGPTQ-era tools read this file
    (tmp / "quantize_config.json").write_text(json.dumps(quantization_config(cfg, method), indent=2))
    return publish(tmp, out_dir)


def _block_prefix(model, index: int) -> str:
    return f"{blocks_name(model)}.{index}."


def _read_state(path: Path) -> dict:
    return dict(LazyTensors(path))


def read_quant_config(path: str | os.PathLike, config=None) -> QuantConfig:
    """The bit width and group size of the packed checkpoint in `path` (its quantization_config)."""
    from transformers import AutoConfig

    config = config or AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise CheckpointError(f"{path}: config.json has no quantization_config; not a packed checkpoint.")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("checkpoint_format") != "gptq_v2" or qc.get("sym") or qc.get("desc_act"):
        raise CheckpointError(f"{path}: only asymmetric GPTQ v2 checkpoints without act-order are supported.")
    return QuantConfig(qc["bits"], qc["group_size"])


def method_after_e2e(path: str | os.PathLike) -> str:
    """The `meta.method` of an E2E-QP export trained from the packed checkpoint in `path`."""
    qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config", {})
    return "block-ap+e2e-qp" if qc.get("meta", {}).get("method", "").startswith("block-ap") else "e2e-qp"


def load_packed_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model with PackedLinear blocks, tokenizer) from a folder written by `save_packed_model`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    cfg = read_quant_config(path, config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for block in decoder_layers(model):
        packed_skeleton(block, cfg, dtype)
    state = _read_state(path)
    for i, block in enumerate(decoder_layers(model)):
        prefix = _block_prefix(model, i)
        for name, layer in packed_linears(block).items():
            g_idx = state.pop(f"{prefix}{name}.g_idx", None)
            if g_idx is not None and not torch.equal(g_idx.to(torch.int32), _g_idx(layer)):
                raise CheckpointError(f"{path}: layer {prefix}{name} uses a reordered g_idx (act-order), "
                                      "which is not supported.")
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(path)
