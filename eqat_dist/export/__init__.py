from .gptq_v2 import CheckpointError, load_packed_model, quantization_config, save_packed_model

__all__ = ["CheckpointError", "load_packed_model", "quantization_config", "save_packed_model"]
