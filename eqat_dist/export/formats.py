"""The export formats, by name. A run always writes GPTQ v2 (gptq_v2.py) into its output: it is what
evaluation, E2E-QP and resuming read back. Every other format is converted from that export block by
block (serving formats, `convert.py`): on a run with `--export-format`, or later with
`eqat-dist export --from RUN --format F --output DIR`.

GPTQ v2's writer (`writer_for`) writes packed blocks as training produces them:

    write_blocks(source, blocks, tokenizer, folder, quant, method, dtype)      after Block-AP or RTN
    write_retrained(start, gathered, blocks_prefix, tokenizer, folder, method, dtype) -> checks
                                                                             after E2E-QP (new scales)
    write_model(model, tokenizer, folder, quant, method)                      a whole model in memory
    method_after_e2e(start) -> str                                            what made the result

A serving format is a class in its own module with

    name                                    its `--export-format` name
    refusal(quant, model_type) -> str|None  one line when it cannot hold this width, group or family
    write(source: PackedExport, folder)     its files into `folder`, from the decoded GPTQ v2 export

and its name in SERVING.
"""
from __future__ import annotations

from .awq import AWQ
from .compressed_tensors import CompressedTensors
from .gguf_file import GGUF
from .gptq_v2 import GPTQv2

NATIVE = GPTQv2.name
FORMATS = {GPTQv2.name: GPTQv2}
SERVING = {f.name: f for f in (CompressedTensors, AWQ, GGUF)}
ALL_FORMATS = (NATIVE, *SERVING)


def writer_for(name: str):
    """The writer of format `name`; ValueError naming the formats there are."""
    try:
        return FORMATS[name]()
    except KeyError:
        raise ValueError(f"`export_format` {name!r} is not known; use one of {', '.join(FORMATS)}") from None


def serving_format(name: str):
    try:
        return SERVING[name]()
    except KeyError:
        raise ValueError(f"`export_format` {name!r} is not known; use one of {', '.join(ALL_FORMATS)}") from None


def parse_formats(text: str) -> tuple[str, ...]:
    """`--export-format a,b` -> the formats in order, gptq_v2 first (always written); ValueError on an unknown one."""
    asked = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in asked if f not in ALL_FORMATS]
    if unknown:
        raise ValueError(f"`export_format` {unknown[0]!r} is not known; use one or more of {', '.join(ALL_FORMATS)}, "
                         "comma-separated")
    return (NATIVE, *dict.fromkeys(f for f in asked if f != NATIVE))


def refusal(name: str, quant, model_type: str | None) -> str | None:
    """The line refusing format `name` for this width, group size and model family; None when it holds
    them (GPTQ v2 holds everything we make)."""
    problem = serving_format(name).refusal(quant, model_type) if name != NATIVE else None
    return f"`export_format` {name}: {problem}" if problem else None


def refusals(formats, quant, model_type: str | None) -> list[str]:
    """One line for each asked format that cannot hold this width, group size or model family."""
    return [line for line in (refusal(name, quant, model_type) for name in formats) if line]
