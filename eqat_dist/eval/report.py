"""report.md: the figures of results.json as a short Markdown page a user can paste into a model card."""
from __future__ import annotations

import os
from pathlib import Path

METHOD_NAMES = {"rtn": "RTN", "block-ap": "Block-AP", "block-ap+e2e-qp": "Block-AP + E2E-QP", "e2e-qp": "E2E-QP"}
ROWS = (("fp", "full precision"), ("quantized", "{tag} {method}"), ("quantized_e2e", "{tag} {method} + E2E-QP"))


def _rows(results: dict) -> list[tuple[str, dict]]:
    s = results.get("settings", {})
    tag = f"w{s.get('wbits', '?')}g{s.get('group_size', '?')}"
    method = {"block-ap": "Block-AP", "rtn": "RTN"}.get(results.get("method"), results.get("method") or "")
    rows = [(label.format(tag=tag, method=method).strip(), results[key]) for key, label in ROWS if key in results]
    if "eval" in results:  # a later --phase eval
        ev = results["eval"]
        made_by = METHOD_NAMES.get(ev.get("method"), "")
        rows += [(f"{tag} {made_by} from {Path(ev['model_dir']).name} (--phase eval)".replace("  ", " "), ev["quantized"])]
        if "fp" in ev and "fp" not in results:
            rows.insert(0, ("full precision", ev["fp"]))
    return rows


def _ppl_table(rows) -> list[str]:
    names = sorted({n for _, r in rows for n in r.get("perplexity", {})})
    if not names:
        return []
    sizes = {}
    for _, r in rows:
        for n, v in r.get("perplexity", {}).items():
            sizes.setdefault(n, f"{v['windows']} x {v['seqlen']}")
    lines = ["## Perplexity", "", "Non-overlapping windows (count x tokens): "
             + ", ".join(f"{n} {sizes[n]}" for n in names) + ".", "",
             "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, r in rows:
        cells = [f"{r['perplexity'][n]['ppl']:.2f}" if n in r.get("perplexity", {}) else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _zero_shot_table(rows) -> list[str]:
    tasks = []
    for _, r in rows:
        tasks += [t for t in r.get("zero_shot", {}) if t != "average" and t not in tasks]
    if not tasks:
        return []
    lines = ["## Zero-shot accuracy", "",
             "`acc` scored by lm-evaluation-harness (the paper's average uses it) +- its standard error; 95% "
             "Wilson interval and items scored in brackets.", "",
             "| model | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for label, r in rows:
        zs = r.get("zero_shot", {})
        cells = []
        for t in tasks:
            if t in zs:
                lo, hi = zs[t]["acc_ci95"]
                cells.append(f"{100 * zs[t]['acc']:.1f} +-{100 * zs[t]['acc_stderr']:.1f} ({100 * lo:.0f}-{100 * hi:.0f}, "
                             f"n={zs[t]['items']})")
            else:
                cells.append("-")
        avg = zs.get("average", {}).get("acc")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'-' if avg is None else f'{100 * avg:.1f}'} |")
    return lines + [""]


def _training(results: dict) -> list[str]:
    lines = []
    blocks = results.get("blocks")
    if blocks:
        change = [100 * (b["loss_after"] / b["loss_before"] - 1) for b in blocks if b.get("loss_before")]
        lines += ["## Block-AP", "",
                  f"{len(blocks)} blocks in {results.get('blockap_wall_s', 0):.0f} s on "
                  f"{results.get('settings', {}).get('ranks', 1)} rank(s); block MSE change "
                  f"{min(change):+.1f}% to {max(change):+.1f}% (median {sorted(change)[len(change) // 2]:+.1f}%).", ""]
    e2e = results.get("e2e")
    if e2e and e2e.get("losses"):
        lines += ["## E2E-QP", "",
                  f"{e2e['steps']} steps on {e2e['ranks']} rank(s) ({e2e.get('ds_config', '')}), loss "
                  f"{e2e['losses'][0]:.4f} -> {e2e['losses'][-1]:.4f}, {e2e['tokens_per_s']:.0f} tokens/s; "
                  f"integer weights unchanged: {e2e.get('integers_unchanged')}.", *_e2e_costs(e2e), ""]
    return lines


def _commands(results: dict) -> list[str]:
    """The command line of each phase's run (results.json records every flag), once when they agree."""
    runs = [(phase, record) for phase, record in (("Block-AP", results.get("run")),
                                                  ("E2E-QP", (results.get("e2e") or {}).get("run")),
                                                  ("evaluation", (results.get("eval") or {}).get("run"))) if record]
    if not runs:
        return []
    lines = ["## Command", ""]
    shown = []
    for phase, record in runs:
        if record["command"] in shown:
            continue
        shown.append(record["command"])
        lines += [f"{phase}:" if len(runs) > 1 else "", "", "```bash", record["command"], "```", ""]
    v = runs[-1][1].get("versions", {})
    lines += [", ".join(f"{k} {v[k]}" for k in ("eqat-dist", "torch", "transformers", "deepspeed") if k in v)
              + f"; {runs[-1][1]['launch']['ranks']} rank(s) on {runs[-1][1]['launch']['device']}.", ""]
    return [line for i, line in enumerate(lines) if line or (i and lines[i - 1])]  # no doubled blank lines


def render(results: dict) -> str:
    s = results.get("settings", {})
    head = [f"# eqat-dist: {s.get('model', '?')} at w{s.get('wbits', '?')}g{s.get('group_size', '?')}", ""]
    if "bits_per_weight" in s:
        head += [f"{s['bits_per_weight']:.3f} bits per quantized weight (scales and zero points included).", ""]
    rows = _rows(results)
    return "\n".join(head + _ppl_table(rows) + _zero_shot_table(rows) + _training(results) + _commands(results))


def write_report(path: Path, results: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render(results))
    os.replace(tmp, path)


def _e2e_costs(e2e: dict) -> list[str]:
    """Step time and peak memory per rank, when the run recorded them."""
    lines = []
    if e2e.get("step_seconds_median") is not None:
        lines.append(f"- Median step time {e2e['step_seconds_median']:.2f} s.")
    for rank, peaks in enumerate(e2e.get("peak_memory_mib_per_rank") or []):
        device = f", GPU {peaks['device']:.0f} MiB allocated" if "device" in peaks else ""
        device += f", {peaks['device_reserved']:.0f} MiB reserved" if "device_reserved" in peaks else ""
        lines.append(f"- Rank {rank} peak memory: host RSS {peaks['host_rss']:.0f} MiB{device}.")
    return lines
