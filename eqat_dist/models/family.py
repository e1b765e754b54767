"""What eqat-dist knows of model families, in one place: where the decoder blocks are, which linears a
block has and their shapes, which module is the output head and when it shares the embedding's
tensor. Surgery (models/blocks.py), the planner (planning/arch.py), the exports (export/) and the
ZeRO-3 build (e2e/ds_setup.py) ask here.

To add a family: its `model_type` to SUPPORTED_FAMILIES (the tests build a tiny model of each, see
tests/conftest.py), its blocks' path to LAYER_PATHS when it is not one of them, and, when its blocks
are not the Llama layout (attention q/k/v/o, gated MLP gate/up/down), a shape rule for the planner in
`block_linear_shapes`. Quantization itself needs nothing more: every nn.Linear inside a block is
quantized, whatever its name.
"""
from __future__ import annotations

from torch import nn

# model_type -> what it is; all share the Llama block layout (Gemma3: extra norms, same linears)
SUPPORTED_FAMILIES = {
    "llama": "Llama 2/3, SmolLM2 (tied head), Vicuna, ...",
    "mistral": "Mistral, sliding-window attention",
    "qwen2": "Qwen2/2.5, q/k/v biases",
    "gemma3_text": "Gemma 3 text models, sliding and full attention layers",
}

# Where the decoder blocks are, tried in order (then: the longest list of identical modules)
LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
               "transformer.h", "gpt_neox.layers", "model.decoder.layers")

HEAD = "lm_head"  # the output head's module name in every supported family
HEAD_WEIGHT = f"{HEAD}.weight"


def is_supported(model_type: str) -> bool:
    return model_type in SUPPORTED_FAMILIES


def ties_head(config) -> bool:
    """Whether the output head shares the input embedding's tensor (then checkpoints leave it out)."""
    return bool(getattr(config, "tie_word_embeddings", False))


def without_tied_head(state: dict, config) -> dict:
    """A state dict as checkpoints hold it: the head's tensor dropped when it is the embedding's."""
    if ties_head(config):
        state.pop(HEAD_WEIGHT, None)
    return state


def missing_is_tied_head(key: str, config) -> bool:
    """A tensor a checkpoint may lack: the head's, when it is tied to the embedding."""
    return key == HEAD_WEIGHT and ties_head(config)


def is_output_head(out_features: int, config) -> bool:
    """While a model is constructed only sizes are known: the one linear as wide as the vocabulary is
    the output head (it stays a float layer; every block linear is narrower in every supported family)."""
    return out_features == config.vocab_size


def block_linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int
                        ) -> dict[str, tuple[int, int]]:
    """(out, in) of each quantized linear of one Llama-layout block, by its name in the block."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (intermediate, hidden),
            "mlp.up_proj": (intermediate, hidden), "mlp.down_proj": (hidden, intermediate)}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (known paths first, else the longest list of same-type modules)."""
    for path in LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
                  and len({type(c) for c in m}) == 1]
    if not candidates:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no list of identical layers")
    return max(candidates, key=len)


def blocks_name(model: nn.Module) -> str:
    """The decoder blocks' module name ('model.layers' for Llama): block i's tensors are '<name>.<i>.*'."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)
