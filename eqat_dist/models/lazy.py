"""A model whose decoder blocks load only when asked for: each rank materializes the embeddings,
final norm, rotary tables and lm_head (the "shell") plus the blocks it owns, never the whole model."""
from __future__ import annotations

import copy

import torch

from ..utils.memory import return_freed_memory
from ..utils.tensors import CheckpointError, LazyTensors
from .blocks import BlockCall, decoder_layers, embed, record_block_calls
from .family import missing_is_tied_head, ties_head
from .loading import ModelLoadError, resolve_folder


def model_shell(config, dtype: torch.dtype):
    """(model, its decoder blocks, their module name): the embeddings, final norm, rotary tables and
    lm_head real on CPU, the blocks on the meta device (no memory until one is materialized)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    shell_config = copy.deepcopy(config)
    shell_config.num_hidden_layers = 0  # embeddings, norm, rotary, lm_head: real and on CPU
    with no_init_weights():  # every weight is loaded next (rotary tables are computed, not initialised)
        model = AutoModelForCausalLM.from_config(shell_config, dtype=dtype).eval()
    model.config.num_hidden_layers = config.num_hidden_layers
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = decoder_layers(full)
    prefix = next(n for n, m in full.named_modules() if m is layers)
    parent, _, leaf = prefix.rpartition(".")
    setattr(model.get_submodule(parent), leaf, layers)
    return model, layers, prefix


def empty_block(layers, index: int, config, dtype: torch.dtype) -> torch.nn.Module:
    """Block `index` of `layers` built on CPU with uninitialised weights (they are loaded next: a random
    initialisation would cost more than the load)."""
    from transformers.initialization import no_init_weights

    with torch.device("cpu"), no_init_weights():
        return type(layers[index])(config, index).to(dtype)


class LazyModel:
    """The shell of a causal LM on CPU, with blocks materialized one by one from the checkpoint."""

    def __init__(self, spec: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig

        self.folder = resolve_folder(spec)
        self.dtype = dtype
        self.config = AutoConfig.from_pretrained(self.folder)
        self.num_blocks = self.config.num_hidden_layers
        self.model, self.layers, self.prefix = model_shell(self.config, dtype)
        try:
            self.tensors = LazyTensors(self.folder)
        except CheckpointError as err:
            raise ModelLoadError(str(err)) from err
        state = {k: self.tensors[k].to(dtype) for k in self.tensors if not k.startswith(self.prefix + ".")}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(self.prefix + ".")
                   and not missing_is_tied_head(k, self.config)]
        if missing or unexpected:
            raise ModelLoadError(f"{self.folder}: unexpected checkpoint layout (missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]})")
        if ties_head(self.config):
            self.model.tie_weights()

    def block(self, index: int) -> torch.nn.Module:
        """Block `index` with its full-precision weights, materialized on CPU (cached in the shell)."""
        layer = self.layers[index]
        if next(layer.parameters()).device.type == "meta":
            layer = empty_block(self.layers, index, self.config, self.dtype)
            head = f"{self.prefix}.{index}."
            state = {k[len(head):]: self.tensors[k].to(self.dtype) for k in self.tensors if k.startswith(head)}
            layer.load_state_dict(state, strict=True)
            self.layers[index] = layer.eval()
        return self.layers[index]

    def set_block(self, index: int, module: torch.nn.Module) -> None:
        self.layers[index] = module

    def release(self, index: int) -> None:
        """Drop a block's weights (back to meta) and give their memory back to the OS."""
        self.layers[index] = self.layers[index].to("meta")
        return_freed_memory()

    def calls(self, ids: torch.Tensor) -> list[BlockCall]:
        return record_block_calls(self.model, ids)[1]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return embed(self.model, ids)
