"""The command line: bad input fails early and clearly; the RTN path runs on the real model."""
import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import THREADS, sigint_as_default, tiny_model
from eqat_dist.cli import UsageError, build_parser, parse_args
from eqat_dist.preflight import blockap_already_done

ROOT = Path(__file__).resolve().parents[1]


def _args(tmp_path, *extra):
    return ["--model", "smollm2-135m", "--output", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("extra,message", [
    (["--wbits", "5"], "--wbits 5 is not supported; use one of 2, 3, 4, 8"),
    (["--group-size", "128"], "--group-size 128 does not divide the input width 576 .*--group-size 32 or 64"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--activations", "gpu", "--device", "cpu"], "--activations gpu needs a CUDA device"),
    (["--grid", "q2_0", "--group-size", "32"], "--grid q2_0 is llama.cpp's Q2_0: 2-bit codes in groups of 64; use "
                                               "--wbits 2 --group-size 64"),
    (["--grid", "q4_0", "--wbits", "4", "--group-size", "32", "--init", "gptq"], "--init gptq chooses its own zero"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        parse_args(_args(tmp_path, *extra))


def test_missing_model_path(tmp_path):
    with pytest.raises(UsageError, match="--model: model path .*nope' does not exist"):
        parse_args(["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])


def test_non_empty_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="exists and is not empty; pass --overwrite"):
        parse_args(_args(tmp_path))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def _results_of_a_run(tmp_path, *phases_done, **changed):
    """results.json as a run of _args(tmp_path) leaves it after the given phases."""
    settings = parse_args(_args(tmp_path)).blockap_record() | changed
    results = {"settings": settings} | {key: {"perplexity": {}} for key in phases_done}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text(json.dumps(results))


def test_a_run_killed_after_block_ap_continues_with_e2e_only(tmp_path):
    _results_of_a_run(tmp_path, "quantized")
    assert blockap_already_done(parse_args(_args(tmp_path)))  # no --overwrite needed, Block-AP is not redone
    with pytest.raises(UsageError, match="already holds a finished run"):
        parse_args(_args(tmp_path, "--phase", "block-ap"))


def test_a_finished_run_or_one_with_other_settings_is_not_continued(tmp_path):
    _results_of_a_run(tmp_path, "quantized", "quantized_e2e")
    with pytest.raises(UsageError, match="already holds a finished run; pass --overwrite"):
        parse_args(_args(tmp_path))
    assert not blockap_already_done(parse_args(_args(tmp_path, "--overwrite")))


def test_other_settings_in_the_output_folder_are_named(tmp_path):
    _results_of_a_run(tmp_path, "quantized", wbits=3)
    with pytest.raises(UsageError, match="other settings \\(wbits: was 3, now 2\\)"):
        parse_args(_args(tmp_path))


def test_a_recipe_choice_left_out_of_a_record_reads_as_the_papers(tmp_path):
    """Records leave out init/loss at the paper's values: a run made with another choice is refused by a
    command with the paper's (the key is only in the old record), and the message names the paper's value,
    not None."""
    _results_of_a_run(tmp_path, "quantized", init="clip", loss="huber")
    with pytest.raises(UsageError, match="other settings \\(init: was 'clip', now 'minmax'; loss: was 'huber', now 'mse'\\)"
                                          ".*earlier default recipe continues with --recipe paper"):
        parse_args(_args(tmp_path, "--recipe", "paper"))
    assert blockap_already_done(parse_args(_args(tmp_path, "--recipe", "clip-huber")))


def test_config_file_with_flag_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("wbits: 3\ngroup-size: 32\nepochs: 1\n")
    args = parse_args(_args(tmp_path, "--config", str(cfg), "--epochs", "0"))
    assert (args.quant.bits, args.quant.group_size, args.blockap.epochs) == (3, 32, 0)


@pytest.mark.slow
def test_cli_exits_with_one_line_message(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *_args(tmp_path, "--wbits", "7")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("eqat-dist: error: --wbits 7 is not supported")


@pytest.mark.slow
def test_rtn_run_on_the_real_model_writes_export_results_and_report(tmp_path):
    """The export, results.json (with every setting: the command rebuilt from it gives the run's settings
    again) and report.md, files readable as umask 022 says; then `--phase eval --from` the run with no
    other flag evaluates its model at the run's own evaluation settings."""
    import shlex

    from eqat_dist.cli import parse_flags
    from eqat_dist.config.from_flags import settings_from_flags

    out = tmp_path / "out"
    argv = ["--model", "smollm2-135m", "--wbits", "4", "--group-size", "64", "--output", str(out), "--epochs", "0",
            "--phase", "block-ap", "--eval-datasets", "wiki", "--eval-seqlen", "256", "--eval-max-windows", "3",
            "--zeroshot-tasks", "arc_easy,piqa", "--zeroshot-limit", "12", "--no-tensorboard"]
    subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *argv], check=True, capture_output=True,
                   preexec_fn=lambda: os.umask(0o022))
    results = json.loads((out / "results.json").read_text())
    fp, q = results["fp"]["perplexity"]["wiki"]["ppl"], results["quantized"]["perplexity"]["wiki"]["ppl"]
    assert 5 < fp < 60 and fp < q < 3 * fp  # 4-bit RTN: worse than fp, far from broken
    assert results["settings"]["wbits"] == 4 and results["method"] == "rtn"
    zs = results["quantized"]["zero_shot"]
    assert zs["piqa"]["items"] == 12 and zs["piqa"]["split_items"] == 1838 and zs["arc_easy"]["items"] == 12
    assert zs["piqa"]["scorer"] == "lm-evaluation-harness" and 0 < zs["piqa"]["acc_stderr"] < 0.2
    assert results["fp"]["zero_shot"]["average"]["acc"] > (1 / 4 + 1 / 2) / 2  # above the tasks' chance
    assert zs["average"]["acc"] == (zs["piqa"]["acc"] + zs["arc_easy"]["acc"]) / 2
    report = (out / "report.md").read_text()
    assert f"| {q:.2f} |" in report and "| model | arc_easy | piqa | average |" in report and "n=12)" in report
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    assert (out / "tokenizer.json").exists()
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes  # safetensors writes 0600 by itself

    # results.json alone rebuilds the command: the same flags, the same settings
    run = results["run"]
    rebuilt = shlex.split(run["command"])
    assert rebuilt[0] == "eqat-dist" and run["argv"] == argv and run["command"] in report
    assert vars(parse_flags(rebuilt[1:])) == vars(parse_flags(argv)) == {**run["flags"], "config": None, "local_rank": None}
    assert settings_from_flags(parse_flags(rebuilt[1:])) == settings_from_flags(parse_flags(argv))
    assert run["settings"]["quant"] == {"bits": 4, "group_size": 64, "init": "minmax", "grid": "asym"}
    assert {"torch", "transformers", "eqat-dist"} <= set(run["versions"]) and run["launch"]["ranks"] == 1

    # --phase eval --from the run, nothing else: the run's model and evaluation settings, results beside it
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--phase", "eval", "--from", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ev = json.loads((out / "results.json").read_text())["eval"]
    assert ev["quantized"]["perplexity"]["wiki"] == results["quantized"]["perplexity"]["wiki"]  # 3 x 256 again
    assert ev["quantized"]["zero_shot"]["piqa"]["acc"] == zs["piqa"]["acc"] and ev["method"] == "rtn"
    assert ev["run"]["argv"] == ["--phase", "eval", "--from", str(out)] and ev["run"]["flags"]["model"] == "smollm2-135m"
    assert "| w4g64 RTN from out (--phase eval) |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_log_file_shows_a_line_per_block_and_per_evaluation_step(tmp_path):
    """`eqat-dist ... > log 2>&1` on a cluster: no bars (no carriage returns), a line per finished block
    with its losses and ETA, progress lines while evaluating."""
    import re

    log = tmp_path / "run.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), "--model", "smollm2-135m", "--wbits", "3",
                        "--group-size", "64", "--epochs", "1", "--train-size", "2", "--val-size", "1", "--seqlen", "32",
                        "--batch-size", "1", "--phase", "block-ap", "--output", str(tmp_path / "out"),
                        "--eval-datasets", "wiki", "--eval-seqlen", "128", "--eval-max-windows", "2",
                        "--zeroshot-tasks", "piqa", "--zeroshot-limit", "4", "--skip-fp-eval", "--no-tensorboard"],
                       check=True, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=THREADS))
    text = log.read_text()
    assert "\r" not in text
    blocks = re.findall(r"^\[block-ap\] block (\d+) of 30, rank 0: loss \S+ -> \S+ \([+-]\d+\.\d%\), [\d.]+ s, "
                        r"[\d,]+ tok/s, [\d.]+ s the block in all; rank 0 done (\d+)/30, eta \d+m\d\ds$", text, re.M)
    assert [int(b) for b, _ in blocks] == list(range(30)) and [int(d) for _, d in blocks] == list(range(1, 31))
    assert re.search(r"^\[eval\] w3g64 wiki: 2/2 windows, \S+ elapsed, eta 0m00s$", text, re.M)
    assert re.search(r"^\[eval\] w3g64 zero-shot: 8/8 requests, ", text, re.M)
    assert "pretrained` model kwarg" not in text  # lm-eval's warnings about being handed a model object


def test_overwrite_never_deletes_a_folder_that_is_not_an_eqat_dist_run_nor_the_model(tmp_path):
    """--overwrite removes only a recognisable eqat-dist output folder: a user's folder and the model
    being quantized (or a folder holding it) are refused before anything is touched."""
    users = tmp_path / "mine"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match="not an eqat-dist run"):
        parse_args(["--model", "smollm2-135m", "--output", str(users), "--overwrite"])
    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model)
    for output in (model, tmp_path):
        with pytest.raises(UsageError, match="is or holds the --model folder"):
            parse_args(["--model", str(model), "--output", str(output), "--overwrite", "--seqlen", "64",
                        "--e2e-seqlen", "64", "--eval-seqlen", "64"])
    assert (users / "thesis.tex").read_text() == "years of work" and (model / "config.json").exists()
    ours = tmp_path / "run"
    ours.mkdir()
    (ours / "results.json").write_text("{}")
    assert parse_args(["--model", "smollm2-135m", "--output", str(ours), "--overwrite"]).overwrite


@pytest.mark.parametrize("extra, message", [
    (["--eval-datasets", "wiki,foo"], "--eval-datasets: unknown data source 'foo'"),
    (["--calib-dataset", "missing.txt"], "--calib-dataset: data file missing.txt does not exist"),
    (["--ds-config", "zero4"], "--ds-config zero4: not a file nor one of"),
    (["--e2e-global-batch", "3", "--e2e-micro-batch", "2"], "--e2e-global-batch 3 is not a multiple of micro batch 2"),
    (["--eval-max-windows", "0"], "--eval-max-windows must be >= 1"),
    (["--seqlen", "9000"], "--seqlen 9000 is longer than the model's context (8192 tokens"),
    (["--quant-lr", "nan"], "--quant-lr nan must be a finite number >= 0"),
    (["--e2e-lr=-1e-4"], "--e2e-lr -0.0001 must be a finite number >= 0"),
    (["--correction-fraction", "1.5"], "--correction-fraction must be between 0 and 1"),
    (["--peer-timeout", "1"], "--peer-timeout must be >= 5 seconds"),
    (["--activations-on-gpu=-1"], "--activations-on-gpu must be >= 0"),
    (["--activations-on-gpu", "4", "--activations", "gpu"], "--activations gpu keeps every store on the GPU already"),
    (["--activations-on-gpu", "4"], "--activations-on-gpu keeps part of the stores on a GPU and needs a CUDA device"),
    (["--init", "gptq", "--epochs", "0"], "--init gptq starts Block-AP from GPTQ on its calibration windows, and --epochs 0"),
    (["--e2e-data", "missing.jsonl"], "--e2e-data: data file missing.jsonl does not exist"),
])
def test_settings_that_would_fail_after_hours_are_refused_up_front(tmp_path, extra, message):
    """What used to fail after Block-AP and the export (issue 14) fails in parsing, naming the fix."""
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_args(["--model", "smollm2-135m", "--output", str(tmp_path / "o"), *extra])


def test_a_malformed_deepspeed_config_and_an_unreachable_hub_dataset_are_named(tmp_path, monkeypatch):
    bad = tmp_path / "ds.json"
    bad.write_text("{ not json")
    with pytest.raises(UsageError, match=f"--ds-config {re.escape(str(bad))} is not valid JSON"):
        parse_args(["--model", "smollm2-135m", "--output", str(tmp_path / "o"), "--ds-config", str(bad)])

    def offline(*args, **kwargs):
        raise ConnectionError("no route to the hub")
    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(UsageError, match="'wikitext2' is a Hugging Face hub dataset and the hub cannot be reached"):
        parse_args(["--model", "smollm2-135m", "--output", str(tmp_path / "o"), "--eval-datasets", "wikitext2"])


def test_one_run_per_output_folder(tmp_path):
    """A folder held by a live run is refused at once; a killed run's lock on this host is taken over
    (the same command still resumes), saying so; another host's lock only with --take-over-lock."""
    import socket

    from eqat_dist.utils.lock import LOCK, LockError, acquire

    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / LOCK).write_text(f"{socket.gethostname()} {holder.pid} 2026-11-24 05:00:00\n")
        with pytest.raises(UsageError, match=f"is in use by eqat-dist \\(pid {holder.pid} on "):
            parse_args(["--model", "smollm2-135m", "--output", str(out)])
    finally:
        holder.kill()
        holder.wait()
    said = []
    assert acquire(out, log=said.append) == out / LOCK  # pid gone: taken over
    assert "no longer running" in said[0] and str(os.getpid()) in (out / LOCK).read_text()
    (out / LOCK).write_text("some-other-host 4242 2026-11-24 05:00:00\n")
    with pytest.raises(LockError, match="on host some-other-host .* pass --take-over-lock"):
        acquire(out)
    assert acquire(out, take_over=True, log=said.append) == out / LOCK


def _bad_inputs(tmp_path: Path) -> dict:
    """name -> (extra flags, what the one line must say), each a mistake that used to end in a traceback."""
    (tmp_path / "bad.yaml").write_text("wbits: [2, 3\n")
    (tmp_path / "list.yaml").write_text("- wbits\n- 2\n")
    (tmp_path / "calib.txt").write_bytes(bytes(range(128, 256)) * 40)
    (tmp_path / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (tmp_path / "no_config").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    return {
        "invalid YAML": (["--config", str(tmp_path / "bad.yaml")], "is not valid YAML"),
        "YAML list": (["--config", str(tmp_path / "list.yaml")], "holds a list, not a mapping of settings"),
        "unknown device": (["--device", "tpu"], "--device tpu is not a device; use auto, cpu, cuda or cuda:N"),
        "binary calibration file": (["--calib-dataset", str(tmp_path / "calib.txt")], "is not UTF-8 text"),
        "jsonl without text": (["--calib-dataset", str(tmp_path / "notext.jsonl")], "the first line has no 'text' field"),
        "folder without a model config": (["--model", str(tmp_path / "no_config")], "has no config.json"),
        "output under a file": (["--output", str(tmp_path / "a_file" / "run")], "is a file, so no folder can be made"),
        "offline hub id": (["--model", "no-such-org/no-such-model"], "could not read the config of model"),
    }


@pytest.mark.parametrize("case", [
    "invalid YAML", "YAML list", "unknown device", "binary calibration file", "jsonl without text",
    "folder without a model config", "output under a file", "offline hub id"])
def test_bad_input_is_one_line_and_exit_2_without_a_traceback(tmp_path, capsys, monkeypatch, case):
    from eqat_dist.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub id case: what a machine without network sees
    extra, message = _bad_inputs(tmp_path)[case]
    assert main(["--model", "smollm2-135m", "--output", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eqat-dist: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_is_refused_up_front(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(UsageError, match="cannot write in"):
        parse_args(_args(tmp_path)[:2] + ["--output", str(ro / "run")])


def test_a_port_in_use_is_refused_up_front_and_a_single_process_picks_a_free_one(tmp_path, monkeypatch):
    """E2E-QP's rendezvous port is checked before Block-AP, not found taken hours later."""
    import socket

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(UsageError, match=f"port {port} \\(MASTER_PORT\\) is in use.*--master_port \\d+"):
            parse_args(_args(tmp_path))
    monkeypatch.delenv("MASTER_PORT")
    parse_args(_args(tmp_path))
    assert int(os.environ["MASTER_PORT"]) > 0  # chosen free for this one process
    monkeypatch.delenv("MASTER_PORT")


@pytest.mark.slow
def test_ctrl_c_in_one_process_ends_with_one_line_naming_the_block_and_what_is_kept(tmp_path):
    """The signal lands while a block is still training: blocks here take seconds (80 steps each), and
    the signal is sent right after block 1 is saved, so block 2 is in training for seconds, not a
    state a fast run passes through in milliseconds (which let the run exit 0 before the signal)."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "run.py"), "--model", "smollm2-135m", "--wbits", "2",
                             "--epochs", "40", "--train-size", "2", "--val-size", "1", "--seqlen", "32", "--batch-size",
                             "1", "--phase", "block-ap", "--output", str(out), "--eval-datasets", "", "--zeroshot-tasks",
                             "", "--skip-fp-eval", "--no-tensorboard"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=THREADS), preexec_fn=sigint_as_default)
    deadline = time.time() + 300
    while not (out / "blockap" / "block_0001.safetensors").exists():  # saved whole (not its .tmp): block 2 trains
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    log, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, f"exit {proc.returncode}\n{err[-3000:]}\n{log[-1500:]}"
    assert re.search(rf"^eqat-dist: rank 0 interrupted at block \d+ .*Finished work is kept in {re.escape(str(out))} "
                     r"\(Block-AP blocks\); run the same command again to resume\.$", err, re.M), err[-2000:]
    assert not (out / "blockap" / "block_0029.safetensors").exists()  # stopped mid-run, not after it


@pytest.mark.slow
def test_a_runtime_failure_with_nothing_saved_does_not_claim_finished_work(tmp_path):
    """A corrupt model file is found when the weights are read: exit 1, one line naming the file, no
    traceback (unless --debug), and no 'Finished work is kept' where there is none."""
    model = tmp_path / "model"
    tiny_model("llama", layers=2).save_pretrained(model)
    from transformers import AutoTokenizer

    from eqat_dist.models.loading import bundled_model_dir
    AutoTokenizer.from_pretrained(str(bundled_model_dir())).save_pretrained(model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    cmd = [sys.executable, str(ROOT / "launch" / "run.py"), "--model", str(model), "--wbits", "2", "--group-size", "32",
           "--epochs", "0", "--output", str(tmp_path / "out"), "--eval-datasets", "", "--zeroshot-tasks", "",
           "--skip-fp-eval", "--no-tensorboard", "--phase", "block-ap"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=THREADS))
    lines = [line for line in done.stderr.splitlines() if line.startswith("eqat-dist")]
    assert done.returncode == 1 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-3000:]
    assert "model.safetensors" in lines[0] and "Finished work" not in lines[0], lines
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=THREADS))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_run_resumed_on_another_number_of_ranks_keeps_its_schedule_and_no_setting_is_a_wildcard(tmp_path):
    """Defaults are resolved once, from the world and the run being continued: a Block-AP finished on 2
    ranks (pipelined) goes on with E2E-QP on 1 rank with the settings it recorded; asking for another
    schedule is refused naming the difference (no setting left to its default matches anything)."""
    import dataclasses

    _results_of_a_run(tmp_path, "quantized", student_input="pipelined", correction_fraction=0.5,
                      correction_lr="continue")
    cfg = parse_args(_args(tmp_path))
    assert (cfg.blockap.student_input, cfg.blockap.correction_fraction, cfg.blockap.correction_lr) == (
        "pipelined", 0.5, "continue")
    assert blockap_already_done(cfg)
    with pytest.raises(UsageError, match="student_input: was 'pipelined', now 'student'"):
        parse_args(_args(tmp_path, "--student-input", "student"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # settings are read, never changed, below the command line


def test_pre_flight_checks_run_in_their_stated_order_and_each_runs_alone(tmp_path):
    """The model and data come before the output folder: a bad evaluation source is named before an
    output that is a file; each check is a function of the settings alone."""
    from dataclasses import replace

    from eqat_dist import preflight

    (tmp_path / "out").write_text("a file")
    with pytest.raises(UsageError, match="--eval-datasets: .*nope"):
        parse_args(_args(tmp_path, "--eval-datasets", "nope.txt"))
    with pytest.raises(UsageError, match="--output .* is a file, not a folder"):
        parse_args(_args(tmp_path))
    order = [c.__name__ for c in preflight.CHECKS]
    assert order.index("check_data_sources") < order.index("check_output_is_a_folder") < order.index("check_resume")
    (tmp_path / "out").unlink()
    cfg = parse_args(_args(tmp_path))
    with pytest.raises(preflight.PreflightError, match="`seqlen` 9000 is longer than the model's context"):
        preflight.check_context(replace(cfg, blockap=replace(cfg.blockap, seqlen=9000)))


def test_each_line_of_output_is_one_write_even_when_python_is_unbuffered():
    """Under PYTHONUNBUFFERED print() writes the text and the newline apart; ranks' lines then run into
    each other in a launcher's merged output. After `whole_lines` nothing of a line reaches the pipe
    before its newline, and then all of it at once."""
    import io

    from eqat_dist.cli import whole_lines

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = io.TextIOWrapper(io.FileIO(write_end, "w"), write_through=True)  # what PYTHONUNBUFFERED gives
    stream.write("[rank 0/2] half")
    assert os.read(read_end, 100) == b"[rank 0/2] half"  # the failure mode: a line in pieces
    whole_lines(stream)
    stream.write("[rank 1/2] pid 7")
    with pytest.raises(BlockingIOError):
        os.read(read_end, 100)
    stream.write(" on node\n")
    assert os.read(read_end, 100) == b"[rank 1/2] pid 7 on node\n"
    stream.close()
    os.close(read_end)


def test_the_default_recipe_is_the_measured_best_at_its_bits_and_one_flag_overrides_one_choice():
    from eqat_dist.cli import parse_flags
    from eqat_dist.config.from_flags import settings_from_flags
    from eqat_dist.settle import for_plan

    base = ["--model", "smollm2-135m", "--output", "/tmp/never-written"]

    def settings(*extra):
        return for_plan(settings_from_flags(parse_flags([*base, *extra])), 1, 1)

    paper = settings("--recipe", "paper")
    assert (paper.quant.init, paper.blockap.loss) == ("minmax", "mse")
    # the paper's record has no key for these choices: runs and resumes from before them compare equal
    assert "init" not in paper.blockap_record() and "loss" not in paper.blockap_record()
    # at 2 bits (the default width) the default is clip-huber, measured better there (docs/benchmarks.md)
    two_bits = settings()
    assert (two_bits.quant.init, two_bits.blockap.loss) == ("clip", "huber")
    assert two_bits == settings("--recipe", "clip-huber")
    assert two_bits.blockap_record() == paper.blockap_record() | {"init": "clip", "loss": "huber"}
    for bits in (3, 4):  # measured no better there: the paper's
        assert settings("--wbits", str(bits)) == settings("--wbits", str(bits), "--recipe", "paper")
    mixed = settings("--recipe", "paper", "--init", "clip", "--loss", "relative")
    assert (mixed.quant.init, mixed.blockap.loss) == ("clip", "relative")
    assert mixed.blockap_record() == paper.blockap_record() | {"init": "clip", "loss": "relative"}
    overridden = settings("--loss", "mse")  # one choice of the 2-bit default changed, the other kept
    assert (overridden.quant.init, overridden.blockap.loss) == ("clip", "mse")
    assert settings("--wbits", "3", "--init", "clip").blockap.loss == "mse"


@pytest.mark.parametrize("flag,device,split", [
    ([], "cpu", True), ([], "cuda", False),  # auto: split on the CPU, replicated on GPUs
    (["--weight-work", "split"], "cuda", True), (["--weight-work", "replicated"], "cpu", False),
])
def test_the_weight_work_of_a_data_parallel_group_is_split_as_asked_or_by_device(tmp_path, flag, device, split):
    import dataclasses

    import torch

    machine = parse_args(_args(tmp_path, *flag)).machine
    assert dataclasses.replace(machine, device=torch.device(device)).splits_weight_work is split


def _unfinished_blockap(tmp_path, **changed):
    """The output folder of a run of _args(tmp_path) stopped after two blocks (its manifest, two block files)."""
    record = parse_args(_args(tmp_path)).blockap_record() | changed
    blocks = tmp_path / "out" / "blockap"
    blocks.mkdir(parents=True)
    (blocks / "manifest.json").write_text(json.dumps(record))
    for i in range(2):
        (blocks / f"block_{i:04d}.safetensors").write_bytes(b"finished")


def test_overwrite_never_silently_discards_an_unfinished_run_of_the_same_settings(tmp_path):
    """A repeated command with --overwrite (the resume advice, followed) is refused naming both ways on,
    before anything is deleted; --discard-unfinished starts over; other settings are overwritten as asked."""
    _unfinished_blockap(tmp_path)
    with pytest.raises(UsageError, match=re.escape(
            "holds an unfinished run of these settings (2 finished Block-AP block(s)), which --overwrite would "
            "delete: to resume it, run the same command without --overwrite; to delete it and start over, add "
            "--discard-unfinished")):
        parse_args(_args(tmp_path, "--overwrite"))
    assert len(list((tmp_path / "out" / "blockap").glob("block_*"))) == 2
    assert parse_args(_args(tmp_path, "--overwrite", "--discard-unfinished")).discard_unfinished
    assert parse_args(_args(tmp_path)).overwrite is False  # without --overwrite: resumed
    assert parse_args(_args(tmp_path, "--overwrite", "--seed", "1")).overwrite  # other settings: nothing to resume
    with pytest.raises(UsageError, match="--discard-unfinished goes with --overwrite"):
        parse_args(_args(tmp_path, "--discard-unfinished"))


def test_overwrite_of_a_run_whose_e2e_is_still_to_come_is_refused_and_a_finished_one_is_redone(tmp_path):
    _results_of_a_run(tmp_path, "quantized")
    (tmp_path / "out" / "e2e_ckpt" / "step50").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"unfinished run of these settings \(Block-AP finished, E2E-QP checkpoint\(s\) "
                                         r"step50\)"):
        parse_args(_args(tmp_path, "--overwrite"))
    assert parse_args(_args(tmp_path, "--overwrite", "--phase", "block-ap")).overwrite  # that phase is finished


def test_the_resume_advice_names_the_command_that_resumes(tmp_path):
    from eqat_dist.cli import flag_message
    from eqat_dist.run_folder import RunFolder
    from eqat_dist.runner import kept

    _unfinished_blockap(tmp_path)
    folder = RunFolder(tmp_path / "out")
    assert kept(parse_args(_args(tmp_path)), folder).endswith("(Block-AP blocks); run the same command again to resume.")
    cfg = parse_args(_args(tmp_path, "--overwrite", "--discard-unfinished"))
    assert kept(cfg, folder, flag_message).endswith("run the same command without --overwrite to resume.")
    assert kept(cfg, RunFolder(tmp_path / "empty")) == ""


def test_a_stop_signal_is_raised_where_the_main_thread_is_and_names_its_exit_code():
    """SIGTERM always, SIGUSR1 by default, others when asked; each becomes Stopped (a KeyboardInterrupt),
    exit code 128 + its number; a second signal while the first is handled is ignored."""
    import signal

    from eqat_dist.utils.stop import Stopped, exit_code, parse_signals, stop_on

    assert parse_signals("USR1") == ("USR1",) and parse_signals("none") == () and parse_signals("sigusr2,TERM") == ("USR2",)
    with pytest.raises(ValueError, match="`stop_signals` KILL: KILL is not one of"):
        parse_signals("KILL")
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        for signum, asked in ((signal.SIGTERM, ()), (signal.SIGUSR1, ("USR1",)), (signal.SIGUSR2, ("USR2",))):
            stop_on(asked)
            with pytest.raises(Stopped) as caught:
                os.kill(os.getpid(), signum)
                for _ in range(1000):  # the handler runs at the next instruction of the main thread
                    time.sleep(0.001)
            assert isinstance(caught.value, KeyboardInterrupt) and exit_code(caught.value) == 128 + signum
            assert signal.getsignal(signum) == signal.SIG_IGN  # the stop in hand is not cut short by a second one
        stop_on(())
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # no longer asked: the default again
        assert exit_code(KeyboardInterrupt()) == 130
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_the_lock_of_a_run_that_fails_is_released_before_an_exit_that_skips_atexit(tmp_path):
    from eqat_dist.utils.lock import LOCK, acquire, release_held

    acquire(tmp_path)
    assert (tmp_path / LOCK).exists()
    release_held()
    assert not (tmp_path / LOCK).exists()


def test_the_command_rebuilt_from_a_runs_flags_gives_its_settings_config_file_included(tmp_path):
    """What results.json records (every flag's value) gives a command line with the same settings; a config
    file's settings are written out as flags."""
    import shlex

    from eqat_dist.cli import command_line, invocation, parse_flags
    from eqat_dist.config.from_flags import settings_from_flags

    (tmp_path / "run.yaml").write_text("wbits: 3\ne2e-lr: 3.0e-5\nno_train_norms: true\nzeroshot_tasks: piqa\n")
    argv = _args(tmp_path, "--config", str(tmp_path / "run.yaml"), "--epochs", "1", "--eval-datasets", "wiki",
                 "--calib-dataset", "my corpus.txt")
    flags = parse_flags(argv)
    made = invocation(argv, flags)
    words = shlex.split(made.command)
    assert words[0] == "eqat-dist" and "--config" not in words and "--no-train-norms" in words
    assert words[words.index("--calib-dataset") + 1] == "my corpus.txt" and "--wbits" in words
    again = parse_flags(words[1:])
    assert {k: v for k, v in vars(again).items() if k != "config"} == {k: v for k, v in vars(flags).items() if k != "config"}
    assert settings_from_flags(again) == settings_from_flags(flags)
    assert command_line({"model": "m", "output": "o", "wbits": 2}) == "eqat-dist --model m --output o"  # defaults left out


def test_help_names_the_other_commands_and_a_plan_on_a_cpu_machine_says_its_gpu_is_assumed(capsys):
    from eqat_dist.cli import build_parser, main

    text = build_parser().format_help()
    assert "eqat-dist plan" in text and "eqat-dist export" in text
    assert main(["plan", "--model", "llama-2-7b", "--ranks", "8", "--host-memory", "1024"]) in (0, 1)
    first = capsys.readouterr().out.splitlines()[0]
    assert "A100 80 GiB (assumed: this machine has no GPU; --gpu and --gpu-memory set yours" in first
    main(["plan", "--model", "llama-2-7b", "--gpu", "h100", "--gpu-memory", "80"])
    assert "H100 80 GiB, host" in capsys.readouterr().out.splitlines()[0]


def test_blocks_whose_loss_does_not_move_give_a_warning_early():
    from eqat_dist.utils.monitor import stalled_warning

    still = [{"index": 0, "loss_before": 8303.0, "loss_after": 8302.9}, {"index": 1, "loss_before": 10.0, "loss_after": 9.99}]
    line = stalled_warning(still, 32, 1e-4, 2e-5)
    assert line.startswith("[block-ap] warning: the loss of blocks 0, 1 barely moved (-0.00%, -0.10%) in 32 steps")
    assert "--quant-lr 0.0001 and --weight-lr 2e-05 are likely too small" in line
    moved = still[:1] + [{"index": 1, "loss_before": 10.0, "loss_after": 7.0}]
    assert stalled_warning(moved, 32, 1e-4, 2e-5) is None


def test_bad_sequence_parallel_layouts_are_refused_in_one_line_before_any_work(tmp_path):
    """S that does not cut the window into 2S chunks, D x S that does not divide the ranks, a family whose
    attention the split does not reproduce, torch.compile with the split attention."""
    from dataclasses import replace

    from eqat_dist import preflight
    from eqat_dist.config import ConfigError
    from eqat_dist.settle import _layout_default

    with pytest.raises(UsageError, match=r"--seqlen 2048 does not cut into 2 x --sequence-parallel 3 = 6 equal chunks"):
        parse_args(_args(tmp_path, "--sequence-parallel", "3"))
    with pytest.raises(UsageError, match="--compile does not take the split attention of --sequence-parallel"):
        parse_args(_args(tmp_path, "--sequence-parallel", "2", "--compile"))
    with pytest.raises(ConfigError, match=r"`data_parallel` 2 x `sequence_parallel` 2 = 4 ranks per group must divide "
                                          r"the 6 ranks"):
        _layout_default(2, 2, 2, 2048, 6, 6, None)
    with pytest.raises(ConfigError, match="`sequence_parallel` 4 must divide the 6 ranks"):
        _layout_default(None, 4, 2, 2048, 6, 6, None)
    assert _layout_default(None, None, 2, 2048, 8, 8, None) == (2, 4)  # the paper's arithmetic on a node
    assert _layout_default(None, None, 2, 2048, 8, 8, "pipelined") == (2, 1)  # groups of D, as before
    assert _layout_default(None, None, 2, 2049, 8, 8, None) == (2, 1)  # the windows do not cut: S = 1
    assert _layout_default(None, None, 2, 2048, 8, 8, None, splittable=False) == (2, 1)
    other = tmp_path / "phi"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "phi"}))
    with pytest.raises(UsageError, match="--sequence-parallel 2 must divide the 1 ranks"):
        parse_args(_args(tmp_path, "--sequence-parallel", "2"))
    cfg = parse_args(_args(tmp_path))
    cfg = replace(cfg, blockap=replace(cfg.blockap, sequence_parallel=2), model_config=other / "config.json")
    with pytest.raises(preflight.PreflightError, match="`sequence_parallel` splits the attention of llama, mistral, "
                                                       "qwen2, gemma3_text models; phi is not one of them"):
        preflight.check_sequence_parallel(cfg)


def test_every_declared_setting_has_one_default_in_the_parser_the_run_config_and_the_planner():
    """Each setting is declared once (config/declare.py): walking the declarations, the parser's flag
    defaults to it, the RunConfig built from a command line that leaves it out holds it (or what its rule
    gives: the recipe's, the width's), and the planner's default settings hold it. A flag that is not a
    declared setting is one of the command line's own (named here), so a new one cannot bypass this."""
    import dataclasses

    from eqat_dist.cli import parse_flags
    from eqat_dist.config.declare import declared, flag_default, flag_of
    from eqat_dist.config.from_flags import settings_from_flags
    from eqat_dist.config.run_config import SETTING_PARTS, RunConfig, per_width_lr
    from eqat_dist.planning.estimate import Settings

    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    settings = declared(SETTING_PARTS)
    assert set(actions) - {flag.dest for _, _, flag in settings} == {"help", "config", "recipe", "device", "local_rank"}
    cfg = settings_from_flags(parse_flags(["--model", "m", "--output", "o"]))
    plan = Settings()
    run_parts = {f.type: f.name for f in dataclasses.fields(RunConfig)}  # part's class name -> its field
    plan_parts = {f.type: f.name for f in dataclasses.fields(Settings)}
    by_rule = {"init": "clip", "loss": "huber", "weight_lr": per_width_lr(None, 2), "e2e_lr": per_width_lr(None, 2),
               "e2e_data": "boolq"}  # at the default 2 bits: clip-huber's choices, the paper's 2-bit rates
    checked = 0
    for part, field, flag in settings:
        assert actions[flag.dest].default == flag_default(field, flag), flag.dest
        holder = cfg if part is RunConfig else getattr(cfg, run_parts[part.__name__])
        declared_default = None if field.default is dataclasses.MISSING else field.default
        want = by_rule.get(flag.dest, declared_default)
        if flag.dest in ("model", "output", "from_dir", "export_format"):  # given above; gptq_v2 is resolved later
            continue
        assert getattr(holder, field.name) == want, flag.dest
        if part.__name__ in plan_parts and flag.dest != "activations":  # a plan's stores are placed (cpu)
            assert getattr(getattr(plan, plan_parts[part.__name__]), field.name) == declared_default, flag.dest
        checked += 1
    assert checked >= 55
    assert flag_of(RunConfig, next(f for f in dataclasses.fields(RunConfig) if f.name == "invocation")) is None


def test_a_run_or_a_plan_without_a_model_is_refused_in_one_line_naming_what_model_takes(capsys):
    from eqat_dist.cli import main

    assert main(["--wbits", "2", "--output", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "eqat-dist: error: --model is required (hub id, local folder, .gguf file, or bundled name (smollm2-135m))"
    assert main(["plan", "--wbits", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eqat-dist plan: error: --model is required (a folder with config.json, a hub id, or one of ")
    assert "llama-2-70b" in err[-1] and "smollm2-135m" in err[-1]
