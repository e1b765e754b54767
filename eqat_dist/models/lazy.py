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


class LazyModel:
    """The shell of a causal LM on CPU, with blocks materialized one by one from the checkpoint."""

    def __init__(self, spec: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = resolve_folder(spec)
        self.dtype = dtype
        self.config = AutoConfig.from_pretrained(self.folder)
        self.num_blocks = self.config.num_hidden_layers
        shell_config = copy.deepcopy(self.config)
        shell_config.num_hidden_layers = 0  # embeddings, norm, rotary, lm_head: real and on CPU
        self.model = AutoModelForCausalLM.from_config(shell_config, dtype=dtype).eval()
        self.model.config.num_hidden_layers = self.num_blocks
        with torch.device("meta"):
            full = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.layers = decoder_layers(full)  # on meta: no memory until a block is materialized
        self.prefix = next(n for n, m in full.named_modules() if m is self.layers)
        parent, _, leaf = self.prefix.rpartition(".")
        setattr(self.model.get_submodule(parent), leaf, self.layers)
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
            from transformers.initialization import no_init_weights  # noqa: F401 (skip random init)
            with torch.device("cpu"), no_init_weights():
                layer = type(layer)(self.config, index).to(self.dtype)
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
