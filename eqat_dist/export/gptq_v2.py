"""The GPTQ v2 format: config.json with `quantization_config` (gptq, asymmetric, no act-order,
checkpoint_format gptq_v2), safetensors with per-layer qweight / qzeros / scales (fp16) / g_idx, and the
tokenizer. GPTQModel, transformers and vLLM load it as written.

`GPTQv2` writes it (the export interface of formats.py: a packed run's blocks one at a time, an E2E-QP
result block by block from the checkpoint it started from, or a whole model in memory, all through
shards.write_model_files); `load_packed_model` reads it back.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from .. import __version__
from ..models.family import blocks_name, decoder_layers, missing_is_tied_head, ties_head, without_tied_head
from ..models.quantize import packed_linears, packed_skeleton
from ..quant import QuantConfig
from ..utils.tensors import CheckpointError, LazyTensors  # noqa: F401  (re-exported)
from .shards import write_model_files
from .staging import new_stage, publish

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
    if cfg.format_grid is not None:  # trained on a serving format's own grid (zero points fixed, scales signed)
        meta["grid"] = cfg.grid
    return {
        "quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size, "sym": False,
        "desc_act": False, "lm_head": False, "checkpoint_format": "gptq_v2", "format": "gptq_v2",
        "pack_dtype": "int32", "meta": meta,
    }


def g_idx(layer) -> torch.Tensor:
    """Group of each input column: in order (no act-order)."""
    group = layer.cfg.effective_group(layer.in_features)
    return (torch.arange(layer.in_features) // group).to(torch.int32)


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Scales in float16, integers as they are, other floats (norms, biases, embeddings) in `dtype`."""
    if key.endswith(".scales"):
        return value.to(EXPORT_DTYPE)
    if dtype is None or not value.is_floating_point():
        return value
    return value.to(dtype)


def _copy_if_there(path: Path, folder: Path) -> None:
    if path.exists():
        shutil.copy2(path, folder / path.name)


class GPTQv2:
    """Writer of the GPTQ v2 format (formats.py: the export interface)."""
    name = "gptq_v2"

    def block_tensors(self, block: torch.nn.Module, prefix: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """A packed block's tensors as the export holds them, with g_idx added."""
        out = {prefix + k: _cast(k, v.detach().cpu(), dtype).contiguous() for k, v in block.state_dict().items()}
        for name, layer in packed_linears(block).items():
            out[f"{prefix}{name}.g_idx"] = g_idx(layer)
        return out

    def _files(self, folder: Path, shell: dict, blocks, num_blocks: int, config: dict, cfg: QuantConfig,
               method: str | None, tokenizer, save_generation_config, single_file: bool = False) -> Path:
        config = dict(config)
        config.pop("quantization_config", None)
        config["quantization_config"] = quantization_config(cfg, method)
        # vLLM's gptq config and AutoGPTQ-era tools read quantize_config.json
        return write_model_files(folder, shell, blocks, num_blocks, config,
                                 {"quantize_config.json": quantization_config(cfg, method)}, tokenizer,
                                 save_generation_config, single_file)

    def write_blocks(self, source, blocks: Iterable[tuple[int, torch.nn.Module]], tokenizer,
                     folder: str | os.PathLike, cfg: QuantConfig, method: str,
                     dtype: torch.dtype = torch.float16) -> Path:
        """Export `source` (a LazyModel: its shell and config) into the new or empty `folder` (a stage),
        with the packed blocks `blocks` yields, in order; each is written and dropped before the next."""
        shell = without_tied_head({k: v.detach().cpu().to(dtype).contiguous()
                                   for k, v in source.model.state_dict().items()
                                   if not k.startswith(source.prefix + ".")}, source.config)
        tensors = ((i, self.block_tensors(block, f"{source.prefix}.{i}.", dtype)) for i, block in blocks)
        config = source.config.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")
        generation = getattr(source.model, "generation_config", None)
        return self._files(Path(folder), shell, tensors, source.num_blocks, config, cfg, method, tokenizer,
                           lambda dst: generation.save_pretrained(dst) if generation is not None else None)

    def write_retrained(self, start: str | os.PathLike, gathered: Iterable[tuple[int, dict[str, torch.Tensor]]],
                        blocks_prefix: str, tokenizer, folder: str | os.PathLike, method: str,
                        dtype: torch.dtype = torch.float16) -> dict:
        """Export an E2E-QP result: the export `start` it was trained from, with each block's scales
        replaced by the trained ones. `gathered` yields (block index, its parameters) one block at a
        time (e2e/ds_setup.gathered_blocks), so the trained model is never whole anywhere. Returns the
        self-checks for results.json: integer tensors unchanged, scales changed."""
        start = Path(start)
        old = LazyTensors(start)
        config = json.loads((start / "config.json").read_text())
        prefix = blocks_prefix + "."
        shell = {k: _cast(k, old[k], dtype) for k in old if not k.startswith(prefix)}
        checks = {"integers_unchanged": True, "scales_changed": 0}

        def blocks():
            for i, trained in gathered:
                own = f"{prefix}{i}."
                tensors = {k: _cast(k, old[k], dtype) for k in old if k.startswith(own)}
                for name, value in trained.items():
                    key = own + name
                    if key not in tensors:
                        raise KeyError(f"{start} has no tensor {key}: the trained model does not match it")
                    if name.endswith(".scales"):
                        new = value.to(EXPORT_DTYPE)
                        checks["scales_changed"] += not torch.equal(new, tensors[key])
                        tensors[key] = new.contiguous()
                    elif not value.is_floating_point():
                        checks["integers_unchanged"] &= torch.equal(value, tensors[key])
                yield i, tensors

        config["dtype"] = str(dtype).removeprefix("torch.")
        self._files(Path(folder), shell, blocks(), config["num_hidden_layers"], config, read_quant_config(start),
                    method, tokenizer, lambda dst: _copy_if_there(start / "generation_config.json", dst))
        return checks

    def write_model(self, model, tokenizer, out_dir: str | os.PathLike, cfg: QuantConfig,
                    method: str | None = None) -> Path:
        """A whole model in memory (its blocks' linears already PackedLinear) as one model.safetensors,
        staged and moved in (export/staging.py); tensors keep their dtypes but for fp16 scales."""
        out_dir = Path(out_dir)
        stage = new_stage(out_dir)
        prefix = blocks_name(model)
        shell = without_tied_head({k: v.detach().cpu() for k, v in model.state_dict().items()
                                   if not k.startswith(prefix + ".")}, model.config)
        blocks = ((i, self.block_tensors(block, f"{prefix}.{i}.", None)) for i, block in enumerate(decoder_layers(model)))
        config = json.loads(model.config.to_json_string(use_diff=True))  # as save_pretrained writes it
        config["architectures"] = [type(model).__name__]
        config["dtype"] = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")
        generation = getattr(model, "generation_config", None) if model.can_generate() else None
        self._files(stage, shell, blocks, len(decoder_layers(model)), config, cfg, method, tokenizer,
                    lambda dst: generation.save_pretrained(dst) if generation is not None else None, single_file=True)
        return publish(stage, out_dir)

    def method_after_e2e(self, path: str | os.PathLike) -> str:
        """The `meta.method` of an E2E-QP export trained from the export in `path`."""
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config", {})
        return "block-ap+e2e-qp" if qc.get("meta", {}).get("method", "").startswith("block-ap") else "e2e-qp"


def save_packed_model(model, tokenizer, out_dir: str | os.PathLike, cfg: QuantConfig, method: str | None = None) -> Path:
    """A whole packed model as a GPTQ-v2 folder, atomically; `method` (a key of METHODS) goes in `meta`."""
    return GPTQv2().write_model(model, tokenizer, out_dir, cfg, method)


def method_after_e2e(path: str | os.PathLike) -> str:
    return GPTQv2().method_after_e2e(path)


def export_method(path: str | os.PathLike) -> str | None:
    """What made the export in `path` (a key of METHODS: rtn, block-ap, block-ap+e2e-qp, e2e-qp), None
    for an export that does not say (another tool's)."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config", {})
    except (OSError, ValueError):
        return None
    method = qc.get("meta", {}).get("method")
    return method if method in METHODS else None


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
    return QuantConfig(qc["bits"], qc["group_size"], grid=qc.get("meta", {}).get("grid", "asym"))


def load_packed_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model with PackedLinear blocks, tokenizer) from a GPTQ-v2 folder this module wrote."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models.lazy import empty_block, model_shell

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    cfg = read_quant_config(path, config)
    del config.quantization_config
    # built block by block with empty weights (a whole float model built first would need 4 bytes a
    # weight and a random initialisation: minutes and 280 GB at 70B), each block's linears packed
    model, layers, prefix = model_shell(config, dtype)
    for i in range(len(layers)):
        layers[i] = packed_skeleton(empty_block(layers, i, config, dtype), cfg, dtype)
    state = dict(LazyTensors(path))
    for i, block in enumerate(layers):
        for name, layer in packed_linears(block).items():
            found = state.pop(f"{prefix}.{i}.{name}.g_idx", None)
            if found is not None and not torch.equal(found.to(torch.int32), g_idx(layer)):
                raise CheckpointError(f"{path}: layer {prefix}.{i}.{name} uses a reordered g_idx (act-order), "
                                      "which is not supported.")
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not missing_is_tied_head(k, config)]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}.")
    if ties_head(config):
        model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(path)
