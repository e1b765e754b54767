"""Zero-shot through lm-evaluation-harness: its own task definitions read the bundled data, the subset
is fixed, and its accuracy is the argmax of log-likelihoods computed here by the plain definition."""
import math

import datasets
import pytest
import torch

from conftest import tiny_model
from eqat_dist.eval.harness import (PAPER_TASKS, _bundled_files, _task_manager, _wilson, subset, task_config,
                                   zero_shot)
from eqat_dist.models.loading import bundled_model_dir


def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(bundled_model_dir()))


def _manager():
    from lm_eval.tasks import TaskManager
    return TaskManager()


@pytest.mark.slow
def test_tasks_are_the_harness_definitions_reading_the_bundled_validation_splits():
    manager = _manager()
    piqa = task_config("piqa", manager)
    assert piqa["doc_to_text"] == "Question: {{goal}}\nAnswer:" and piqa["doc_to_choice"] == "{{[sol1, sol2]}}"
    assert piqa["dataset_path"] == "arrow" and piqa["test_split"] is None
    assert all(f.endswith(".arrow") for f in piqa["dataset_kwargs"]["data_files"]["validation"])
    arc = task_config("arc_challenge", manager)  # the harness's include of arc_easy.yaml is resolved
    assert arc["doc_to_text"] == "Question: {{question}}\nAnswer:" and arc["test_split"] is None
    assert callable(task_config("hellaswag", manager)["process_docs"])  # the harness's own preprocessing
    sizes = {t: len(datasets.Dataset.from_file(_bundled_files(t)[0])) for t in PAPER_TASKS}
    # the index a run uses holds only our tasks' folders: the same YAMLs, the same configs
    narrow = _task_manager()
    assert len(narrow.all_tasks) < len(manager.all_tasks) / 100
    for t in PAPER_TASKS:
        assert narrow.task_index[t].yaml_path == manager.task_index[t].yaml_path, t
        assert repr(task_config(t, narrow)) == repr(task_config(t, manager)), t
    assert sizes == {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "winogrande": 1267}


def test_subsets_are_fixed_and_drawn_from_the_whole_split():
    a, b = subset(570, 20), subset(570, 20)
    assert a == b == sorted(a) and len(set(a)) == 20 and a != list(range(20)) and max(a) < 570
    assert subset(10, 50) == list(range(10)) and subset(10, None) == list(range(10))


def _reference_logprob(model, tok, context: str, continuation: str) -> float:
    """The plain definition, one request, no batching: continuation tokens are the whole string's
    tokens after the context's (the harness's convention); sum of their log-probabilities."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n = len(whole) - len(tok(context, add_special_tokens=False).input_ids)
    logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, whole[t]].item() for t in range(len(whole) - n, len(whole)))


@pytest.mark.slow
def test_harness_accuracy_is_the_argmax_of_reference_logprobs():
    tok = _tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    result = zero_shot(model, tok, ["arc_easy", "winogrande"], limit=10, batch_size=4)
    docs = datasets.Dataset.from_file(_bundled_files("arc_easy")[0])
    hits, hits_norm = [], []
    with torch.no_grad():
        for i in subset(len(docs), 10):
            d = docs[i]
            ctx, choices = f"Question: {d['question']}\nAnswer:", d["choices"]["text"]
            lps = [_reference_logprob(model, tok, ctx, " " + c) for c in choices]
            gold = d["choices"]["label"].index(d["answerKey"])
            hits.append(max(range(len(lps)), key=lps.__getitem__) == gold)
            norm = [lp / len(c) for lp, c in zip(lps, choices)]  # the harness: the choice text, no delimiter
            hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == gold)
        wino = datasets.Dataset.from_file(_bundled_files("winogrande")[0])
        wino_hits = []
        for i in subset(len(wino), 10):  # partial scoring: the options fill the blank, the rest is scored
            d = wino[i]
            blank = d["sentence"].index("_")
            rest = " " + d["sentence"][blank + 1:].strip()
            lps = [_reference_logprob(model, tok, d["sentence"][:blank] + d[o], rest) for o in ("option1", "option2")]
            wino_hits.append(max(range(2), key=lps.__getitem__) == int(d["answer"]) - 1)
    r = result["arc_easy"]
    assert r["items"] == 10 and r["split_items"] == 570 and r["scorer"] == "lm-evaluation-harness"
    assert r["acc"] == sum(hits) / 10 and r["acc_norm"] == sum(hits_norm) / 10
    assert result["winogrande"]["acc"] == sum(wino_hits) / 10 and "acc_norm" not in result["winogrande"]
    assert abs(r["acc_stderr"] - math.sqrt(r["acc"] * (1 - r["acc"]) / 9)) < 1e-9  # sample std / sqrt(n)
    assert result["average"]["acc"] == (r["acc"] + result["winogrande"]["acc"]) / 2


def test_wilson_interval():
    lo, hi = _wilson(0.5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4  # textbook Wilson, n=10
