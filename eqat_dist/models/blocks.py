"""Model surgery that knows nothing of training: find the decoder blocks of any HF decoder-only
model, the linear layers inside them, and the exact arguments each block is called with, so a
block can be replayed on its own."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .family import decoder_layers

def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers to quantize inside one block, by their name relative to the block."""
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def move(obj, device=None, dtype=None):
    """Move every tensor in a nested structure; only floating tensors change dtype."""
    def _one(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
    return tree_map(_one, obj)


@dataclass
class BlockCall:
    """Everything a block receives besides its input hidden states (masks, position ids, rotary
    `position_embeddings`, cache flags, ...), recorded with batch size 1 so it broadcasts."""
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def to(self, device=None, dtype=None) -> "BlockCall":
        return BlockCall(move(self.args, device, dtype), move(self.kwargs, device, dtype))


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    pass


def record_block_calls(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[BlockCall]]:
    """Run the model's own preamble (embeddings, masks, rotary) on `input_ids` [B, T] and return
    (hidden states entering block 0, one BlockCall per block).

    Every block is swapped for a recorder that passes its input through, so the blocks' weights are
    never used (cheap, and valid for models whose layer types get different masks or rotary tables).
    """
    layers = decoder_layers(model)
    calls: list[BlockCall | None] = [None] * len(layers)
    first_hidden = []

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            kwargs["use_cache"] = False
            calls[index] = BlockCall(move(args, "cpu"), move(kwargs, "cpu"))
            if index == 0:
                first_hidden.append(hidden_states.detach())
            if index == len(layers) - 1:
                raise _Stop
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            model.base_model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
    if any(c is None for c in calls):
        raise RuntimeError("the model did not call every decoder block; cannot replay blocks alone")
    return first_hidden[0], calls


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states entering block 0 for `input_ids` (any batch size)."""
    hidden, _ = record_block_calls(model, input_ids)
    return hidden
