"""llama.cpp in the loop (issue 41): its tools built once from the llama.cpp sources that the
llama-cpp-python sdist on PyPI vendors (pinned), and the check that llama.cpp runs our GGUF as we run our
own export: `llama-perplexity` on the GGUF against our evaluation of the GPTQ v2 export on the same
token ids (llama.cpp's tokenization of the same text), the same windows and the same scored half.

    python bench/llama_cpp_engine.py build                                  # once: about 4 minutes on 2 cores
    python bench/llama_cpp_engine.py check RUN [--text wiki] [--ctx 512] [--chunks 8]
    python bench/llama_cpp_engine.py quantize MODEL_GGUF TYPE OUT [--imatrix-text boolq]   # llama.cpp's own types

RUN is a run's output folder (its GPTQ v2 export, and export-gguf/ beside it, or made here with `eqat-dist
export`). The tools live in $EQAT_CACHE/llama.cpp/<version>/bin (default ~/.cache/eqat-dist); set
EQAT_LLAMA_CPP to a folder holding them to use another build. llama-perplexity's protocol
(tools/perplexity/perplexity.cpp): the whole text tokenized once (a BOS first where the model adds one),
cut into windows of `ctx` tokens, each window's first token replaced by BOS where the model adds one,
and the second half of each window scored.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PIN = "llama-cpp-python==0.3.36"  # vendors llama.cpp of 2026-10: Q2_0 (ggml-org/llama.cpp#24448) included
TOOLS = ("llama-perplexity", "llama-tokenize", "llama-quantize", "llama-imatrix", "llama-completion")


def tools_dir() -> Path:
    if os.environ.get("EQAT_LLAMA_CPP"):
        return Path(os.environ["EQAT_LLAMA_CPP"])
    from eqat_dist.data.assets import cache_dir
    return cache_dir() / "llama.cpp" / PIN.split("==")[1] / "bin"


def tool(name: str) -> Path:
    path = tools_dir() / name
    if not path.exists():
        sys.exit(f"{path} is not built: run `python bench/llama_cpp_engine.py build` first (or set EQAT_LLAMA_CPP)")
    return path


def built() -> bool:
    return all((tools_dir() / name).exists() for name in TOOLS) and (tools_dir() / "convert").is_dir()


def build(jobs: int = 2) -> Path:
    """Download the pinned sdist, build the tools statically (no shared libraries to find later) and
    keep only them; a finished build is reused."""
    target = tools_dir()
    if built():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
                        PIN], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build_dir = Path(tmp) / "build"
        log = Path(tmp) / "build.log"
        with open(log, "w") as out:  # the compiler's warnings stay out of the caller's log
            for step in (["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                          "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                          "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"],
                         ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS]):
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode:
                    sys.exit(f"building llama.cpp failed ({' '.join(step[:2])}):\n{log.read_text()[-3000:]}")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name in TOOLS:
            shutil.copy2(build_dir / "bin" / name, partial / name)
        (partial / "convert").mkdir()
        for name in CONVERTER:  # llama.cpp's own HF -> GGUF converter and the gguf-py it is written for
            copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
            copy(source / name, partial / "convert" / name)
        partial.rename(target)
    return target


CONVERTER = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def float_gguf(model_folder: Path, out: Path, outtype: str = "f16") -> Path:
    """A float GGUF of an HF model by llama.cpp's own converter (the baselines start from it; it reads
    SentencePiece when a model has it: `pip install sentencepiece`)."""
    convert = tools_dir() / "convert"
    env = dict(os.environ, PYTHONPATH=f"{convert / 'gguf-py'}{os.pathsep}{convert}")
    subprocess.run([sys.executable, str(convert / "convert_hf_to_gguf.py"), str(model_folder), "--outtype", outtype,
                    "--outfile", str(out)], check=True, capture_output=True, env=env)
    return out


def eval_text(source: str, folder: Path, limit_chars: int = 400_000) -> Path:
    """The evaluation text as our perplexity reads it (documents joined with blank lines), as a file."""
    from eqat_dist.data.text import load_texts
    path = folder / f"{source}.txt"
    path.write_text("\n\n".join(load_texts(source))[:limit_chars])
    return path


def llama_tokens(gguf: Path, text: Path) -> list[int]:
    """llama.cpp's token ids of the whole file (BOS where the model adds one), by llama-tokenize."""
    done = subprocess.run([str(tool("llama-tokenize")), "-m", str(gguf), "-f", str(text), "--ids", "--log-disable"],
                          capture_output=True, text=True, check=True)
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("["))
    return list(ast.literal_eval(line))


def llama_perplexity(gguf: Path, text: Path, ctx: int, chunks: int, threads: int = 2) -> float:
    done = subprocess.run([str(tool("llama-perplexity")), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
                           "--chunks", str(chunks), "-b", str(ctx), "-t", str(threads)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"llama-perplexity failed:\n{done.stderr[-3000:]}")
    found = re.search(r"Final estimate: PPL = ([\d.]+)", done.stdout + done.stderr)
    return float(found.group(1))


def our_perplexity(export: Path, ids: list[int], ctx: int, chunks: int, bos: int | None) -> float:
    """Our evaluation of the GPTQ v2 export (float32, our loader) with llama-perplexity's protocol on
    llama.cpp's token ids."""
    import torch

    from eqat_dist.export import load_packed_model

    model, _ = load_packed_model(export)
    tokens = torch.tensor(ids)
    nll, count = 0.0, 0
    first = ctx // 2
    with torch.no_grad():
        for i in range(min(chunks, len(ids) // ctx)):
            window = tokens[i * ctx:(i + 1) * ctx].clone()
            if bos is not None:
                window[0] = bos
            logits = model(input_ids=window[None]).logits[0].double()
            scored = torch.log_softmax(logits[first:ctx - 1], dim=-1)
            nll -= scored.gather(1, window[first + 1:, None]).sum().item()
            count += ctx - 1 - first
    return math.exp(nll / count)


def adds_bos(export: Path, ids: list[int], text: Path) -> int | None:
    """The BOS id where llama.cpp put one first (the model's tokenizer adds it), else None."""
    from transformers import AutoTokenizer
    bos = AutoTokenizer.from_pretrained(export).bos_token_id
    plain = AutoTokenizer.from_pretrained(export)(text.read_text()[:200], add_special_tokens=False)["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos and plain[:1] != [bos] else None


def check(run: Path, source: str, ctx: int, chunks: int, tokens_from: Path | None = None,
          engine: bool = True) -> dict:
    """Both perplexities on the same token ids; the GGUF is the run's export-gguf, else written here. A run
    no GGUF type holds (`tokens_from`: a GGUF of the same tokenizer), or `engine` False, gets our figure alone."""
    from eqat_dist.export.gguf_file import block_type, file_name
    from eqat_dist.export.packed_source import PackedExport

    quant = PackedExport(run).quant
    gguf = None
    if block_type(quant) is not None:
        gguf = run / "export-gguf" / file_name(quant)
        if not gguf.exists():
            from eqat_dist.export.convert import convert
            gguf = convert(run, "gguf", Path(tempfile.mkdtemp()) / "gguf") / file_name(quant)
    with tempfile.TemporaryDirectory() as tmp:
        text = eval_text(source, Path(tmp))
        ids = llama_tokens(gguf or tokens_from, text)
        bos = adds_bos(run, ids, text)
        theirs = llama_perplexity(gguf, text, ctx, chunks) if gguf and engine else None
        ours = our_perplexity(run, ids, ctx, chunks, bos)
    return {"run": str(run), "grid": quant.tag(), "gguf": gguf.name if gguf else None, "text": source, "ctx": ctx,
            "chunks": chunks, "llama_cpp": theirs, "ours": ours,
            "relative": None if theirs is None else theirs / ours - 1, "bytes": gguf.stat().st_size if gguf else None}


def check_name(run: Path) -> str:
    """The GGUF file name of a run's grid (export-gguf/NAME)."""
    from eqat_dist.export.gguf_file import file_name
    from eqat_dist.export.packed_source import PackedExport
    return file_name(PackedExport(run).quant)


def file_perplexity(gguf: Path, source: str, ctx: int, chunks: int) -> float:
    """llama-perplexity of any GGUF on one of our evaluation texts."""
    with tempfile.TemporaryDirectory() as tmp:
        return llama_perplexity(gguf, eval_text(source, Path(tmp)), ctx, chunks)


def tensor_bytes(gguf: Path) -> dict[str, tuple[int, int, str]]:
    """{tensor: (bytes, elements, type)} of a GGUF, read by the gguf-py llama.cpp ships with these tools (the
    `gguf` package may predate a type, Q2_0), in a process of its own (both are called `gguf`)."""
    import json
    code = ("import json, sys, gguf; r = gguf.GGUFReader(sys.argv[1]); "
            "print(json.dumps({t.name: [int(t.n_bytes), int(t.n_elements), t.tensor_type.name] for t in r.tensors}))")
    env = dict(os.environ, PYTHONPATH=str(tools_dir() / "convert" / "gguf-py"))
    done = subprocess.run([sys.executable, "-c", code, str(gguf)], capture_output=True, text=True, check=True, env=env)
    return {k: tuple(v) for k, v in json.loads(done.stdout).items()}


def quantize(model_gguf: Path, kind: str, out: Path, imatrix_text: str | None = None) -> Path:
    """llama.cpp's own quantization of a float GGUF (the baselines), with an importance matrix computed by
    llama-imatrix on `imatrix_text` (our calibration text) where asked."""
    args = [str(tool("llama-quantize"))]
    if imatrix_text:
        with tempfile.TemporaryDirectory() as tmp:
            text = eval_text(imatrix_text, Path(tmp))
            matrix = out.with_suffix(".imatrix")
            subprocess.run([str(tool("llama-imatrix")), "-m", str(model_gguf), "-f", str(text), "-o", str(matrix),
                            "-c", "512", "--chunks", "64"], check=True, capture_output=True)
        args += ["--imatrix", str(matrix)]
    subprocess.run([*args, str(model_gguf), str(out), kind], check=True, capture_output=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--jobs", type=int, default=2)
    c = sub.add_parser("check")
    c.add_argument("run", type=Path)
    c.add_argument("--text", default="wiki")
    c.add_argument("--ctx", type=int, default=512)
    c.add_argument("--chunks", type=int, default=8)
    q = sub.add_parser("quantize")
    q.add_argument("model", type=Path)
    q.add_argument("kind")
    q.add_argument("out", type=Path)
    q.add_argument("--imatrix-text", default=None)
    a = p.parse_args()
    if a.command == "build":
        print(build(a.jobs))
    elif a.command == "check":
        r = check(a.run, a.text, a.ctx, a.chunks)
        print(f"{r['grid']} ({r['gguf']}, {r['bytes'] / 2**20:.1f} MiB), {r['text']} {r['chunks']} x {r['ctx']}: "
              f"llama.cpp {r['llama_cpp']:.3f}, ours {r['ours']:.3f} on the same tokens ({100 * r['relative']:+.2f}%)")
        sys.exit(0 if abs(r["relative"]) <= 0.02 else 1)
    else:
        print(quantize(a.model, a.kind, a.out, a.imatrix_text))


if __name__ == "__main__":
    main()
