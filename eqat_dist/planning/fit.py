"""Does a plan fit a machine, and which flags make it fit; the text and JSON a user reads."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .arch import Arch
from .estimate import (BUS_BYTES_PER_S, EFFICIENCY, GIB, HOST_BASE, NETWORK_BYTES_PER_S, PEAK_TFLOPS, PHASES,
                       WEIGHT_WORK_S, Phase, Settings, block_ap, plan, resolved)


@dataclass(frozen=True)
class Machine:
    gpu_memory: float | None  # bytes per GPU; None on a CPU-only machine
    host_memory: float        # bytes per node
    disk: float | None        # free bytes where the run writes; None = not checked


def node_host(name: str, phase: Phase, s: Settings) -> float:
    """Host memory of one node: every rank of it holds its share in Block-AP and E2E-QP; in export and
    evaluation rank 0 works and the others wait."""
    on_node = min(s.ranks, s.ranks_per_node)
    if name in ("block-ap", "e2e"):
        return phase.host_peak * on_node
    return phase.host_peak + (on_node - 1) * HOST_BASE[s.device]


def problems(phases: dict[str, Phase], s: Settings, m: Machine) -> list[tuple[str, str, float, float]]:
    """(phase, resource, needed, available) for everything that does not fit."""
    out = []
    for name, p in phases.items():
        if s.device == "gpu" and m.gpu_memory is not None and p.gpu_peak > m.gpu_memory:
            out.append((name, "GPU memory per rank", p.gpu_peak, m.gpu_memory))
        if node_host(name, p, s) > m.host_memory:
            out.append((name, "host memory per node", node_host(name, p, s), m.host_memory))
    disk = max(p.disk for p in phases.values()) + (phases["export"].disk if "export" in phases else 0)
    if m.disk is not None and disk > m.disk:
        out.append(("all", "disk", disk, m.disk))
    return out


# What a block's training may leave of a GPU to the stores: 90% of its memory less the plan's peak
# and a fifth more (the peak is an estimate; an out-of-memory error mid-run costs more than host memory).
GPU_USABLE, PEAK_MARGIN = 0.9, 1.2


def stores_on_gpu_to_fit(arch: Arch, s: Settings, m: Machine) -> float | None:
    """Bytes per rank of the host stores to keep on the GPU so that Block-AP fits the node's host memory
    (a tenth more than it takes, whole GiB), or None when the GPU has not that much room to spare."""
    if s.device != "gpu" or m.gpu_memory is None or s.streams.placement == "gpu":
        return None
    phase = block_ap(arch, s.changed({"streams.on_gpu_gib": 0.0}))
    over = (node_host("block-ap", phase, s) - m.host_memory) / min(s.ranks, s.ranks_per_node)
    room = GPU_USABLE * m.gpu_memory - PEAK_MARGIN * phase.gpu_peak
    want = math.ceil(1.1 * over / GIB) * GIB
    stores = phase.terms.get("host: activation stores", 0.0)
    return want if 0 < want <= min(room, stores) else None


def _gpu_rows_fix(arch: Arch, s: Settings, m: Machine):
    want = stores_on_gpu_to_fit(arch, s, m) if s.streams.placement == "cpu" else None
    return None if want is None else (f"`activations_on_gpu` {want / GIB:.0f}", {"streams.on_gpu_gib": want / GIB})


# The settings that relieve each (phase, resource), tried in order: (setting text, change of settings),
# or a function of (arch, settings, machine) that gives one or None; the command line shows each
# setting as its flag (cli.flag_message).
FIXES = {
    ("block-ap", "host memory per node"): [_gpu_rows_fix, ("`activations` disk", {"streams.placement": "disk"})],
    ("block-ap", "GPU memory per rank"): [("`activations` cpu", {"streams.placement": "cpu"}), ("`batch_size` 1", {"blockap.batch_size": 1})],
    ("e2e", "GPU memory per rank"): [("`ds_config` zero3-offload", {"zero_stage": 3, "offload": True}),
                                     ("`e2e_micro_batch` 1", {"e2e.micro_batch": 1})],
    ("e2e", "host memory per node"): [("`ds_config` zero3", {"zero_stage": 3, "offload": False})],
    ("eval", "GPU memory per rank"): [("`skip_fp_eval`", {"evaluation.skip_fp": True}),
                                      ("`eval_datasets` '' `zeroshot_tasks` '' (evaluate later with `phase` eval "
                                       "on a larger machine)", {"evaluation.datasets": (), "evaluation.zeroshot_tasks": ()})],
    ("eval", "host memory per node"): [("`skip_fp_eval`", {"evaluation.skip_fp": True})],
    ("all", "disk"): [("`activations` cpu", {"streams.placement": "cpu"}), ("`e2e_keep_checkpoints` 1", {"e2e.keep_checkpoints": 1})],
}


def _planned(arch: Arch, s: Settings, phases) -> dict[str, Phase]:
    return {k: v for k, v in plan(arch, s).items() if phases is None or k in phases}


def advise(arch: Arch, s: Settings, m: Machine, phases=None) -> tuple[list[str], Settings]:
    """Flags that make the run fit (as far as these flags can), and the settings with them applied."""
    advice, changed = [], set()
    for _ in range(8):
        todo = problems(_planned(arch, s, phases), s, m)
        if not todo:
            break
        name, resource, needed, _ = todo[0]
        for fix in FIXES.get((name, resource), []):
            fix = fix(arch, s, m) if callable(fix) else fix
            if fix is None:
                continue
            flag, change = fix
            if changed & set(change):
                continue  # never undo an earlier fix (disk <-> host memory)
            trial = s.changed(change)
            after = {(p, r): n for p, r, n, _ in problems(_planned(arch, trial, phases), trial, m)}
            if trial != s and after.get((name, resource), 0) < needed:  # relieves it, if not yet enough
                advice.append(flag)
                changed |= set(change)
                s = trial
                break
        else:
            return advice, s  # nothing here fixes it: more ranks, or a bigger machine
    return advice, s


def report(arch: Arch, s: Settings, m: Machine, phases=None) -> dict:
    """The plan, whether it fits, and the flags that make it fit. `phases`: only those that will run
    (--phase e2e skips Block-AP, ...); all by default."""
    todo = problems(_planned(arch, s, phases), s, m)
    advice, fixed = advise(arch, s, m, phases) if todo else ([], s)
    still = problems(_planned(arch, fixed, phases), fixed, m)
    phases = plan(arch, s)
    r = resolved(arch, s)
    return {"model": arch.name, "params_b": arch.total_params / 1e9, "settings": {
                "ranks": s.ranks, "ranks_per_node": s.ranks_per_node, "device": s.device, "gpu": s.gpu,
                "wbits": s.quant.bits, "group_size": s.quant.group_size, "student_input": s.mode,
                "data_parallel": s.data_width, "sequence_parallel": s.split, "group_ranks": s.width,
                "weight_work": "split" if r.splits_weight_work else "replicated", "groups": s.groups},
            "layouts": layouts(arch, s) if s.ranks > 1 and s.blockap.epochs > 0 else [],
            "machine": {"gpu_memory_gib": None if m.gpu_memory is None else m.gpu_memory / GIB,
                        "host_memory_gib": m.host_memory / GIB, "disk_gib": None if m.disk is None else m.disk / GIB},
            "phases": {k: v.as_dict() for k, v in phases.items()}, "fits": not todo,
            "problems": [{"phase": p, "resource": r, "needed_gib": n / GIB, "available_gib": a / GIB}
                         for p, r, n, a in todo],
            "advice": advice, "fits_with_advice": not still,
            "assumptions": assumptions(s)}


# What the schedules that leave the paper's arithmetic cost, as measured (docs/benchmarks.md, the bundled
# model, perplexity after Block-AP against the paper's scheme on one rank); at 70B not measurable here.
PRICES = {"pipelined": "+5% to +10% perplexity at w2g64 (correction 0.75 to 0.5), +2% at w3g64, on SmolLM2-135M",
          "teacher": "+12% to +21% perplexity at w2g64, +2% at w3g64, on SmolLM2-135M"}


def _candidates(s: Settings):
    """Every layout the run could take on these ranks: student mode in groups of D x S (the paper's
    arithmetic), and the other schedules in groups of D as the run chooses them."""
    for width in (w for w in range(1, s.ranks + 1) if s.ranks % w == 0):
        for d in (d for d in range(1, width + 1) if width % d == 0 and s.blockap.batch_size % d == 0):
            sp = width // d
            if sp > 1 and s.blockap.seqlen % (2 * sp):
                continue
            for work in (("replicated", "split") if width > 1 else ("replicated",)):
                yield s.changed({"blockap.student_input": "student", "blockap.data_parallel": d,
                                 "blockap.sequence_parallel": sp, "machine.weight_work": work})
    for mode in PRICES:
        yield s.changed({"blockap.student_input": mode, "blockap.data_parallel": None, "blockap.sequence_parallel": None,
                         "blockap.correction_fraction": 0.0 if mode == "teacher" else 1.0 / (s.ranks // layout_of(s, mode)[0])})


def layout_of(s: Settings, mode: str) -> tuple[int, int]:
    return s.changed({"blockap.student_input": mode, "blockap.data_parallel": None,
                      "blockap.sequence_parallel": None}).layout


def layouts(arch: Arch, s: Settings) -> list[dict]:
    """The fastest layout at the paper's arithmetic (student mode) and the fastest of each schedule that
    trades it for speed, with its known price: hours of Block-AP and the flags that ask for it."""
    best = {}
    for c in _candidates(s):
        c = resolved(arch, c)
        hours = block_ap(arch, c).seconds / 3600
        key = "student" if c.mode == "student" else c.mode
        if key not in best or hours < best[key][0]:
            best[key] = (hours, c)
    out = []
    exact = best["student"][0]
    for mode, (hours, c) in best.items():
        if mode != "student" and (c.groups == 1 or hours >= exact):
            continue  # one group: the paper's scheme anyway; or no faster than it
        flags = [f"`student_input` {mode}"]
        if mode == "student":
            flags += [f"`data_parallel` {c.data_width}", f"`sequence_parallel` {c.split}",
                      f"`weight_work` {'split' if c.splits_weight_work else 'replicated'}"]
        out.append({"mode": mode, "hours": hours, "flags": " ".join(flags), "price": PRICES.get(mode, "none: the "
                    "paper's arithmetic"), "groups": c.groups, "group_ranks": c.width})
    return sorted(out, key=lambda o: (o["mode"] != "student", o["hours"]))


def assumptions(s: Settings) -> str:
    if s.tflops:
        speed = f"{s.tflops} TFLOP/s (`tflops`)"
    elif s.device == "cpu":
        speed = f"{PEAK_TFLOPS['cpu']} TFLOP/s (2 CPU cores, measured)"
    else:
        speed = (f"{s.gpu.upper()} {PEAK_TFLOPS[s.gpu]:.0f} TFLOP/s bf16 x efficiency "
                 + ", ".join(f"{k} {v:.0%}" for k, v in EFFICIENCY.items())
                 + " (fitted to the paper's A100 times for Llama-2-7B, not measured by us on a GPU; "
                 "`python bench/gpu_smoke.py --only scale7b` measures Block-AP's on yours, `--tflops` takes it)")
    text = (f"peaks per rank (the largest rank); host memory and disk per node of {min(s.ranks, s.ranks_per_node)} "
            f"rank(s); time from FLOPs at {speed}; activations {s.act_bytes * 8}-bit")
    if s.ranks > 1:
        device = "cpu" if s.device == "cpu" else s.gpu
        inside = f"{s.link_gbs:g} GB/s (`link_gbs`)" if s.link_gbs else f"{BUS_BYTES_PER_S[device] / 1e9:g} GB/s"
        across = f"{s.network_gbs:g} GB/s (`network_gbs`)" if s.network_gbs else \
            f"{NETWORK_BYTES_PER_S[s.device] / 1e9:g} GB/s"
        text += (f"; a group's collectives at {inside} inside a node and {across} across nodes (bus bandwidth); the "
                 f"weight work {WEIGHT_WORK_S[device] * 1e12:g} ps a weight a step (measured on an H200, scaled by "
                 "memory bandwidth)")
    return text


def render(r: dict) -> str:
    st, mc = r["settings"], r["machine"]
    gpu = "CPU only" if mc["gpu_memory_gib"] is None else f"{st['gpu'].upper()} {mc['gpu_memory_gib']:.0f} GiB"
    gpu += f" ({mc['gpu_note']})" if mc.get("gpu_note") else ""
    disk = "unchecked" if mc["disk_gib"] is None else f"{mc['disk_gib']:.0f} GiB"
    lines = [f"Plan: {r['model']} ({r['params_b']:.1f}B parameters), w{st['wbits']}g{st['group_size']}, "
             f"{st['ranks']} rank(s), {st['ranks_per_node']} per node, {gpu}, host {mc['host_memory_gib']:.0f} GiB "
             f"per node, disk {disk}; Block-AP in {st['student_input']} mode" + _group_words(st),
             "", f"{'phase':<9} {'GPU peak/rank':>14} {'host peak/rank':>15} {'disk/node':>10} {'hours':>7}"]
    for name in PHASES:
        p = r["phases"][name]
        lines.append(f"{name:<9} {p['gpu_peak_gib']:>10.1f} GiB {p['host_peak_gib']:>11.1f} GiB "
                     f"{p['disk_gib']:>6.0f} GiB {p['hours']:>7.2f}   {p['note']}")
    lines.append("")
    if r["fits"]:
        lines.append("Fits this machine.")
    else:
        for pr in r["problems"]:
            lines.append(f"Does not fit: {pr['phase']} needs {pr['needed_gib']:.1f} GiB of {pr['resource']}, "
                         f"{pr['available_gib']:.1f} GiB available.")
        if r["advice"]:
            verdict = "fits" if r["fits_with_advice"] else "still does not fit (more ranks or a bigger machine)"
            lines.append(f"With {' '.join(r['advice'])}: {verdict}.")
        else:
            lines.append("No flag makes it fit: use more ranks or a machine with more memory.")
    for layout in r.get("layouts", []):
        lines.append(f"Layout: {layout['mode']} mode, {layout['groups']} group(s) of {layout['group_ranks']} "
                     f"({layout['flags']}): Block-AP {layout['hours']:.2f} h; price: {layout['price']}.")
    lines.append(f"Assumptions: {r['assumptions']}.")
    return "\n".join(lines)


def _group_words(st: dict) -> str:
    if st.get("group_ranks", st["data_parallel"]) <= 1:
        return ""
    parts = [f"{st['data_parallel']} data-parallel"] if st["data_parallel"] > 1 else []
    parts += [f"{st['sequence_parallel']} sequence-parallel"] if st.get("sequence_parallel", 1) > 1 else []
    return (f" over {st['groups']} group(s) of {st.get('group_ranks', st['data_parallel'])} ranks "
            f"({' x '.join(parts)}, weight work {st.get('weight_work', 'replicated')})")


def to_json(r: dict) -> str:
    return json.dumps(r, indent=2)
