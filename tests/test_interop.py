"""Our exports load in the standard tools as they are: GPTQModel and transformers (+ optimum), in a
separate venv set up as a GPTQModel user has it, give our loader's logits on a real text window.

The venv is built on first use (about 1-7 minutes from PyPI) in .venv-interop/, or taken from
EQAT_INTEROP_PYTHON. Tolerances: GPTQModel (torch kernel, upcast to float32) and transformers asked for
the torch kernel with float32 scales must equal our float32 logits to 1e-4 relative (measured: 0.0).
transformers as a user loads it keeps scales in float16 (the dequantized weight rounds to float16) and at
4 bits on CPU picks a bf16 kernel: 2e-2 relative L2 and 95% equal top-1 tokens there (measured up to
1.0e-2 and 97.7%, on the 2-bit RTN model whose logits are the most sensitive).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import RTN_W4_WITH_FORMATS, THREADS, shared_run

pytestmark = pytest.mark.slow  # a venv of GPTQModel and runs on the real model
ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "launch" / "run.py")
LOADERS = str(ROOT / "tests" / "interop" / "gptq_loaders.py")
# the serving formats each width's runs write: AWQ and GGUF hold 4-bit only
SERVING_AT = {2: "compressed-tensors", 3: "compressed-tensors", 4: "compressed-tensors,awq,gguf"}


def name_bits(name: str) -> int:
    return int(name.rsplit("-w", 1)[1][0])
GPTQMODEL = "gptqmodel==7.6.0"  # 7.7 needs torch >= 2.14.1
OPTIMUM = "optimum==2.3.0"      # transformers loads GPTQ checkpoints through optimum + gptqmodel


@pytest.fixture(scope="session")
def interop_python() -> str:
    """A python with gptqmodel, optimum and our torch, in a venv of its own (gptqmodel pins numpy)."""
    if os.environ.get("EQAT_INTEROP_PYTHON"):
        return os.environ["EQAT_INTEROP_PYTHON"]
    venv = ROOT / ".venv-interop"
    python = venv / "bin" / "python"
    ready = venv / "eqat-ready"
    wanted = f"torch=={torch.__version__.split('+')[0]} {GPTQMODEL} {OPTIMUM}"
    if not (ready.exists() and ready.read_text() == wanted):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        for step in (wanted.split()[:1], wanted.split()[1:]):  # torch first: no CUDA build pulled in
            result = subprocess.run([str(python), "-m", "pip", "install", "-q", *step], capture_output=True, text=True)
            assert result.returncode == 0, f"installing {step} for the interop test failed:\n{result.stderr[-2000:]}"
        ready.write_text(wanted)
    return str(python)


def _env():
    import random
    return dict(os.environ, OMP_NUM_THREADS=THREADS, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(random.randint(20000, 40000)))


def _cli(*args):
    result = subprocess.run([sys.executable, RUN, "--model", "smollm2-135m", "--eval-datasets", "", "--zeroshot-tasks", "",
                             "--skip-fp-eval", "--no-tensorboard", *args], env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """RTN at 2/3/4 bits, (tiny) Block-AP runs and E2E-QP runs from them at 2 and 4 bits, all on the real
    bundled model, each made by the command a user runs, each with the serving formats its width allows
    (export-FORMAT/ beside the GPTQ v2 files)."""
    base = tmp_path_factory.mktemp("interop")
    out = {}
    for bits in (2, 3):
        _cli("--wbits", str(bits), "--group-size", "64", "--epochs", "0", "--phase", "block-ap",
             "--export-format", SERVING_AT[bits], "--output", str(base / f"rtn{bits}"))
        out[f"rtn-w{bits}g64"] = base / f"rtn{bits}"
    out["rtn-w4g64"] = shared_run(tmp_path_factory, "rtn-w4-formats", RTN_W4_WITH_FORMATS)  # test_serving_formats' too
    for bits in (2, 4):
        small = ["--wbits", str(bits), "--group-size", "64", "--seqlen", "32", "--train-size", "2", "--val-size",
                 "1", "--batch-size", "1", "--export-format", SERVING_AT[bits]]
        _cli(*small, "--epochs", "1", "--quant-lr", "1e-2", "--weight-lr", "1e-3", "--phase", "block-ap",
             "--output", str(base / f"blockap{bits}"))
        out[f"block-ap-w{bits}g64"] = base / f"blockap{bits}"
        _cli(*small, "--phase", "e2e", "--from", str(base / f"blockap{bits}"), "--output", str(base / f"e2e{bits}"),
             "--e2e-train-size", "4", "--e2e-seqlen", "32", "--e2e-global-batch", "2", "--e2e-lr", "1e-3",
             "--ds-config", "single-gpu")
        out[f"block-ap+e2e-qp-w{bits}g64"] = base / f"e2e{bits}"
    return out


def test_every_run_writes_its_serving_formats_and_their_libraries_read_our_weights(exports):
    """compressed-tensors' decompressor (every width) and the gguf package + transformers (4-bit) on the
    exports each run wrote beside its GPTQ v2 files; `eqat-dist export` converts the same bytes later."""
    from eqat_dist.cli import main
    from serving_checks import check_compressed_tensors, check_gguf

    for name, folder in exports.items():
        written = sorted(p.name for p in folder.glob("export-*"))
        assert written == sorted(f"export-{f}" for f in SERVING_AT[name_bits(name)].split(",")), (name, written)
        assert check_compressed_tensors(folder, folder / "export-compressed-tensors") == 30 * 7, name
        if (folder / "export-gguf").exists():
            check_gguf(folder, folder / "export-gguf" / "model-Q4_1.gguf")
    e2e = exports["block-ap+e2e-qp-w2g64"]
    assert main(["export", "--from", str(e2e), "--format", "compressed-tensors", "--output", str(e2e.parent / "ct")]) == 0
    for file in (e2e / "export-compressed-tensors").iterdir():
        assert (e2e.parent / "ct" / file.name).read_bytes() == file.read_bytes(), file.name


def test_exported_config_is_accepted_by_transformers_and_names_the_method(exports):
    from transformers import GPTQConfig

    for name, folder in exports.items():
        for file in (folder / "quantize_config.json", folder / "config.json"):
            qc = json.loads(file.read_text())
            qc = qc.get("quantization_config", qc)
            parsed = GPTQConfig.from_dict(qc).to_dict()  # raised on damp_percent 0.0 before
            assert (parsed["bits"], parsed["sym"], parsed["desc_act"], parsed["checkpoint_format"]) == \
                   (int(name.split("-w")[1][0]), False, False, "gptq_v2")
            assert qc["meta"]["method"] == name.rsplit("-w", 1)[0]
            assert qc["meta"]["quantizer"][0].startswith("eqat-dist:")


@pytest.mark.slow
def test_gptqmodel_and_transformers_load_our_exports_with_our_logits(exports, interop_python, tmp_path):
    from eqat_dist.data.windows import eval_windows
    from eqat_dist.export import load_packed_model

    from eqat_dist.export.packed_source import PackedExport

    # each writer's GPTQ v2 files at each width (RTN at 2/3/4 bits and E2E-QP at 2/4; Block-AP's come from
    # RTN's writer, the same code at the same widths, and are read by the tests above), then the AWQ
    # exports of the 4-bit runs (same weights: the same reference logits); every load costs seconds
    loaded = {n: f for n, f in exports.items() if not n.startswith("block-ap-w")}
    folders = loaded | {f"{n} (awq)": f / "export-awq" for n, f in loaded.items() if (f / "export-awq").exists()}
    names = list(folders)
    tensors = {}
    for i, name in enumerate(names):
        source = exports[name.removesuffix(" (awq)")]
        model, tokenizer = load_packed_model(source)
        if i == 0:
            tensors["input_ids"] = eval_windows(tokenizer, "news", 128, 1)[:1].contiguous()
        with torch.no_grad():
            tensors[f"logits_{i}"] = model(input_ids=tensors["input_ids"]).logits.contiguous()
        if name.endswith("(awq)"):  # block 0's weights, for the exact check of GPTQModel's AWQ decoder
            packed = PackedExport(source)
            for layer_name, layer in packed.block(0)[0].items():
                tensors[f"weight_{i}:{packed.prefix}.0.{layer_name}"] = layer.dequantized().half().contiguous()
    save_file(tensors, tmp_path / "reference.safetensors")
    result = subprocess.run([interop_python, LOADERS, str(tmp_path / "reference.safetensors"),
                             *(str(folders[n]) for n in names)], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=THREADS))
    lines = [line for line in result.stdout.splitlines() if line.startswith("INTEROP ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    report = json.loads(lines[-1][len("INTEROP "):])
    print(json.dumps(report, indent=1))
    for name in names:
        r = report[str(folders[name])]
        if name.endswith("(awq)"):  # GPTQModel's AWQ kernels compute in fp16; transformers' in bf16 (aten)
            assert r["decoded_weights_equal"] and r["decoded_layers"] == 7, (name, r)
            assert r["gptqmodel"]["rel_l2"] <= 5e-3 and r["gptqmodel"]["top1_agree"] >= 0.95, (name, r)
            assert r["transformers"]["rel_l2"] <= 3e-2 and r["transformers"]["top1_agree"] >= 0.95, (name, r)
            continue
        assert r["gptqmodel"]["rel_max"] <= 1e-4, (name, r)
        assert r["transformers_torch_fp32"]["rel_max"] <= 1e-4, (name, r)
        assert r["transformers"]["rel_l2"] <= 2e-2 and r["transformers"]["top1_agree"] >= 0.95, (name, r)
