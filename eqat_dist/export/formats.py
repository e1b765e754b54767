"""The export interface: one writer per format, chosen by name (RunConfig.export_format). A writer
turns packed blocks into the format's files, one block at a time:

    write_blocks(source, blocks, tokenizer, folder, quant, method, dtype)      after Block-AP or RTN
    write_retrained(start, gathered, blocks_prefix, tokenizer, folder, method, dtype) -> checks
                                                                             after E2E-QP (new scales)
    write_model(model, tokenizer, folder, quant, method)                      a whole model in memory
    method_after_e2e(start) -> str                                            what made the result

To add a format: a class with these methods in its own module (shards.write_model_files writes the
weights, index and JSON files for any of them), and its name in FORMATS.
"""
from __future__ import annotations

from .gptq_v2 import GPTQv2

FORMATS = {GPTQv2.name: GPTQv2}


def writer_for(name: str):
    """The writer of format `name`; ValueError naming the formats there are."""
    try:
        return FORMATS[name]()
    except KeyError:
        raise ValueError(f"`export_format` {name!r} is not known; use one of {', '.join(FORMATS)}") from None
