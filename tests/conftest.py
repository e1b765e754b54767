import os

import pytest
import torch

if not torch.cuda.is_available():  # DeepSpeed on CPU; the Triton kernels in Triton's interpreter on CPU tensors
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# model_type of each family eqat_dist.models.family.SUPPORTED_FAMILIES lists -> the name tiny_config takes
TINY_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma3_text": "gemma3"}


def tiny_config(arch: str = "llama", layers: int = 2, vocab: int = 256):
    """A small random decoder of each supported family (dims divisible by 32 for every bit width)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)  # q/k/v biases
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=16)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"] * (layers // 2) +
                                   ["sliding_attention"] * (layers % 2))
    raise ValueError(arch)


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0, vocab: int = 256):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, vocab), dtype=torch.float32)
    return model.eval()


@pytest.fixture(autouse=True)
def _environment_restored():
    """parse_args exports the launch (RANK, WORLD_SIZE, MASTER_PORT, ...) as a run must: undone after
    each test, so that no later test or launched child inherits a world of 1."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def llama():
    return tiny_model("llama")


# Threads of a run a test starts on the whole machine: the suite's own (`-n 2` workers run at 1 thread each,
# so that two runs side by side never oversubscribe the cores), else 2.
THREADS = os.environ.get("OMP_NUM_THREADS", "2")


def one_process_env() -> dict:
    """The environment of a run started by a test: one thread, DeepSpeed on CPU, a rendezvous on this
    machine at a port of its own (tests running side by side do not meet)."""
    import random

    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(random.randint(20000, 40000)))


BUNDLED_EVAL = ["--eval-datasets", "news", "--zeroshot-tasks", "", "--eval-seqlen", "64", "--eval-max-windows", "2",
                "--skip-fp-eval", "--no-tensorboard"]


@pytest.fixture(scope="session")
def bundled_rtn_w2(tmp_path_factory):
    """Round-to-nearest w2g64 of the bundled SmolLM2-135M, exported once for the whole test session
    (both xdist workers) for every test that starts E2E-QP from the real model (a read-only start:
    tests write their runs elsewhere)."""
    return shared_run(tmp_path_factory, "rtn-w2", ["--model", "smollm2-135m", "--wbits", "2", "--group-size", "64",
                                                   "--epochs", "0", "--phase", "block-ap", *BUNDLED_EVAL])


def export_tensors(folder) -> dict:
    """Every tensor of an export, whether it is one file or one shard per block."""
    from eqat_dist.export.gptq_v2 import LazyTensors
    return dict(LazyTensors(folder))


def sigint_as_default() -> None:
    """preexec_fn for a child that a test interrupts with SIGINT. A shell without job control (a CI job
    started in the background) starts its commands with SIGINT ignored, the children inherit that, and
    Python then installs no KeyboardInterrupt handler: the signal would be lost. The child gets the
    disposition an interactive terminal gives."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# The bundled model's RTN w4g64 with every 4-bit serving format, read (never written) by
# tests/test_interop.py and tests/test_serving_formats.py: one run for the whole suite.
RTN_W4_WITH_FORMATS = ["--model", "smollm2-135m", "--wbits", "4", "--group-size", "64", "--epochs", "0",
                       "--phase", "block-ap", "--export-format", "compressed-tensors,awq,gguf", "--eval-datasets", "",
                       "--zeroshot-tasks", "", "--skip-fp-eval", "--no-tensorboard"]


def shared_run(tmp_path_factory, name: str, argv: list[str]):
    """The run `launch/run.py *argv --output <shared>/name`, made once per test session however many
    pytest-xdist workers ask for it (pytest-xdist's recipe: the workers' common temporary root and a
    file lock); a read-only input for the tests that take it."""
    import subprocess
    import sys
    from pathlib import Path

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # every worker's basetemp sits in the session's one folder
    out = root / "shared-runs" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "results.json").exists():
            env = dict(os.environ, OMP_NUM_THREADS=THREADS, DS_ACCELERATOR="cpu")
            done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "launch" / "run.py"),
                                   *argv, "--output", str(out), "--overwrite", "--discard-unfinished"],
                                  capture_output=True, text=True, env=env)
            assert done.returncode == 0, done.stderr[-3000:]
    return out


# The files that start real runs, longest first (minutes each on 2 cores). `-n 2 --dist loadfile` hands
# files to the two workers in collection order, so a long file collected last left one worker idle for
# minutes at the end; longest first, the many short files fill the gaps.
LONGEST_FIRST = ("test_distributed.py", "test_e2e.py", "test_cli.py", "test_interop.py", "test_gpu_smoke.py",
                 "test_blockap.py", "test_engines.py", "test_serving_formats.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
