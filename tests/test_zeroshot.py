"""Zero-shot scoring: prompts as the harness builds them, batched log-likelihoods equal to one
request at a time, accuracy equal to an independent argmax, intervals right."""
import math

import torch

from conftest import tiny_model
from eqat_dist.eval.zeroshot import (PAPER_TASKS, _mean_stderr_ci, continuation_logprobs, encode_request,
                                     load_items, score_task)
from eqat_dist.models.loading import bundled_model_dir


def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(bundled_model_dir()))


def test_prompts_follow_the_harness_task_definitions():
    piqa, total = load_items("piqa", limit=3)
    assert total == 1838 and len(piqa) == 3
    assert piqa[0].contexts[0].startswith("Question: ") and piqa[0].contexts[0].endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in piqa[0].continuations) and piqa[0].gold in (0, 1)
    # WinoGrande's partial scoring: the options fill the blank, the rest of the sentence is scored.
    from eqat_dist.eval.zeroshot import _hellaswag, _winogrande
    wino = _winogrande({"sentence": "Sarah was better than Maria so _ got the easy cases.", "option1": "Sarah",
                        "option2": "Maria", "answer": "2"})
    assert wino.contexts == ["Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"]
    assert wino.continuations == [" got the easy cases."] * 2 and wino.gold == 1
    hs = _hellaswag({"activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                     "endings": ["is [title] up.", "b"], "label": "1"})
    assert hs.contexts[0] == "Roof: A man is on a roof. He" and hs.continuations == [" is. up.", " b"]
    arc, total = load_items("arc_challenge")
    assert total == len(arc) == 299 and all(0 <= a.gold < len(a.continuations) for a in arc)


def test_subsets_are_fixed_and_drawn_from_the_whole_split():
    a, _ = load_items("arc_easy", limit=20)
    b, _ = load_items("arc_easy", limit=20)
    full, _ = load_items("arc_easy")
    assert [x.contexts for x in a] == [x.contexts for x in b]
    assert all(x in full for x in a) and a != full[:20]


def test_continuation_tokens_are_the_tail_of_the_whole_string():
    tok = _tokenizer()
    ids, n = encode_request(tok, "Question: 2+2?\nAnswer: ", "4", None)  # trailing space moves over
    assert tok.decode(ids[-n:]) == " 4" and tok.decode(ids) == "Question: 2+2?\nAnswer: 4"
    ids_b, n_b = encode_request(tok, "Hello", " world", 7)
    assert ids_b[0] == 7 and tok.decode(ids_b[-n_b:]) == " world"


def _reference_logprob(model, ids, n_cont, max_length):
    """One request, no padding, no batching: the plain definition."""
    ids = ids[-(max_length + 1):]
    logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, ids[t]].item() for t in range(len(ids) - n_cont, len(ids)))


def test_batched_logprobs_equal_one_request_at_a_time():
    model = tiny_model("llama", vocab=300)
    gen = torch.Generator().manual_seed(0)
    requests = []
    for length in (5, 17, 9, 40, 3, 17, 33):
        ids = torch.randint(0, 300, (length,), generator=gen).tolist()
        requests.append((ids, int(torch.randint(1, length, (1,), generator=gen))))
    with torch.no_grad():
        got = continuation_logprobs(model, requests, "cpu", max_length=24, token_budget=50)
        want = [_reference_logprob(model, ids, n, 24) for ids, n in requests]
    assert max(abs(g - w) for g, w in zip(got, want)) < 1e-4


def test_accuracy_is_the_argmax_of_the_reference_logprobs():
    tok = _tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    result = score_task(model, tok, "arc_easy", "cpu", limit=12)
    items, _ = load_items("arc_easy", limit=12)
    hits, hits_norm = [], []
    with torch.no_grad():
        for item in items:
            lps = [_reference_logprob(model, *encode_request(tok, c, k, None), 2048)
                   for c, k in zip(item.contexts, item.continuations)]
            hits.append(max(range(len(lps)), key=lambda j: lps[j]) == item.gold)
            norm = [lp / len(k) for lp, k in zip(lps, item.continuations)]
            hits_norm.append(max(range(len(norm)), key=lambda j: norm[j]) == item.gold)
    assert result["items"] == 12 and result["split_items"] == 570
    assert result["acc"] == sum(hits) / 12 and result["acc_norm"] == sum(hits_norm) / 12
    assert result["acc_ci95"][0] <= result["acc"] <= result["acc_ci95"][1]


def test_wilson_interval_and_sample_stderr():
    r = _mean_stderr_ci([1.0] * 5 + [0.0] * 5)
    assert r["value"] == 0.5
    assert abs(r["ci95"][0] - 0.2366) < 1e-4 and abs(r["ci95"][1] - 0.7634) < 1e-4  # textbook Wilson n=10
    assert abs(r["stderr"] - math.sqrt(10 / 36) / math.sqrt(10)) < 1e-12  # harness: sample std / sqrt(n)
    assert set(PAPER_TASKS) == {"piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"}
