"""The planner: parameter counts of real architectures, the paper's measured GPU peaks, JSON shape,
advice that makes a 70B run fit, plans from config.json alone, and the refusal before a run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eqat_dist.cli import build_plan_parser, main
from eqat_dist.config.from_flags import settings_from_flags
from eqat_dist.settle import for_plan
from eqat_dist.planning import GIB, Machine, estimate, load_arch, plan, report, settings_for

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["--wbits", "2", "--group-size", "64", "--train-size", "4096", "--seqlen", "2048", "--batch-size", "2",
         "--epochs", "2", "--activations", "cpu", "--e2e-train-size", "4096", "--e2e-seqlen", "4096",
         "--e2e-micro-batch", "1", "--ds-config", "single-gpu"]  # the official code: one GPU, no DeepSpeed


def _plan(model, flags, ranks=1, device="gpu"):
    args = build_plan_parser().parse_args(["--model", model, *flags])
    return plan(load_arch(model), _settings(args, ranks, min(ranks, 8), device))


def _settings(flags, ranks, ranks_per_node, device):
    """The plan's settings of a command's flags on `ranks` ranks (as `eqat-dist plan` builds them)."""
    return settings_for(for_plan(settings_from_flags(flags), ranks, ranks), ranks, ranks_per_node, device)


def test_parameter_counts_of_the_bundled_architectures():
    expected = {"llama-2-7b": 6.738e9, "llama-2-70b": 68.977e9, "llama-3-8b": 8.030e9, "qwen2.5-72b": 72.706e9}
    for name, count in expected.items():
        assert abs(load_arch(name).total_params / count - 1) < 0.005, name


@pytest.mark.parametrize("model, blockap_gib, e2e_gib", [("llama-2-7b", 8.5, (5.6, 7.0)),
                                                         ("llama-2-70b", 29.9, (34.0, 48.0))])
def test_plan_reproduces_the_papers_gpu_peaks_on_one_a100(model, blockap_gib, e2e_gib):
    phases = _plan(model, PAPER)
    assert abs(phases["block-ap"].gpu_peak / GIB / blockap_gib - 1) <= 0.25
    assert e2e_gib[0] * 0.75 <= phases["e2e"].gpu_peak / GIB <= e2e_gib[1] * 1.25


def test_e2e_gpu_peak_counts_zeros_gradient_bucket_from_the_deepspeed_config(tmp_path):
    """DeepSpeed allocates its gradient bucket (`reduce_bucket_size` elements) whole on the GPU when the
    engine starts, however few parameters train: on the H200 the bundled model's E2E-QP peaked at 1.4 GiB
    allocated against 0.28 GiB planned without it. Read from the run's own config; none without ZeRO."""
    config = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    config["zero_optimization"]["reduce_bucket_size"] = 50_000_000
    small = tmp_path / "small_bucket.json"
    small.write_text(json.dumps(config))
    flags = [f for f in PAPER if f != "single-gpu"]
    peaks = {name: _plan("llama-2-7b", flags + [name])["e2e"].gpu_peak for name in ("zero3-offload", str(small))}
    assert peaks["zero3-offload"] - peaks[str(small)] == pytest.approx((500_000_000 - 50_000_000) * 2)  # 16-bit
    terms = _plan("llama-2-7b", PAPER)["e2e"].terms
    assert not any("bucket" in name for name in terms)  # single-gpu: ZeRO stage 0


def test_json_plan_has_every_phase_and_a_verdict(capsys):
    code = main(["plan", "--model", "llama-2-70b", *PAPER, "--ranks", "1", "--gpu-memory", "80",
                 "--host-memory", "1024", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert set(result["phases"]) == {"block-ap", "e2e", "export", "eval"}
    for phase in result["phases"].values():
        assert {"gpu_peak_gib", "host_peak_gib", "disk_gib", "hours"} <= set(phase)
    assert isinstance(result["fits"], bool) and isinstance(result["advice"], list)
    assert code == (0 if result["fits"] else 1)


def test_advice_makes_70b_at_the_papers_budget_fit_one_node_of_eight_gpus():
    """In groups of 2 data-parallel ranks (pipelined across them) every rank holds 130 GiB of activation
    stores: 1.08 TiB a node, over its 1 TiB; the advice keeps the rest on the GPUs, or on disk."""
    flags = [f for f in PAPER if f not in ("single-gpu",)] + ["zero3-offload", "--student-input", "pipelined"]
    args = build_plan_parser().parse_args(["--model", "llama-2-70b", *flags])
    arch, s = load_arch("llama-2-70b"), _settings(args, 8, 8, "gpu")
    node = Machine(gpu_memory=80 * GIB, host_memory=1024 * GIB, disk=8000 * GIB)
    r = report(arch, s, node)
    assert not r["fits"]
    assert r["advice"] == ["`activations_on_gpu` 11"] and r["fits_with_advice"]  # the rest: the GPU's free memory
    small = report(arch, s, Machine(gpu_memory=80 * GIB, host_memory=512 * GIB, disk=8000 * GIB))
    assert small["advice"] == ["`activations` disk"] and small["fits_with_advice"]  # more than a GPU has free
    # one rank per GPU shares the work: Block-AP wall time falls about N-fold in teacher mode, and in
    # pipelined mode (1/4 of each block's steps on the quantized stream, one block after another)
    alone = report(arch, _settings(args, 1, 1, "gpu"), node)["phases"]["block-ap"]["hours"]
    assert r["phases"]["block-ap"]["hours"] < alone / 4
    teacher = build_plan_parser().parse_args(["--model", "llama-2-70b", *flags[:-1], "teacher"])
    assert report(arch, _settings(teacher, 8, 8, "gpu"), node)["phases"]["block-ap"]["hours"] < alone / 7


@pytest.mark.slow
def test_plan_needs_only_config_json(tmp_path):
    (tmp_path / "config.json").write_text((ROOT / "eqat_dist" / "planning" / "configs" / "llama-2-7b.json").read_text())
    done = subprocess.run([sys.executable, "-m", "eqat_dist.cli", "plan", "--model", str(tmp_path), "--json",
                           "--host-memory", "512"], capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    assert json.loads(done.stdout)["params_b"] == pytest.approx(6.738, rel=0.005)
    bad = subprocess.run([sys.executable, "-m", "eqat_dist.cli", "plan", "--model", str(tmp_path), "--group-size",
                          "96"], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not divide" in bad.stderr


@pytest.mark.slow
def test_a_run_that_will_not_fit_is_refused_before_any_work(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "--model", "smollm2-135m", "--output", str(tmp_path / "o"),
           "--train-size", "5000", "--seqlen", "2048", "--activations", "cpu"]  # 45 GiB of stores in host memory
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "o").exists()
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("eqat-dist: error: this run will not fit this machine (block-ap needs")
    assert "--ignore-plan" in line and ("try --activations disk" in line or "no flag makes it fit" in line)


def test_without_activations_flag_the_stores_go_to_disk_when_they_exceed_the_host_budget(tmp_path, monkeypatch):
    from eqat_dist.cli import settings

    from eqat_dist.cluster.launch import free_port

    monkeypatch.setenv("WORLD_SIZE", "8")  # rank 0 of 8 on one node, as torchrun would start it
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    model = tmp_path / "llama-2-70b"  # its config.json: all the checks and the plan read
    model.mkdir()
    (model / "config.json").write_text((ROOT / "eqat_dist" / "planning" / "configs" / "llama-2-70b.json").read_text())
    common = ["--model", str(model), "--output", str(tmp_path / "o"), "--wbits", "2", "--group-size", "64"]
    # the default on 8 CPU ranks: one group of 2 x 4 (the paper's arithmetic), each rank 1/8 of the 512 GiB
    # of float32 stores (the fp stream in place, the quantized one); 256 GiB of budget is not enough
    args, notes = settings([*common, "--host-memory-budget", "256"])
    line = notes[0]
    assert args.streams.placement == "disk" and "over the 256.0 GiB budget: they go to disk" in line
    roomy, notes = settings([*common, "--host-memory-budget", "8192"])
    assert notes == [] and roomy.streams.placement == "cpu"
    chosen, notes = settings([*common, "--host-memory-budget", "1", "--activations", "cpu"])
    assert notes == [] and chosen.streams.placement == "cpu"  # the user's choice stands


def test_on_gpus_the_stores_keep_rows_on_the_gpu_before_they_go_to_disk(tmp_path, monkeypatch):
    """Without `activations`, on a node of 8 x 80 GB GPUs with a 1 TiB budget, the paper's 70B w2 run keeps
    11 GiB of each rank's stores on its GPU and the rest in host memory; with a 512 GiB budget the GPUs
    cannot take enough and the stores go to disk. (The GPU is faked: only its memory size is read.)"""
    from dataclasses import replace
    from types import SimpleNamespace

    import torch

    from eqat_dist.cli import settings
    from eqat_dist.cluster.launch import free_port
    from eqat_dist.settle import placement_for

    for name, value in (("WORLD_SIZE", "8"), ("LOCAL_WORLD_SIZE", "8"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    model = tmp_path / "llama-2-70b"
    model.mkdir()
    (model / "config.json").write_text((ROOT / "eqat_dist" / "planning" / "configs" / "llama-2-70b.json").read_text())
    flags = [f for f in PAPER if f not in ("--activations", "cpu", "--ds-config", "single-gpu")] + \
        ["--student-input", "pipelined"]  # groups of 2: 130 GiB of stores a rank
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
    for budget, placement, on_gpu in (("1024", "cpu", 11.0), ("512", "disk", None)):
        cfg, _ = settings(["--model", str(model), "--output", str(tmp_path / "o"), *flags, "--host-memory-budget", budget,
                           "--activations", "cpu"])
        on_a_gpu = replace(cfg, machine=replace(cfg.machine, device=torch.device("cuda", 0)),
                           streams=replace(cfg.streams, placement=None))
        chosen, kept, line = placement_for(on_a_gpu)
        assert (chosen, kept) == (placement, on_gpu), line
        assert ("11 GiB of them per rank stay on the GPU" in line) == (placement == "cpu")
    given = replace(on_a_gpu, streams=replace(on_a_gpu.streams, host_memory_budget_gib=1024, on_gpu_gib=0.0))
    assert placement_for(given)[:2] == ("disk", None)  # `activations_on_gpu` 0: the user keeps the GPU free


def test_timeline_model_of_the_block_ap_schedules():
    """Hand-checkable cases: with no forward or transfer time, teacher mode on N ranks takes ceil(L/N)
    blocks' training, student mode L whatever N, and pipelined mode sits between, reaching teacher
    mode's time while its correction share c is at most 1/N and student mode's at c = 1."""
    from eqat_dist.planning.timeline import BlockTimes, blockap_seconds, speedups

    t = BlockTimes(train=10.0, forward=0.0)
    assert blockap_seconds(30, 1, "student", t) == blockap_seconds(30, 1, "teacher", t) == 300
    assert blockap_seconds(30, 4, "teacher", t) == 80 and blockap_seconds(30, 4, "student", t) == 300
    assert blockap_seconds(30, 4, "pipelined", t, correction=1.0) == 300
    assert blockap_seconds(32, 4, "pipelined", t, correction=0.25) == pytest.approx(80 + 7.5)  # the last block's tail
    slow_chain = blockap_seconds(32, 4, "pipelined", t, correction=0.5)
    assert slow_chain == pytest.approx(32 * 5 + 5)  # chain-bound: c x T per block, one after another
    # forward and transfer times add to every block's chain in student and pipelined mode
    with_io = BlockTimes(train=10.0, forward=1.0, transfer=0.5)
    assert blockap_seconds(2, 2, "student", with_io) == pytest.approx(1 + 10 + 1 + 0.5 + 10 + 1)
    assert speedups(32, with_io)["teacher"][8] > speedups(32, with_io)["pipelined"][8] > 1


def test_data_parallel_layout_divides_each_ranks_stores_and_its_time(monkeypatch):
    """D ranks per group: each holds 1/D of every stream (blockap/lanes.py) and trains 1/D of each step;
    the groups take the blocks round-robin (the timeline over G = N/D)."""
    arch, node = load_arch("llama-2-70b"), Machine(gpu_memory=80 * GIB, host_memory=1024 * GIB, disk=8000 * GIB)
    flags = [f for f in PAPER if f != "single-gpu"] + ["zero3-offload"]

    def block_ap(*extra, ranks=8):
        args = build_plan_parser().parse_args(["--model", "llama-2-70b", *flags, *extra])
        r = report(arch, _settings(args, ranks, min(ranks, 8), "gpu"), node)
        return r, r["phases"]["block-ap"]

    stores = {d: block_ap("--batch-size", "8", "--student-input", "student", "--data-parallel", str(d))[1]
              ["terms_gib"]["host: activation stores"] for d in (1, 2, 4, 8)}
    for d in (2, 4, 8):
        assert stores[d] == pytest.approx(stores[1] / d, rel=1e-3)
    alone = block_ap(ranks=1)[1]["hours"]
    # the default on 8 ranks at global batch 8: one group of 8, student mode, the stores in host memory
    r, phase = block_ap("--batch-size", "8")
    assert r["settings"]["data_parallel"] == 8 and r["settings"]["student_input"] == "student" and r["fits"]
    assert phase["hours"] <= alone / 6.4
    # asked at the paper's batch 2: 4 groups of 2, pipelined across them (1/4 of the steps), two stores per
    # split (the quantized stream lands in the spent fp input's); 1.08 TiB of host memory on the node, so a
    # tenth more than the excess stays on each GPU, and the stores stay off disk
    r, phase = block_ap("--student-input", "pipelined")
    assert (r["settings"]["data_parallel"], r["settings"]["groups"], r["settings"]["student_input"]) == (2, 4, "pipelined")
    assert "last 25% of each block's steps" in phase["note"]
    assert phase["terms_gib"]["host: activation stores"] == pytest.approx(stores[2])  # student's two, at D = 2
    assert not r["fits"] and r["advice"] == ["`activations_on_gpu` 11"] and r["fits_with_advice"]
    fitted, phase = block_ap("--student-input", "pipelined", "--activations-on-gpu", "11")
    assert fitted["fits"] and phase["disk_gib"] < 100 and phase["gpu_peak_gib"] <= 0.9 * 80
    assert phase["terms_gib"]["device: activation stores kept on the GPU"] == 11
    assert phase["host_peak_gib"] * 8 <= 1024
    # and at least 6.4x one rank (0.8 N): the quantized stream goes on in the order the next group reads
    # it (pipelines/stream_order.py); received whole, the chain of blocks held it below
    assert phase["hours"] <= alone / 6.4
    monkeypatch.setattr(estimate, "stream_lead", lambda s, t, val: t.forward)  # the receiver waits for all of it
    whole = block_ap("--student-input", "pipelined", "--activations-on-gpu", "11")[1]
    monkeypatch.undo()
    assert alone / whole["hours"] < alone / phase["hours"]
    # two nodes: a group that spans them sums its gradients over the slower link
    within = block_ap("--batch-size", "16", "--data-parallel", "8", "--weight-work", "replicated", ranks=16)[1]
    across = block_ap("--batch-size", "16", "--data-parallel", "16", "--weight-work", "replicated", ranks=16)[1]
    assert float(across["note"].split("gradient sums ")[1].split("%")[0]) > \
        float(within["note"].split("gradient sums ")[1].split("%")[0])


def test_the_default_on_a_node_of_eight_gpus_is_the_papers_arithmetic_in_one_sequence_parallel_group():
    """Llama-2-70B w2g64 at the paper's budget on 8 x 80 GB with 1 TiB: student mode (the paper's
    arithmetic) in one group of 2 data-parallel x 4 sequence-parallel ranks, the weight work split where
    the plan finds it faster; every stream's 1/8 per rank, so the stores fit host memory (no disk, no
    GPU share), and Block-AP within 6 h; the faster layouts that trade the arithmetic are named with their
    price; on two nodes the groups (one a node) keep the student scheme."""
    arch, node = load_arch("llama-2-70b"), Machine(gpu_memory=80 * GIB, host_memory=1024 * GIB, disk=8000 * GIB)
    flags = [f for f in PAPER if f != "single-gpu"] + ["zero3-offload"]

    def planned(*extra, ranks=8):
        args = build_plan_parser().parse_args(["--model", "llama-2-70b", *flags, *extra])
        return report(arch, settings_for(for_plan(settings_from_flags(args), ranks, min(ranks, 8)), ranks,
                                         min(ranks, 8), "gpu"), node)

    r = planned()
    st, phase = r["settings"], r["phases"]["block-ap"]
    assert (st["student_input"], st["data_parallel"], st["sequence_parallel"], st["groups"]) == ("student", 2, 4, 1)
    assert st["weight_work"] == "split" and r["fits"] and r["advice"] == []
    assert phase["disk_gib"] < 100 and "device: activation stores kept on the GPU" not in phase["terms_gib"]
    assert phase["terms_gib"]["host: activation stores"] == pytest.approx(
        planned("--data-parallel", "1", "--sequence-parallel", "1", ranks=1)["phases"]["block-ap"]["terms_gib"]
        ["host: activation stores"] / 8, rel=1e-3)
    alone = planned(ranks=1)["phases"]["block-ap"]["hours"]
    assert phase["hours"] <= 6.0 and alone / phase["hours"] >= 5.1
    assert "gradient sums" in phase["note"] and "weight work repeated or broadcast" in phase["note"]
    modes = {layout["mode"]: layout for layout in r["layouts"]}
    assert modes["student"]["flags"] == ("`student_input` student `data_parallel` 2 `sequence_parallel` 4 "
                                         "`weight_work` split") and modes["student"]["hours"] == phase["hours"]
    assert all(m["hours"] < phase["hours"] and "perplexity" in m["price"] for k, m in modes.items() if k != "student")
    replicated = planned("--weight-work", "replicated")["phases"]["block-ap"]
    assert replicated["hours"] > phase["hours"]  # repeating the weight work on 8 ranks is what split saves
    assert planned("--data-parallel", "1", "--sequence-parallel", "8")["phases"]["block-ap"]["note"].count(
        "key/value exchange") == 1
    two_nodes = planned(ranks=16)
    assert (two_nodes["settings"]["student_input"], two_nodes["settings"]["groups"]) == ("student", 2)
    assert two_nodes["phases"]["block-ap"]["hours"] < phase["hours"]
