"""Exports: formats by name (formats.py), GPTQ v2 the first (gptq_v2.py), files written block by block
(shards.py), moved into the output together with their results (staging.py)."""
from .formats import FORMATS, writer_for
from .gptq_v2 import CheckpointError, load_packed_model, quantization_config, read_quant_config, save_packed_model

__all__ = ["FORMATS", "CheckpointError", "load_packed_model", "quantization_config", "read_quant_config",
           "save_packed_model", "writer_for"]
