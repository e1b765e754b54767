"""GGUF for llama.cpp, where a GGUF type holds our grid without loss:
- a run trained on a format grid (`--grid q2_0|q4_0|q8_0`, quant/config.py) is that type's own grid: its
  codes, its fixed offset and our float16 d (signed) go into Q2_0 (64 weights: (q - 1) d), Q4_0 (32:
  (q - 8) d) or Q8_0 (32: q d with q signed) as they are;
- a 4-bit asymmetric run with groups of a multiple of 32 maps onto Q4_1 blocks of 32 (value = d * q + m
  with d = s and m = -z * s: exact but for the fp16 rounding of m).
No GGUF type holds a learned-zero 2-, 3- or 8-bit grid exactly (the k-quants nest 6-bit sub-block scales
inside super-blocks of 256): those are refused, naming the grid to train with.

Written with the `gguf` package (llama.cpp's own writer and tensor-name map): the architecture's
metadata, the tokenizer (tokens, types, merges, special ids, chat template) from the export's
tokenizer files, embeddings and lm_head in F16, norms and biases in F32. Llama's q/k rows are permuted
as llama.cpp's converter does (its rotary layout interleaves the halves); a permutation of whole rows
leaves each row's blocks intact. Blocks stream through a temporary file, one at a time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..quant import QuantConfig
from ..quant.config import GRIDS
from .packed_source import PackedExport, QuantizedLinear

# model_type -> (GGUF architecture, whether q/k rows are permuted to llama.cpp's rotary layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


@dataclass(frozen=True)
class BlockType:
    """A llama.cpp block type: its ggml type id and file type (ggml.h; the `gguf` package may predate
    the type: Q2_0 is ggml type 42, llama.cpp's file type 41, since ggml-org/llama.cpp#24448)."""
    name: str
    block: int  # weights a block
    ggml_type: int
    file_type: int


Q4_1 = BlockType("Q4_1", 32, 3, 3)
FORMAT_TYPES = {"q2_0": BlockType("Q2_0", 64, 42, 41), "q4_0": BlockType("Q4_0", 32, 2, 2),
                "q8_0": BlockType("Q8_0", 32, 8, 7)}


def block_type(quant: QuantConfig) -> BlockType | None:
    """The GGUF block type that holds this grid without loss, None when none does."""
    if quant.grid in FORMAT_TYPES:
        return FORMAT_TYPES[quant.grid]
    return Q4_1 if quant.bits == 4 else None


def file_name(quant: QuantConfig) -> str:
    return f"model-{block_type(quant).name}.gguf"


def refusal(quant: QuantConfig, model_type: str | None) -> str | None:
    kind = block_type(quant)
    if kind is None:
        train = {2: "`grid` q2_0 (llama.cpp's Q2_0, groups of 64)", 8: "`grid` q8_0 (llama.cpp's Q8_0, groups of 32)"}
        how = f"train with {train[quant.bits]}, or " if quant.bits in train else ""
        return (f"no GGUF type holds a uniform asymmetric {quant.bits}-bit grid without loss (its k-quants nest 6-bit "
                f"scales in blocks of 256): {how}use `export_format` compressed-tensors or gptq_v2 at this width")
    if kind is Q4_1 and quant.group_size != -1 and quant.group_size % Q4_1.block:
        return (f"GGUF's Q4_1 blocks are {Q4_1.block} wide: `group_size` {quant.group_size} is not a multiple of "
                f"{Q4_1.block}; use 32, 64, 128 or -1, or `export_format` compressed-tensors")
    if model_type is not None and model_type not in ARCHITECTURES:
        return (f"GGUF export is written for {', '.join(sorted(ARCHITECTURES))} models, not {model_type!r}; "
                "use `export_format` compressed-tensors or gptq_v2")
    return None


def q4_1_rows(layer: QuantizedLinear) -> np.ndarray:
    """[out, in / 32 * 20] bytes: per block of 32 inputs d (fp16), m (fp16), then 16 bytes holding inputs
    j (low nibble) and j + 16 (high nibble)."""
    out, width = layer.codes.shape
    if width % Q4_1.block:
        raise ValueError(f"a layer {width} inputs wide does not split into Q4_1 blocks of {Q4_1.block}")
    per = layer.group // Q4_1.block  # Q4_1 blocks per group
    scales = layer.scales.float()
    d = layer.scales.to(torch.float16).repeat_interleave(per, dim=1)
    m = (-layer.zeros.float() * scales).to(torch.float16).repeat_interleave(per, dim=1)
    qs = _nibbles(layer.codes.to(torch.uint8).view(out, width // Q4_1.block, Q4_1.block))
    blocks = torch.cat([_half_bytes(d, out), _half_bytes(m, out), qs], dim=-1)
    return blocks.reshape(out, -1).numpy()


def _half_bytes(d: torch.Tensor, out: int) -> torch.Tensor:
    """float16 [out, blocks] -> its bytes [out, blocks, 2] (little-endian, as ggml reads them)."""
    return d.to(torch.float16).flatten().view(torch.uint8).view(out, -1, 2)  # flatten: strides of a [out, 1] view


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[out, blocks, 32] 4-bit codes -> [out, blocks, 16] bytes: j in the low nibble, j + 16 in the high."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def format_grid_rows(layer: QuantizedLinear, grid: str) -> np.ndarray:
    """A format grid's layer as its llama.cpp blocks [out, in / block * bytes]: d (our float16 scale, with
    its sign), then the codes as the type packs them (ggml-common.h; dequantize_row_q2_0/q4_0/q8_0):
    Q2_0 four 2-bit codes a byte, input j at bits 2 (j % 4) of byte j / 4; Q4_0 as Q4_1's nibbles; Q8_0
    one signed byte an input, q - 128."""
    fixed, kind = GRIDS[grid], FORMAT_TYPES[grid]
    out, width = layer.codes.shape
    if layer.group != kind.block or width % kind.block:
        raise ValueError(f"a {grid} layer must have groups of {kind.block}, not {layer.group}")
    if not bool((layer.zeros == fixed.zero).all()):
        raise ValueError(f"the export's zero points are not all {fixed.zero}: it was not trained on `grid` {grid}")
    codes = layer.codes.to(torch.int32).view(out, width // kind.block, kind.block)
    d = _half_bytes(layer.scales, out)
    if grid == "q2_0":
        quads = codes.view(out, -1, kind.block // 4, 4).to(torch.uint8)
        qs = quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)
    elif grid == "q4_0":
        qs = _nibbles(codes.to(torch.uint8))
    else:
        qs = (codes - fixed.zero).to(torch.int8).view(torch.uint8)
    return torch.cat([d, qs], dim=-1).reshape(out, -1).numpy()


def rotary_rows(rows: int, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k projections: each head's two rotary halves interleaved."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def pre_tokenizer(tokenizer: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, from tokenizer.json's `pre_tokenizer`."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    regex = " ".join(str(p.get("pattern", {}).get("Regex", "")) for p in parts if p.get("type") == "Split")
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if r"\p{N}{1,3}" in regex:
        return "llama-bpe"
    if r"\p{N}" in regex:
        return "qwen2"
    return "default"


def add_tokenizer(writer, folder: Path, vocab_size: int) -> str:
    """Tokens, their types, merges, special ids and chat template from the export's tokenizer files."""
    import gguf

    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    model = tokenizer["model"]
    if model["type"] != "BPE":
        raise ValueError(f"{folder}/tokenizer.json is a {model['type']} tokenizer; the GGUF export writes BPE "
                         "tokenizers only: use `export_format` compressed-tensors or gptq_v2")
    if model.get("byte_fallback"):  # SentencePiece-style BPE (Llama 2, Mistral): llama.cpp's "llama" vocab
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(list(scores))
        pre = "default"
    else:
        added = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
        by_id = {i: t for t, i in model["vocab"].items()} | {i: a["content"] for i, a in added.items()}

        def kind(i: int):
            if i in added:
                return gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
            return gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED

        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
        types = [kind(i) for i in range(vocab_size)]
        writer.add_tokenizer_model("gpt2")
        pre = pre_tokenizer(tokenizer)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(folder, load_merges=not model.get("byte_fallback"), n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def add_architecture(writer, config: dict) -> None:
    import gguf

    heads = config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    writer.add_name(str(config.get("_model_name_or_path") or config.get("_name_or_path") or "eqat-dist export"))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_scaling_refusal(config: dict) -> str | None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        return (f"the model's rope scaling {kind!r} is not written into GGUF by eqat-dist yet; use "
                "`export_format` compressed-tensors or gptq_v2")
    return None


class GGUF:
    name = "gguf"

    def refusal(self, quant: QuantConfig, model_type: str | None) -> str | None:
        return refusal(quant, model_type)

    def write(self, source: PackedExport, folder: Path) -> Path:
        import gguf

        config = source.config
        problem = refusal(source.quant, config.get("model_type")) or rope_scaling_refusal(config)
        if problem:
            raise ValueError(problem)
        arch, permute = ARCHITECTURES[config["model_type"]]
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], source.num_blocks)
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        folder.mkdir(parents=True, exist_ok=True)
        kind = block_type(source.quant)
        path = folder / file_name(source.quant)
        writer = gguf.GGUFWriter(path, arch, use_temp_file=True)
        add_architecture(writer, config)
        writer.add_file_type(kind.file_type)
        add_tokenizer(writer, source.folder, config["vocab_size"])

        def gguf_name(name: str) -> str:
            found = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if found is None:
                raise ValueError(f"no GGUF name for tensor {name} of a {arch} model")
            return found

        def add_float(name: str, value: torch.Tensor) -> None:
            as_f16 = value.dim() > 1  # llama.cpp keeps 1-D tensors (norms, biases) in F32
            writer.add_tensor(gguf_name(name), value.to(torch.float16 if as_f16 else torch.float32).numpy())

        for name, value in source.shell().items():
            add_float(name, value)
        for i in range(source.num_blocks):
            linears, others = source.block(i)
            own = f"{source.prefix}.{i}."
            for name, value in others.items():
                add_float(own + name, value)
            for name, layer in linears.items():
                rows = q4_1_rows(layer) if kind is Q4_1 else format_grid_rows(layer, source.quant.grid)
                bias = layer.bias
                if permute and name.endswith(("q_proj", "k_proj")):
                    order = rotary_rows(rows.shape[0], heads if name.endswith("q_proj") else kv_heads)
                    rows = rows[order]
                    bias = None if bias is None else bias[torch.from_numpy(order)]
                # the element shape and ggml's type id given as they are: a raw byte array would be
                # reshaped through the `gguf` package's table of types, which may not know the type yet
                writer.add_tensor(gguf_name(own + name + ".weight"), np.ascontiguousarray(rows).view(np.int8),
                                  raw_shape=tuple(layer.codes.shape), raw_dtype=kind.ggml_type)
                if bias is not None:
                    add_float(own + name + ".bias", bias)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return folder
