"""A model whose decoder blocks load only when asked for: each rank materializes the embeddings,
final norm, rotary tables and lm_head (the "shell") plus the blocks it owns, never the whole model."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .blocks import BlockCall, decoder_layers, embed, record_block_calls
from .loading import BUNDLED, ModelLoadError, bundled_model_dir


def resolve_folder(spec: str) -> Path:
    """A local HF folder for `spec`: bundled name, folder, .gguf (converted once) or hub id (downloaded)."""
    if spec in BUNDLED:
        return bundled_model_dir(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        from ..data.assets import cache_dir
        from .loading import _load_gguf
        target = cache_dir() / "models" / f"gguf-{path.stem}"
        if not (target / "config.json").exists():
            model, tok = _load_gguf(path)
            model.save_pretrained(target)
            tok.save_pretrained(target)
        return target
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as err:
        raise ModelLoadError(f"could not fetch '{spec}' from the hub ({err.__class__.__name__}); pass a local "
                             "folder or a bundled model") from err


class TensorIndex:
    """Which safetensors file holds each tensor of an HF folder (sharded or not); reads lazily."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.file_of = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{folder} has no safetensors weights")
            self.file_of = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self.file_of.update({k: f for k in h.keys()})

    def read(self, keys) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in ks})
        return out


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
        self.index = TensorIndex(self.folder)
        shell_keys = [k for k in self.index.file_of if not k.startswith(self.prefix + ".")]
        state = {k: v.to(dtype) for k, v in self.index.read(shell_keys).items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(self.prefix + ".")
                   and not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelLoadError(f"{self.folder}: unexpected checkpoint layout (missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]})")
        if self.config.tie_word_embeddings:
            self.model.tie_weights()

    def block(self, index: int) -> torch.nn.Module:
        """Block `index` with its full-precision weights, materialized on CPU (cached in the shell)."""
        layer = self.layers[index]
        if next(layer.parameters()).device.type == "meta":
            from transformers.initialization import no_init_weights  # noqa: F401 (skip random init)
            with torch.device("cpu"), no_init_weights():
                layer = type(layer)(self.config, index).to(self.dtype)
            keys = [k for k in self.index.file_of if k.startswith(f"{self.prefix}.{index}.")]
            state = {k[len(f"{self.prefix}.{index}."):]: v.to(self.dtype) for k, v in self.index.read(keys).items()}
            layer.load_state_dict(state, strict=True)
            self.layers[index] = layer.eval()
        return self.layers[index]

    def set_block(self, index: int, module: torch.nn.Module) -> None:
        self.layers[index] = module

    def release(self, index: int) -> None:
        """Drop a block's weights (back to meta)."""
        self.layers[index] = self.layers[index].to("meta")

    def calls(self, ids: torch.Tensor) -> list[BlockCall]:
        return record_block_calls(self.model, ids)[1]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return embed(self.model, ids)
