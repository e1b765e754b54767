"""How long a zero-shot evaluation of the bundled model takes, and where: the harness's task index, the
task set-up and the model's forwards (a run evaluates twice: the full-precision and the quantized model).

    OMP_NUM_THREADS=1 python bench/zero_shot_time.py [--tasks arc_easy,piqa] [--limit 12] [--repeats 2]

Prints, for each repeat, the wall time of `eval.harness.zero_shot` and its accuracies (which must not
change between repeats or releases of this script), and how long building the task index took.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch

    from eqat_dist.eval import harness
    from eqat_dist.models.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    tasks = harness.parse_tasks(args.tasks)
    start = time.perf_counter()
    index = harness._task_manager()
    print(f"task index: {len(index.all_tasks)} names in {time.perf_counter() - start:.1f} s", flush=True)
    for repeat in range(args.repeats):
        start = time.perf_counter()
        result = harness.zero_shot(model, tokenizer, tasks, limit=args.limit)
        accs = ", ".join(f"{t} {result[t]['acc']:.4f}" for t in tasks)
        print(f"zero-shot {repeat + 1}: {time.perf_counter() - start:.1f} s ({accs}; {args.limit} items a task, "
              f"{torch.get_num_threads()} thread(s))", flush=True)


if __name__ == "__main__":
    main()
