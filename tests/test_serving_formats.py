"""Serving formats (issue 23), each read back by its own library, none of our code on the reading side:
compressed-tensors' decompressor and transformers' compressed-tensors loader, the `gguf` package's
dequantizer and transformers' GGUF loader, the refusals, and `eqat-dist export`. AWQ is read by
GPTQModel and transformers in tests/test_interop.py (their venv)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import RTN_W4_WITH_FORMATS, THREADS, shared_run, tiny_model
from eqat_dist.export import load_packed_model, save_packed_model
from eqat_dist.export.convert import convert
from eqat_dist.models.quantize import quantize_rtn
from eqat_dist.quant import QuantConfig
from serving_checks import check_compressed_tensors, check_gguf

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "launch" / "run.py")
TEXT = "Serving 2-bit models: the quick brown fox jumps over 13 lazy dogs, twice. " * 3


def small_tokenizer(vocab: int):
    """A byte-level BPE tokenizer trained here (the tiny models' vocabulary), as transformers saves it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT, "hello world " * 20], vocab_size=vocab, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def tiny_export(tmp_path: Path, family: str, bits: int, group: int) -> Path:
    """A random tiny model of `family`, round-to-nearest, exported as GPTQ v2 with a real tokenizer."""
    cfg = QuantConfig(bits, group)
    tokenizer = small_tokenizer(300)
    model = quantize_rtn(tiny_model(family, vocab=320), cfg)
    out = tmp_path / f"{family}-w{bits}g{group}"
    save_packed_model(model, tokenizer, out, cfg, "rtn")
    return out


def _ours(folder: Path, fp16_weights: bool = False):
    """Our loader's model in float32; with `fp16_weights` each de-quantized weight rounded to fp16 (what a
    16-bit decoder computes)."""
    model, _ = load_packed_model(folder)
    if fp16_weights:
        for module in model.modules():
            if hasattr(module, "dequantized_weight"):
                weight = module.dequantized_weight().detach().half().float()
                module.forward = (lambda x, w=weight, b=module.bias: torch.nn.functional.linear(x, w, b))
    return model


def _logit_errors(model, reference, ids) -> tuple[float, float]:
    with torch.no_grad():
        got, want = model(input_ids=ids).logits.float(), reference(input_ids=ids).logits.float()
    return ((got - want).abs().max() / want.abs().max()).item(), (got.argmax(-1) == want.argmax(-1)).float().mean().item()


# -- compressed-tensors

@pytest.mark.parametrize("bits,group", [(2, 32), (3, 32), (4, 64), (8, 32), (3, -1)])
def test_compressed_tensors_decompressor_restores_our_weights_exactly(tmp_path, bits, group):
    source = tiny_export(tmp_path, "qwen2", bits, group)  # qwen2: q/k/v biases travel too
    assert check_compressed_tensors(source, convert(source, "compressed-tensors", tmp_path / "ct")) == 14


@pytest.mark.parametrize("grid", ["q2_0", "q4_0"])
def test_a_format_grids_signed_scales_and_fixed_zero_points_travel_in_compressed_tensors(tmp_path, grid):
    """A fixed zero point is a stored one, and a negative scale a scale: the decompressor gives our weights."""
    source = tiny_grid_export(tmp_path, grid)
    assert check_compressed_tensors(source, convert(source, "compressed-tensors", tmp_path / "ct")) == 14


def test_transformers_loads_compressed_tensors_with_our_logits(tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    source = tiny_export(tmp_path, "llama", 3, 32)
    folder = convert(source, "compressed-tensors", tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(0, 300, (2, 24))
    rel_max, top1 = _logit_errors(theirs, _ours(source, fp16_weights=True), ids)
    assert rel_max < 1e-5 and top1 == 1.0


# -- GGUF

@pytest.mark.parametrize("family,group", [("llama", 32), ("llama", 64), ("qwen2", 64), ("mistral", -1)])
def test_gguf_dequantizes_to_our_weights_within_fp16_rounding_and_transformers_matches(tmp_path, family, group):
    source = tiny_export(tmp_path, family, 4, group)
    folder = convert(source, "gguf", tmp_path / "gguf")
    theirs = check_gguf(source, folder / "model-Q4_1.gguf")
    # 16 tokens: GGUF's llama architecture has no sliding window (llama.cpp runs Mistral without one)
    rel_max, top1 = _logit_errors(theirs, _ours(source), torch.randint(0, 300, (2, 16)))
    assert rel_max < 5e-3 and top1 >= 0.95


def tiny_grid_export(tmp_path: Path, grid: str) -> Path:
    """A tiny Llama trained on nothing but started on a format grid (RTN on it), exported as GPTQ v2."""
    from eqat_dist.quant.config import GRIDS

    fixed = GRIDS[grid]
    cfg = QuantConfig(fixed.bits, fixed.group, "clip", grid)
    model = quantize_rtn(tiny_model("llama", vocab=320), cfg)
    out = tmp_path / f"llama-{grid}"
    save_packed_model(model, small_tokenizer(300), out, cfg, "rtn")
    return out


def ggml_dequantize(kind: str, rows, width: int):
    """llama.cpp's dequantize_row_q2_0 / q4_0 / q8_0 (ggml-quants.c), transcribed: block bytes -> floats."""
    import numpy as np

    block = {"Q2_0": 64, "Q4_0": 32, "Q8_0": 32}[kind]
    data = np.asarray(rows, dtype=np.uint8).reshape(rows.shape[0], width // block, -1)
    d = data[..., :2].copy().view(np.float16).astype(np.float32)  # [out, blocks, 1]
    qs = data[..., 2:]
    if kind == "Q2_0":
        q = np.stack([(qs >> (2 * k)) & 3 for k in range(4)], axis=-1).reshape(*qs.shape[:2], 64).astype(np.int32) - 1
    elif kind == "Q4_0":
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32) - 8
    else:
        q = qs.view(np.int8).astype(np.int32)
    return torch.from_numpy((q * d).reshape(rows.shape[0], width))


@pytest.mark.parametrize("grid", ["q2_0", "q4_0", "q8_0"])
def test_a_format_grid_run_becomes_llama_cpps_own_type_without_loss(tmp_path, grid):
    """The blocks llama.cpp reads (its reference dequantizers, transcribed) are our weights exactly: d is our
    float16 scale with its sign, the codes ours. Q4_0 and Q8_0 also through the `gguf` package's reader and
    dequantizer and transformers' GGUF loader (Q2_0 is newer than both: llama.cpp itself reads it, in the
    engine check)."""
    import gguf

    from eqat_dist.export.gguf_file import FORMAT_TYPES, format_grid_rows
    from eqat_dist.export.packed_source import PackedExport

    source = tiny_grid_export(tmp_path, grid)
    ours = PackedExport(source)
    assert ours.quant.grid == grid
    kind = FORMAT_TYPES[grid].name
    for name, layer in ours.block(0)[0].items():
        decoded = ggml_dequantize(kind, format_grid_rows(layer, grid), layer.codes.shape[1])
        assert torch.equal(decoded, layer.dequantized()), name
    folder = convert(source, "gguf", tmp_path / "gguf")
    assert [p.name for p in folder.iterdir()] == [f"model-{kind}.gguf"]
    if grid == "q2_0":
        return
    tensors = {t.name: t for t in gguf.GGUFReader(folder / f"model-{kind}.gguf").tensors}
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type.name == kind
    got = torch.from_numpy(gguf.quants.dequantize(down.data, down.tensor_type).copy())
    assert torch.equal(got, ours.block(0)[0]["mlp.down_proj"].dequantized())
    rel_max, top1 = _logit_errors(_transformers_gguf(folder, kind), _ours(source), torch.randint(0, 300, (2, 16)))
    assert rel_max < 5e-3 and top1 >= 0.95  # the embeddings and lm_head in F16, as for Q4_1


def _transformers_gguf(folder: Path, kind: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"model-{kind}.gguf", dtype=torch.float32)


def test_gguf_refuses_what_it_cannot_hold_in_one_line(tmp_path):
    source = tiny_export(tmp_path, "llama", 3, 32)
    with pytest.raises(ValueError, match="no GGUF type holds a uniform asymmetric 3-bit grid"):
        convert(source, "gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="holds 4-bit weights only"):
        convert(source, "awq", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    from eqat_dist.export.formats import refusals
    assert refusals(("gptq_v2", "gguf"), QuantConfig(4, 16), "llama")[0].count("multiple of 32") == 1
    assert "not 'gemma3_text'" in refusals(("gguf",), QuantConfig(4, 32), "gemma3_text")[0]
    assert refusals(("gptq_v2", "compressed-tensors"), QuantConfig(2, 64), "gemma3_text") == []
    assert "train with `grid` q2_0 (llama.cpp's Q2_0, groups of 64)" in refusals(("gguf",), QuantConfig(2, 64), "llama")[0]
    assert refusals(("gguf",), QuantConfig(2, 64, grid="q2_0"), "llama") == []


# -- the bundled model, end to end through the command line

def _cli(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def bundled_w4(tmp_path_factory) -> Path:
    """RTN w4g64 of the bundled SmolLM2, every format written by the run itself (shared with test_interop)."""
    return shared_run(tmp_path_factory, "rtn-w4-formats", RTN_W4_WITH_FORMATS)


@pytest.mark.slow
def test_a_run_writes_every_format_beside_its_gptq_export(bundled_w4):
    for name in ("compressed-tensors", "awq"):
        config = json.loads((bundled_w4 / f"export-{name}" / "config.json").read_text())
        assert config["quantization_config"]["meta"]["method"] == "rtn"
        assert (bundled_w4 / f"export-{name}" / "tokenizer.json").exists()
    assert (bundled_w4 / "export-gguf" / "model-Q4_1.gguf").stat().st_size > 50e6


@pytest.mark.slow
def test_gguf_tokenizer_matches_llama_cpp_and_transformers_reads_it(bundled_w4):
    import gguf
    from transformers import AutoTokenizer

    ours = gguf.GGUFReader(bundled_w4 / "export-gguf" / "model-Q4_1.gguf")
    from eqat_dist.data.assets import SMOLLM2_GGUF, extract
    reference = gguf.GGUFReader(extract(SMOLLM2_GGUF))  # written by llama.cpp's converter, same tokenizer
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert ours.fields[key].contents() == reference.fields[key].contents(), key
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "llama.block_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.context_length"):
        assert ours.fields[key].contents() == reference.fields[key].contents(), key
    theirs = AutoTokenizer.from_pretrained(bundled_w4 / "export-gguf", gguf_file="model-Q4_1.gguf")
    mine = AutoTokenizer.from_pretrained(bundled_w4)
    assert theirs(TEXT).input_ids == mine(TEXT).input_ids


@pytest.mark.slow
def test_export_command_converts_a_run_and_refuses_bad_outputs_in_one_line(bundled_w4, tmp_path):
    from eqat_dist.cli import main

    out = tmp_path / "ct"
    assert main(["export", "--from", str(bundled_w4), "--format", "compressed-tensors", "--output", str(out)]) == 0
    own = bundled_w4 / "export-compressed-tensors"
    for file in ["config.json", *(p.name for p in own.glob("model*"))]:  # the run's own conversion, byte for byte
        assert (out / file).read_bytes() == (own / file).read_bytes(), file
    before = sorted(p.name for p in out.iterdir())
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    for argv, expected in (
            (["--format", "awq", "--output", str(out)], "is not empty"),
            (["--format", "awq", "--output", str(user), "--overwrite"], "not an eqat-dist export"),
            (["--format", "gguf", "--output", str(bundled_w4)], "is the export converted from"),
            (["--format", "gguf", "--output", str(tmp_path / "x"), "--from", str(tmp_path)], "no config.json")):
        result = subprocess.run([sys.executable, "-m", "eqat_dist.cli", "export", "--from", str(bundled_w4), *argv],
                                capture_output=True, text=True)
        assert result.returncode == 2 and expected in result.stderr and len(result.stderr.splitlines()) == 1, \
            result.stderr
    assert sorted(p.name for p in out.iterdir()) == before and (user / "notes.txt").read_text() == "keep"
    assert main(["export", "--from", str(bundled_w4), "--format", "gguf", "--output", str(out), "--overwrite"]) == 0
    assert [p.name for p in out.iterdir()] == ["model-Q4_1.gguf"]  # the earlier export replaced whole
    plain = tmp_path / "gptq"  # the GPTQ v2 model alone, without the run's results and serving folders
    assert main(["export", "--from", str(bundled_w4), "--format", "gptq_v2", "--output", str(plain)]) == 0
    assert not any(plain.glob("export-*")) and not (plain / "results.json").exists()
    reloaded, _ = load_packed_model(plain)
    original, _ = load_packed_model(bundled_w4)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), original.state_dict().values()))


@pytest.mark.slow
def test_a_run_refuses_a_format_that_cannot_hold_its_width_before_any_work(tmp_path):
    for fmt, bits, expected in (("gguf", 2, "no GGUF type holds"), ("awq", 3, "4-bit weights only"),
                                ("gguf,safetensors", 4, "'safetensors' is not known")):
        result = _cli("--model", "smollm2-135m", "--wbits", str(bits), "--group-size", "64", "--epochs", "0",
                      "--export-format", fmt, "--output", str(tmp_path / fmt), check=False)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert "--export-format" in result.stderr and not (tmp_path / fmt).exists()


@pytest.mark.slow
def test_a_new_export_replaces_serving_folders_converted_from_the_earlier_weights(tmp_path):
    from eqat_dist.export.staging import new_stage, publish
    from eqat_dist.run_folder import RunFolder

    out = RunFolder(tmp_path / "run")
    for name in ("awq", "gguf"):
        out.serving_export(name).mkdir(parents=True)
        (out.serving_export(name) / "old").write_text("earlier weights")
    (out.root / "notes.txt").write_text("the user's")
    stage = new_stage(out.root)
    out.serving_export("gguf", within=stage).mkdir()
    (out.serving_export("gguf", within=stage) / "new").write_text("these weights")
    publish(stage, out.root)
    assert not out.serving_export("awq").exists()  # not asked this time: must not pass for this export
    assert [p.name for p in out.serving_export("gguf").iterdir()] == ["new"]
    assert (out.root / "notes.txt").read_text() == "the user's"
