from .blocks import BlockCall, block_linears, decoder_layers, embed, record_block_calls, run_block
from .loading import BUNDLED, ModelLoadError, load_model

__all__ = ["BlockCall", "block_linears", "decoder_layers", "embed", "record_block_calls", "run_block",
           "BUNDLED", "ModelLoadError", "load_model"]
