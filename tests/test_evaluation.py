"""Evaluation placement: a model that accelerate spread over several devices is never moved whole
(the harness used to call `.to(device)` on it: out of memory at 70B, a device mismatch below), and
the full-precision model goes where the run's ranks say."""
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model
from eqat_dist.config import EvalConfig
from eqat_dist.phases.evaluation import dispatched, evaluate, fp_device_map


@pytest.mark.slow
def test_a_model_dispatched_over_two_devices_is_evaluated_in_place(monkeypatch):
    from transformers import AutoTokenizer

    from eqat_dist.models.loading import bundled_model_dir

    model = tiny_model("llama", layers=2, vocab=49152)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    assert dispatched(model)

    def refuse(self, *args, **kwargs):
        raise AssertionError("a dispatched model was moved as a whole")

    for name in ("to", "cpu", "cuda"):
        monkeypatch.setattr(type(model), name, refuse)
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    settings = EvalConfig(datasets=("news",), seqlen=32, max_windows=2, batch_size=1, zeroshot_tasks=("piqa",),
                          zeroshot_limit=2)
    result = evaluate(model, tokenizer, settings, None, torch.device("cpu"), "fp")
    assert result["perplexity"]["news"]["ppl"] > 1 and result["zero_shot"]["piqa"]["items"] == 2


@pytest.mark.parametrize("device, ranks, gpus, expected", [
    (torch.device("cpu"), 1, 0, None),
    (torch.device("cuda", 3), 1, 8, {"": 3}),  # --single-gpu --device cuda:3: that GPU alone, however many exist
    (torch.device("cuda", 0), 1, 1, {"": 0}),
    (torch.device("cuda", 0), 8, 8, "balanced"),  # rank 0 of a node evaluates alone: over the node's GPUs
    (torch.device("cuda", 0), 2, 1, {"": 0}),
])
def test_the_full_precision_model_is_placed_by_the_run_not_by_the_gpus_visible(device, ranks, gpus, expected):
    assert fp_device_map(device, ranks, gpus) == expected


def test_waiting_ranks_hand_their_cached_gpu_memory_back_before_rank0_spreads_the_fp_model(monkeypatch):
    from eqat_dist.phases.blockap import wait_for_rank0

    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    wait_for_rank0(SimpleNamespace(barrier=lambda: events.append("barrier")))
    assert events == ["empty_cache", "barrier"]
