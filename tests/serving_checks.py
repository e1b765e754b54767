"""Reading our serving-format exports with each format's own library (none of our code decodes):
shared by tests/test_serving_formats.py (tiny models) and tests/test_interop.py (the bundled model's runs).
`source` is the GPTQ v2 export the format was converted from; our side is only its decoded grid."""
import json
from pathlib import Path

import torch

from eqat_dist.export.packed_source import PackedExport


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return tensors


def check_compressed_tensors(source: Path, folder: Path) -> int:
    """compressed-tensors' config model parses the config, and its decompressor gives our weights bit for
    bit ((q - z) * s in fp16) and our biases; returns the layers checked."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    ours = PackedExport(source)
    assert (scheme.weights.num_bits, scheme.weights.symmetric, qc.format) == (ours.quant.bits, False, "pack-quantized")
    decompressor = BaseCompressor.get_value_from_registry(qc.format)
    theirs = read_safetensors(folder)
    checked = 0
    for i in range(ours.num_blocks):
        for name, layer in ours.block(i)[0].items():
            key = f"{ours.prefix}.{i}.{name}"
            parts = {p: theirs[f"{key}.{p}"] for p in ("weight_packed", "weight_scale", "weight_zero_point",
                                                       "weight_shape")}
            weight = decompressor.decompress(parts, scheme)["weight"]
            assert torch.equal(weight, layer.dequantized().half()), key
            if layer.bias is not None:
                assert torch.equal(theirs[f"{key}.bias"], layer.bias)
            checked += 1
    return checked


def _m_rounding(layer) -> torch.Tensor:
    """What Q4_1's fp16 m = -z * s may be off by, per weight (half an fp16 ulp of |z * s|, at most)."""
    return (layer.zeros.float() * layer.scales.float()).abs().repeat_interleave(layer.group, 1) * 2**-11 + 1e-7


def check_gguf(source: Path, file: Path):
    """The `gguf` package's Q4_1 dequantizer on a layer llama.cpp keeps in row order, then transformers'
    GGUF loader (which undoes llama.cpp's q/k row order) on every layer: our weights within the fp16
    rounding of m; biases exact. Returns transformers' model."""
    import gguf
    from transformers import AutoModelForCausalLM

    ours = PackedExport(source)
    tensors = {t.name: t for t in gguf.GGUFReader(file).tensors}
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.Q4_1
    layer = ours.block(0)[0]["mlp.down_proj"]
    got = torch.from_numpy(gguf.quants.dequantize(down.data, down.tensor_type).copy())
    assert ((got - layer.dequantized()).abs() <= _m_rounding(layer)).all()
    theirs = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    state = theirs.state_dict()
    for i in range(ours.num_blocks):
        for name, layer in ours.block(i)[0].items():
            weight = state[f"{ours.prefix}.{i}.{name}.weight"]
            assert ((weight - layer.dequantized()).abs() <= _m_rounding(layer)).all(), (i, name)
            if layer.bias is not None:
                assert torch.equal(state[f"{ours.prefix}.{i}.{name}.bias"], layer.bias.float())
    return theirs
