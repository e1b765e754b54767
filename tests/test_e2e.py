"""E2E-QP on DeepSpeed ZeRO-3 (CPU, gloo, loopback): only scales train, integers stay bit-identical,
the integer parameters are partitioned over 2 ranks, 1 and 2 ranks agree, a killed run resumes (on any number
of ranks)."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED_EVAL, export_tensors, one_process_env, tiny_model
from eqat_dist.e2e.ds_setup import load_ds_config
from eqat_dist.e2e.trainer import warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = str(ROOT / "launch" / "run.py")
SCALE_TOLERANCE = 1e-6  # float32 scales, 1 vs 2 ranks: same global batch, gradients summed in another order


def test_global_batch_is_kept_whatever_the_number_of_ranks():
    for world, accum in ((1, 8), (2, 4), (4, 2)):
        config, got = load_ds_config("zero3-offload", 2, 16, world, 0.3, False)
        assert got == accum and config["train_batch_size"] == 16 and config["gradient_clipping"] == 0.3
        assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="not a multiple of micro batch 2 x 3 ranks"):
        load_ds_config("zero3", 2, 16, 3, 0.3, False)


def test_warmup_then_cosine():
    factors = [warmup_cosine(s, 100, 3) for s in range(100)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and factors[3] == pytest.approx(1.0)
    assert factors[-1] < 0.01 and all(a >= b for a, b in zip(factors[3:], factors[4:]))


def assert_same_but_scales_within_tolerance(run_a: Path, run_b: Path) -> None:
    """Two exports: scales within SCALE_TOLERANCE, every other tensor bit-identical."""
    a, b = export_tensors(run_a), export_tensors(run_b)
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".scales"):
            assert (a[key].float() - b[key].float()).abs().max().item() <= SCALE_TOLERANCE, key
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def rtn_export(tmp_path_factory):
    """A tiny random Llama, round-to-nearest 2-bit, exported: what E2E-QP starts from."""
    from transformers import AutoTokenizer
    from eqat_dist.models.loading import bundled_model_dir

    base = tmp_path_factory.mktemp("e2e")
    tiny_model("llama", layers=2, vocab=49152).save_pretrained(base / "fp")
    AutoTokenizer.from_pretrained(str(bundled_model_dir())).save_pretrained(base / "fp")
    subprocess.run([sys.executable, RUN, "--model", str(base / "fp"), "--wbits", "2", "--group-size", "32",
                    "--output", str(base / "rtn"), "--epochs", "0", "--phase", "block-ap", "--eval-datasets", "news", "--zeroshot-tasks", "",
                    "--eval-seqlen", "32", "--eval-max-windows", "1", "--skip-fp-eval", "--no-tensorboard"],
                   check=True, env=one_process_env(), capture_output=True)
    return base


def _e2e_args(rtn_export, out, extra=()):
    return ["--phase", "e2e", "--from", str(rtn_export / "rtn"), "--model", str(rtn_export / "fp"), "--wbits", "2",
            "--group-size", "32", "--output", str(out), "--e2e-train-size", "16", "--e2e-seqlen", "32",
            "--e2e-global-batch", "4", "--e2e-lr", "1e-3", "--e2e-save-every", "1", "--eval-datasets", "news", "--zeroshot-tasks", "",
            "--eval-seqlen", "32", "--eval-max-windows", "1", "--export-dtype", "float32", "--no-tensorboard", *extra]


@pytest.fixture(scope="module")
def one_rank(rtn_export):
    out = rtn_export / "one"
    subprocess.run([sys.executable, RUN, *_e2e_args(rtn_export, out)], check=True, env=one_process_env(), capture_output=True)
    return out


@pytest.mark.slow
def test_two_ranks_on_zero3_match_one_rank_and_touch_only_scales(rtn_export, one_rank, tmp_path):
    env = one_process_env()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           env["MASTER_PORT"], RUN, *_e2e_args(rtn_export, tmp_path / "two")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "two" / "results.json").read_text())["e2e"]
    assert report["ranks"] == 2 and report["accumulation_steps"] == 2
    assert json.loads((one_rank / "results.json").read_text())["e2e"]["accumulation_steps"] == 4
    for run in (one_rank, tmp_path / "two"):  # a checkpoint after each of 4 steps; only the newest is kept
        assert sorted(p.name for p in (run / "e2e_ckpt").iterdir() if p.is_dir()) == ["step4"]
    part = report["partition"]  # rank 0 holds about half of every integer tensor
    assert 0 < part["int_elements_local"] < part["int_elements_full"]
    assert report["optimizer_params"] and all(n.endswith(".scales") for n in report["optimizer_params"])
    for r in (report, json.loads((one_rank / "results.json").read_text())["e2e"]):
        # Adam's state covers the scales (plus ZeRO's alignment padding) and nothing else
        assert r["scale_elements"] <= r["optimizer_state_elements_all_ranks"] <= r["scale_elements"] + 64 * r["ranks"]
    start, one, two = (export_tensors(d) for d in (rtn_export / "rtn", one_rank, tmp_path / "two"))
    for key, value in start.items():
        if not value.is_floating_point():  # qweight, qzeros, g_idx: bit-identical after training
            assert torch.equal(one[key], value) and torch.equal(two[key], value), key
        elif not key.endswith(".scales"):  # embeddings and norms are frozen too
            assert torch.equal(one[key], value), key
    scales = [k for k in start if k.endswith(".scales")]
    assert all(not torch.equal(one[k], start[k]) for k in scales)
    assert max((one[k].float() - two[k].float()).abs().max().item() for k in scales) <= SCALE_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_or_terminated_e2e_run_resumes_to_the_uninterrupted_result(rtn_export, one_rank, tmp_path, signum):
    """SIGKILL, or SIGTERM (a cluster's stop: exit 143, one line, the lock released), after the step-2
    checkpoint; the same command then resumes to the uninterrupted run's bits."""
    from test_blockap import stop_with

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, RUN, *_e2e_args(rtn_export, out)], env=one_process_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, latest = time.time() + 180, out / "e2e_ckpt" / "latest"
    # frozen the moment DeepSpeed names step 2 (or a later one) complete: steps 3 and 4, the export and the evaluation take
    # well under a second on this tiny model, so a fixed wait let the signal land after training
    # (1 run in ~3 under a busy machine: "stopped by SIGTERM (evaluation after E2E-QP)")
    while not (latest.exists() and int(latest.read_text().strip().removeprefix("step") or 0) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill point"
        time.sleep(0.005)
    stop_with(proc, signum)
    _, err = proc.communicate(timeout=120)
    assert not (out / "model.safetensors").exists()
    if signum == signal.SIGTERM:
        lines = [line for line in err.splitlines() if line.startswith("eqat-dist")]
        assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
        assert len(lines) == 1 and re.match(r"eqat-dist: rank 0 stopped by SIGTERM \(E2E-QP .*\)\. Finished work is kept in "
                                            r".* \(E2E-QP checkpoints\); run the same command again to resume\.$",
                                            lines[0]), lines
        assert not (out / ".eqat-dist.lock").exists()
    result = subprocess.run([sys.executable, RUN, *_e2e_args(rtn_export, out)], env=one_process_env(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "resumed from" in result.stdout
    report = json.loads((out / "results.json").read_text())["e2e"]
    assert report["resumed_at"] >= 2
    whole = json.loads((one_rank / "results.json").read_text())["e2e"]
    # the history of the steps before the kill comes back from the checkpoint: one loss per step of the run
    assert len(report["losses"]) == len(report["step_seconds"]) == report["steps"] == len(whole["losses"])
    assert report["losses"] == pytest.approx(whole["losses"], rel=1e-6)
    a, b = export_tensors(one_rank), export_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_scales_only_training_lowers_the_loss_of_a_real_2bit_model(tmp_path, bundled_rtn_w2):
    """The trainer on the real model, on ZeRO-3 with parameters and optimizer offloaded to CPU."""
    rtn = bundled_rtn_w2
    common = ["--wbits", "2", "--group-size", "64", *BUNDLED_EVAL]
    out = tmp_path / "e2e"
    subprocess.run([sys.executable, RUN, "--model", "smollm2-135m", "--phase", "e2e", "--from", str(rtn), "--output",
                    str(out), "--e2e-train-size", "4", "--e2e-seqlen", "64", "--e2e-global-batch", "4",
                    "--e2e-micro-batch", "2", "--e2e-epochs", "4", "--e2e-lr", "2e-3", "--e2e-warmup", "0",
                    "--ds-config", "zero3-offload",
                    *common], check=True, env=one_process_env(), capture_output=True)
    results = json.loads((out / "results.json").read_text())
    losses = results["e2e"]["losses"]  # the same 4 windows every epoch
    assert losses[-1] < 0.9 * losses[0], losses
    assert results["e2e"]["integers_unchanged"] is True


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["single-gpu", "zero3"])
def test_model_built_for_deepspeed_equals_the_plain_loader(rtn_export, monkeypatch, ds_config):
    """Same float32 logits as `load_packed_model` (catches an untied lm_head, a tensor left unloaded, and
    zero.Init silently building the model in bfloat16), and no float linear made for the blocks on the
    way (at 70B they would be 137 GB in bf16, allocated only to be replaced)."""
    import deepspeed
    from eqat_dist.e2e.ds_setup import build_packed_model, init_distributed
    from eqat_dist.export import load_packed_model

    for var, value in (("MASTER_PORT", str(random.randint(20000, 40000))), ("MASTER_ADDR", "127.0.0.1"),
                       ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)  # restored afterwards: later launches must not inherit a world of 1
    init_distributed()
    config, _ = load_ds_config(ds_config, 1, 1, 1, 0.3, False)
    made, real_init = [], torch.nn.Linear.__init__

    def counting_init(self, in_features, out_features, *args, **kwargs):
        made.append((in_features, out_features))
        real_init(self, in_features, out_features, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Linear, "__init__", counting_init)
    model, _ = build_packed_model(rtn_export / "rtn", config, torch.float32)
    monkeypatch.undo()
    assert made == [(model.config.hidden_size, model.config.vocab_size)]  # the output head only
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    reference, _ = load_packed_model(rtn_export / "rtn")
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=ds_config == "zero3"):
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


@pytest.mark.slow
def test_whole_pipeline_on_two_deepspeed_ranks_matches_the_single_gpu_mode(rtn_export, tmp_path):
    """`deepspeed launch/run.py` (Block-AP over 2 ranks in the paper's student scheme, then E2E-QP on
    ZeRO-3, export, evaluation) against `--single-gpu`: the same Block-AP model bit for bit, the same
    scales after E2E-QP within SCALE_TOLERANCE, and one TensorBoard folder holding both phases."""
    args = ["--model", str(rtn_export / "fp"), "--wbits", "2", "--group-size", "32", "--epochs", "1",
            "--train-size", "4", "--val-size", "2", "--seqlen", "32", "--student-input", "student",
            "--e2e-train-size", "8", "--e2e-seqlen", "32", "--e2e-global-batch", "4", "--e2e-lr", "1e-3",
            "--ds-config", "zero3", "--eval-datasets", "news", "--zeroshot-tasks", "", "--eval-seqlen", "32",
            "--eval-max-windows", "1", "--skip-fp-eval", "--export-dtype", "float32"]
    env = one_process_env()
    single = subprocess.run([sys.executable, RUN, "--single-gpu", "--output", str(tmp_path / "one"), *args], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stdout[-3000:]
    two = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
                          env["MASTER_PORT"], RUN, "--output", str(tmp_path / "two"), *args], env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stdout[-3000:]
    one_res, two_res = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two_res["settings"]["ranks"] == 2 and two_res["e2e"]["ranks"] == 2 and one_res["e2e"]["ranks"] == 1
    assert one_res["quantized"]["perplexity"] == two_res["quantized"]["perplexity"]  # Block-AP: same model
    assert len(one_res["e2e"]["losses"]) == len(two_res["e2e"]["losses"]) == 2
    assert_same_but_scales_within_tolerance(tmp_path / "one", tmp_path / "two")
    events = {p.parent.relative_to(tmp_path / "two" / "tb").as_posix().split("/")[0]
              for p in (tmp_path / "two" / "tb").rglob("events.out.tfevents.*")}
    assert {"rank0", "rank1"} <= events and any(e.startswith("e2e") for e in events), events


def test_pruning_keeps_the_newest_checkpoints_and_the_one_latest_names(tmp_path):
    from eqat_dist.e2e.checkpoints import prune_checkpoints

    for n in (1, 2, 3, 10, 11):
        (tmp_path / f"step{n}").mkdir()
    (tmp_path / "step11" / "shard.pt").write_bytes(b"x")
    (tmp_path / "latest").write_text("step2")  # e.g. a newer save was cut short before `latest` moved
    (tmp_path / "notes").mkdir()  # not ours: left alone
    assert sorted(prune_checkpoints(tmp_path, keep=2)) == ["step1", "step3"]  # numeric order: step10 > step3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "notes", "step10", "step11", "step2"]
    assert prune_checkpoints(tmp_path, keep=0) == [] and (tmp_path / "step2").exists()


def test_resume_point_names_a_missing_checkpoint_and_detects_another_rank_count(tmp_path):
    from eqat_dist.blockap.checkpoint import ResumeError
    from eqat_dist.e2e.checkpoints import find_resume_point

    assert find_resume_point(tmp_path, world=1, zero=True) is None
    (tmp_path / "latest").write_text("step8")
    with pytest.raises(ResumeError, match="step8.*not a complete DeepSpeed checkpoint"):
        find_resume_point(tmp_path, world=1, zero=True)
    step = tmp_path / "step8"
    step.mkdir()
    (step / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    for r in range(2):
        (step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    same = find_resume_point(tmp_path, world=2, zero=True)
    assert (same.tag, same.saved_by_ranks, same.reshard, same.load_tag) == ("step8", 2, False, "step8")
    other = find_resume_point(tmp_path, world=4, zero=True)
    assert other.reshard and other.load_tag == "step8-universal"
    assert not find_resume_point(tmp_path, world=4, zero=False).reshard  # stage 0: every rank holds everything


@pytest.mark.slow
def test_e2e_checkpoint_of_one_rank_resumes_on_two(rtn_export, one_rank, tmp_path):
    """ZeRO partitions are re-split through DeepSpeed's universal format: the result equals the
    uninterrupted 1-rank run."""
    full = tmp_path / "full"
    subprocess.run([sys.executable, RUN, *_e2e_args(rtn_export, full, ["--e2e-keep-checkpoints", "0"])],
                   check=True, env=one_process_env(), capture_output=True)
    out = tmp_path / "moved"
    shutil.copytree(full / "e2e_ckpt" / "step2", out / "e2e_ckpt" / "step2")  # as if killed after step 2
    (out / "e2e_ckpt" / "latest").write_text("step2")
    env = one_process_env()
    two = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
                          env["MASTER_PORT"], RUN, *_e2e_args(rtn_export, out)], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stdout[-3000:]
    assert "converting it to DeepSpeed's universal format" in two.stdout
    report = json.loads((out / "results.json").read_text())["e2e"]
    assert report["ranks"] == 2 and report["resumed_at"] == 2 and len(report["losses"]) == 4
    assert report["losses"][:2] == json.loads((full / "results.json").read_text())["e2e"]["losses"][:2]
    assert sorted(p.name for p in (out / "e2e_ckpt").iterdir() if "universal" in p.name) == []  # copy removed
    assert_same_but_scales_within_tolerance(one_rank, out)


@pytest.mark.slow
def test_corrupt_e2e_checkpoint_is_reported_and_left_in_place(rtn_export, one_rank, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_rank / "e2e_ckpt", out / "e2e_ckpt")
    shard = next((out / "e2e_ckpt" / "step4").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk
    result = subprocess.run([sys.executable, RUN, *_e2e_args(rtn_export, out)], env=one_process_env(), capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert "cannot be loaded" in result.stderr and "delete" in result.stderr, result.stderr[-2000:]
    assert shard.stat().st_size == 100 and not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_run_killed_in_e2e_before_its_first_checkpoint_goes_on_without_redoing_block_ap(rtn_export, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, RUN, "--single-gpu", "--model", str(rtn_export / "fp"), "--wbits", "2", "--group-size",
           "32", "--epochs", "1", "--train-size", "4", "--val-size", "2", "--seqlen", "32", "--e2e-train-size", "8",
           "--e2e-seqlen", "32", "--e2e-global-batch", "4", "--e2e-save-every", "100", "--eval-datasets", "news",
           "--zeroshot-tasks", "", "--eval-seqlen", "32", "--eval-max-windows", "1", "--skip-fp-eval",
           "--no-tensorboard", "--output", str(out)]
    proc = subprocess.Popen(cmd, env=one_process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # Block-AP finished, exported and evaluated; E2E-QP is starting
        if line.startswith("[e2e] global batch"):
            proc.kill()
            break
    proc.wait()
    first = json.loads((out / "results.json").read_text())
    assert "quantized" in first and "quantized_e2e" not in first and not (out / "e2e_ckpt" / "latest").exists()
    again = subprocess.run(cmd, env=one_process_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[block-ap] finished earlier" in again.stdout and "[block-ap] 4 train" not in again.stdout
    final = json.loads((out / "results.json").read_text())
    assert final["quantized"] == first["quantized"] and len(final["e2e"]["losses"]) == 2


@pytest.mark.slow
def test_e2e_checkpoint_resumes_only_into_the_same_settings(rtn_export, one_rank, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_rank / "e2e_ckpt", out / "e2e_ckpt")
    args = _e2e_args(rtn_export, out)
    args[args.index("--e2e-lr") + 1] = "2e-3"
    result = subprocess.run([sys.executable, RUN, *args], env=one_process_env(), capture_output=True, text=True)
    assert result.returncode != 0
    assert "other settings (lr: was 0.001, now 0.002)" in result.stderr, result.stderr[-2000:]
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_e2e_under_mpiexec_matches_one_rank(rtn_export, one_rank, tmp_path):
    """The MPI launcher: ranks come from the communicator, even over a stale RANK/WORLD_SIZE in the
    environment (which made both processes rank 0 of a world of 1)."""
    out = tmp_path / "mpi"
    stale = dict(one_process_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    result = subprocess.run([str(BIN / "mpiexec"), "-n", "2", sys.executable, RUN, *_e2e_args(rtn_export, out)],
                            env=stale, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["e2e"]["ranks"] == 2
    assert_same_but_scales_within_tolerance(one_rank, out)


@pytest.mark.slow
def test_a_rank_that_dies_in_e2e_stops_the_run_and_keeps_its_checkpoints(rtn_export, tmp_path):
    out = tmp_path / "dies"
    env = one_process_env()
    args = _e2e_args(rtn_export, out, ["--e2e-train-size", "64"])  # 16 steps: time to kill one rank
    proc = subprocess.Popen([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1",
                             "--master_port", env["MASTER_PORT"], RUN, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "e2e_ckpt" / "step2").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill point"
        time.sleep(0.05)
    rank1 = subprocess.run(["pgrep", "-f", f"local_rank=1 .*--output {out}"], capture_output=True, text=True)
    os.kill(int(rank1.stdout.split()[0]), signal.SIGKILL)
    killed_at = time.time()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - killed_at < 60
    assert re.search(r"rank 0 failed \(E2E-QP training\): .*run the same command again to resume", output), \
        output[-3000:]
    assert (out / "e2e_ckpt" / "latest").exists() and not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_a_bfloat16_run_keeps_16_bit_stores_and_float32_master_weights(rtn_export, tmp_path):
    """--dtype bfloat16 on the CPU, Block-AP then E2E-QP: the activation stores hold 2 bytes per value,
    Block-AP's trained weights and E2E-QP's optimizer copies stay float32, and every loss is finite."""
    out = tmp_path / "bf16"
    done = subprocess.run([sys.executable, RUN, "--model", str(rtn_export / "fp"), "--wbits", "2", "--group-size", "32",
                           "--output", str(out), "--epochs", "1", "--train-size", "4", "--val-size", "2", "--seqlen",
                           "32", "--dtype", "bfloat16", "--e2e-train-size", "8", "--e2e-seqlen", "32",
                           "--e2e-global-batch", "4", "--e2e-lr", "1e-3", "--eval-datasets", "news", "--zeroshot-tasks",
                           "", "--eval-seqlen", "32", "--eval-max-windows", "1", "--skip-fp-eval", "--no-tensorboard"],
                          env=one_process_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    train_bytes = 4 * 32 * 64 * 2  # windows x tokens x hidden x bf16
    assert re.search(rf"fp_train {train_bytes / 2**20:.1f} MiB", done.stdout), done.stdout[-2000:]
    results = json.loads((out / "results.json").read_text())
    losses = [b[k] for b in results["blocks"] for k in ("loss_before", "loss_after", "train_loss_last")]
    assert all(map(lambda v: v == v and abs(v) < float("inf"), losses + results["e2e"]["losses"]))
    assert results["e2e"]["optimizer_dtypes"] == ["torch.float32"]
    block = export_tensors(tmp_path / "bf16")  # scales written from float32 training, then exported
    assert any(k.endswith(".scales") for k in block)
