"""The numbers a plan needs from a model's config.json alone: no weights are read.

Decoder blocks of the Llama layout (models/family.py: Llama, Mistral, Qwen2, Gemma3 text): attention
q/k/v/o and a gated MLP gate/up/down, two norms. Configs of four large models ship with the package (architecture numbers
only) so that `eqat-dist plan --model llama-2-70b` works offline.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..models.family import block_linear_shapes

CONFIGS = Path(__file__).with_name("configs")
PLANNING_MODELS = sorted(p.stem for p in CONFIGS.glob("*.json"))


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each quantized linear of one block."""
        return block_linear_shapes(self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim)

    @property
    def block_linear_params(self) -> int:
        return sum(o * i for o, i in self.linears.values())

    @property
    def block_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.block_linear_params + 2 * self.hidden + bias

    @property
    def embedding_params(self) -> int:
        """Embeddings, lm_head (unless tied) and the final norm: kept in 16 bit, never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def total_params(self) -> int:
        return self.layers * self.block_params + self.embedding_params

    def groups(self, group_size: int) -> int:
        """Quantization groups (= trainable step sizes) of one block."""
        return sum(o * (i // (group_size if group_size > 0 else i)) for o, i in self.linears.values())

    @property
    def kv_width(self) -> int:
        """Key (or value) values per token."""
        return self.kv_heads * self.head_dim

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    def largest_linear(self) -> int:
        return max(o * i for o, i in self.linears.values())


def from_config(config: dict, name: str) -> Arch:
    try:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return Arch(name=name, hidden=hidden, intermediate=config["intermediate_size"],
                    layers=config["num_hidden_layers"], heads=heads,
                    kv_heads=config.get("num_key_value_heads") or heads,
                    head_dim=config.get("head_dim") or hidden // heads, vocab=config["vocab_size"],
                    tied=bool(config.get("tie_word_embeddings", False)),
                    qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")))
    except KeyError as err:
        raise PlanError(f"{name}: config.json lacks {err}; the planner knows decoder models of the Llama "
                        "family (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                        "vocab_size)") from err


def load_arch(spec: str) -> Arch:
    """From a bundled planning config (llama-2-70b, ...), the bundled real model, a folder (or a
    config.json file), or a hub id (its config.json only)."""
    if spec in PLANNING_MODELS:
        return from_config(json.loads((CONFIGS / f"{spec}.json").read_text()), spec)
    from ..models.loading import ModelLoadError, model_config_file
    try:
        config_file = model_config_file(spec)
    except ModelLoadError as err:
        raise PlanError(f"`model` {spec}: {err}") from err
    if config_file is None:
        raise PlanError(f"`model` {spec}: a .gguf file holds its config inside; plan from a folder holding "
                        f"config.json, a hub id, or one of {', '.join(PLANNING_MODELS)}")
    return from_config(json.loads(config_file.read_text()), spec)
