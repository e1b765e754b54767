"""Random-weight models of a real model's shape, for speed and memory benchmarks on a GPU.

Their weights are random, so only their speed and memory mean anything. They borrow a tokenizer (a bundled
model's, or any folder with one) so that our runs and the official code read the same windows.

    shaped_model(folder, "llama-2-7b", tokenizer_from="smollm2-135m", layers=4)        # 4 blocks of Llama-2-7B
    shaped_model(folder, (8192, 28672, 64, 8), tokenizer_from="smollm2-135m", layers=1)  # one 70B-shaped block
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shape_of(name_or_shape) -> dict:
    """A LlamaConfig's size fields from a planning config's name (eqat_dist/planning/configs) or from
    (hidden, intermediate, heads, kv_heads)."""
    if isinstance(name_or_shape, str):
        from eqat_dist.planning.arch import CONFIGS, PLANNING_MODELS
        if name_or_shape not in PLANNING_MODELS:
            raise SystemExit(f"unknown model shape '{name_or_shape}'; choose from {', '.join(PLANNING_MODELS)}")
        config = json.loads((CONFIGS / f"{name_or_shape}.json").read_text())
        return {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                        "num_key_value_heads", "num_hidden_layers", "rms_norm_eps", "rope_theta")}
    hidden, inter, heads, kv = name_or_shape
    return {"hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
            "num_key_value_heads": kv, "num_hidden_layers": 1}


def shaped_model(folder: Path, name_or_shape, tokenizer_from: str = "smollm2-135m", layers: int | None = None,
                 device: str = "cpu", seed: int = 0) -> Path:
    """Write a bfloat16 LlamaForCausalLM of that shape with random weights to `folder` (kept if it is there)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from eqat_dist.models.loading import BUNDLED, bundled_model_dir

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    shape = shape_of(name_or_shape)
    if layers:
        shape["num_hidden_layers"] = layers
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir(tokenizer_from) if tokenizer_from in BUNDLED
                                                  else tokenizer_from))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, **shape)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # a 7B model built in float32 first would need twice the memory
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
