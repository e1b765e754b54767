"""Distributed Block-AP on 2 CPU ranks (loopback only): equality with one process, both launchers,
and a rank killed mid-run."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import export_tensors, one_process_env, sigint_as_default, tiny_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = str(ROOT / "launch" / "run.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer
    from eqat_dist.models.loading import bundled_model_dir

    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", layers=4, vocab=49152).save_pretrained(folder)  # the real tokenizer's vocabulary
    AutoTokenizer.from_pretrained(str(bundled_model_dir())).save_pretrained(folder)
    return folder


def _args(model_dir, out, mode, train_size=8, epochs=2, extra=(), dp=1):
    """dp: --data-parallel (None: the default layout); 1, the round-robin over ranks, unless a test says."""
    return [*extra, *(["--data-parallel", str(dp)] if dp else []), "--model", str(model_dir), "--wbits", "2", "--group-size", "32", "--output", str(out),
            "--epochs", str(epochs), "--phase", "block-ap", "--train-size", str(train_size), "--val-size", "2", "--seqlen", "32",
            "--eval-datasets", "news", "--zeroshot-tasks", "", "--eval-seqlen", "32", "--eval-max-windows", "2", "--quant-lr", "1e-3",
            "--weight-lr", "1e-4", "--skip-fp-eval", "--student-input", mode,
            *(["--correction-fraction", "0.5"] if mode == "pipelined" else [])]


def _single(model_dir, out, mode, **kw):
    subprocess.run([sys.executable, RUN, *_args(model_dir, out, mode, **kw)], check=True, env=one_process_env(),
                   capture_output=True)


def _mpi(n, model_dir, out, mode, **kw):
    return [str(BIN / "mpiexec"), "-n", str(n), sys.executable, RUN, *_args(model_dir, out, mode, **kw)]


def _same_model(a, b):
    sa, sb = export_tensors(a), export_tensors(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _same_steps(a, b):
    """Data parallel against one rank: the same steps up to float summation order (checked within 1e-5
    per step in test_data_parallel.py). Block 0 (its input is the embeddings, the same in both) within
    1e-5 here too; a packed integer that rounds the other way at a boundary changes the later blocks'
    input a little (at 2 bits on this random model, up to 2% in block 3's loss), so there: within 5%,
    and almost every packed integer equal. A shard handed to the wrong rank would be far off."""
    import json

    ra, rb = (json.loads((Path(x) / "results.json").read_text())["blocks"] for x in (a, b))
    assert ra[0]["val_losses"] == pytest.approx(rb[0]["val_losses"], rel=1e-5)
    for block_a, block_b in zip(ra, rb, strict=True):
        assert block_a["val_losses"] == pytest.approx(block_b["val_losses"], rel=5e-2), block_a["index"]
    sa, sb = export_tensors(a), export_tensors(b)
    assert sa.keys() == sb.keys()
    packed = [k for k in sa if not sa[k].is_floating_point()]
    assert sum((sa[k] != sb[k]).sum().item() for k in packed) <= 1e-2 * sum(sa[k].numel() for k in packed)


@pytest.fixture(scope="module")
def references(model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    for mode in ("teacher", "student", "pipelined"):
        _single(model_dir, base / mode, mode)
    return base


def test_teacher_mode_two_mpi_ranks_bit_identical_to_one(model_dir, references, tmp_path):
    result = subprocess.run(_mpi(2, model_dir, tmp_path / "out", "teacher"), env=one_process_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 rank(s) over mpi" in result.stdout
    assert _same_model(references / "teacher", tmp_path / "out")


def test_student_mode_two_mpi_ranks_equal_the_single_process_paper_mode(model_dir, references, tmp_path):
    result = subprocess.run(_mpi(2, model_dir, tmp_path / "out", "student"), env=one_process_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _same_model(references / "student", tmp_path / "out")
    assert not _same_model(references / "teacher", tmp_path / "out")  # the two modes really differ


def test_pipelined_mode_two_mpi_ranks_bit_identical_to_one(model_dir, references, tmp_path):
    """Across ranks the quantized stream lands, at the switch, in the store of the fp input the block no
    longer reads: two stores per split, not the three one rank holds, and the same run."""
    result = subprocess.run(_mpi(2, model_dir, tmp_path / "out", "pipelined"), env=one_process_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in (0, 1):
        line = re.search(rf"^\[rank {rank}/2\] .*activation stores on cpu: (.*); total", result.stdout, re.M)
        assert line and re.findall(r"(\w+?)_(?:train|val) \d", line[1]) == ["fp", "fp", "fp_out", "fp_out"], line
    assert _same_model(references / "pipelined", tmp_path / "out")
    assert not _same_model(references / "student", tmp_path / "out")
    assert not _same_model(references / "teacher", tmp_path / "out")


@pytest.mark.parametrize("mode", ["pipelined", "student"])
def test_the_quantized_stream_sent_in_reading_order_is_bit_identical_to_one_process(model_dir, tmp_path, mode):
    """32 windows: four chunks of each block's quantized input, advanced and sent in the order the
    receiving block's steps read them (from its switch, or its first step; pipelines/stream_order.py),
    and that block training as they come in: the one-process run exactly. A chunk in the wrong rows, or
    a step reading rows still in flight, would change the model."""
    from eqat_dist.blockap.lanes import Lanes, step_generator
    from eqat_dist.pipelines.schedules import schedule_named
    from eqat_dist.pipelines.stream_order import by_first_read, chunks

    lanes = Lanes(32, 2)
    total = 2 * lanes.steps_per_epoch
    switch = schedule_named(mode, 0.5).switch_at(total) or 0
    orders = [by_first_read(32, 8, lanes.first_reads(step_generator(0, i), 2, switch)) for i in (1, 2, 3)]
    assert any(order != chunks(32, 8) for order in orders)  # the test sends chunks out of row order
    _single(model_dir, tmp_path / "ref", mode, train_size=32)
    result = subprocess.run(_mpi(2, model_dir, tmp_path / "out", mode, train_size=32), env=one_process_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _same_model(tmp_path / "ref", tmp_path / "out")


def test_deepspeed_launcher_uses_torch_distributed_and_matches(model_dir, references, tmp_path):
    env = one_process_env()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           env["MASTER_PORT"], RUN, *_args(model_dir, tmp_path / "out", "pipelined")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 rank(s) over torch.distributed" in result.stdout
    assert _same_model(references / "pipelined", tmp_path / "out")


def test_data_parallel_is_the_default_on_two_mpi_ranks_and_takes_one_ranks_steps(model_dir, references, tmp_path):
    """The paper's batch 2 on 2 ranks: one group of 2, each rank holds half the windows, the gradients
    are summed every step, and the run is the single-process one up to float summation order."""
    result = subprocess.run(_mpi(2, model_dir, tmp_path / "out", "student", dp=None), env=one_process_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 rank(s) over mpi in 1 group(s) of 2 (data parallel, weight work split)" in result.stdout
    assert re.search(r"^\[rank 1/2\] .* blocks \[0, 1, 2, 3\] \(group 0, 4 of 8 train windows\); activation stores",
                     result.stdout, re.M), result.stdout[-2000:]
    assert len(re.findall(r"^\[block-ap\] block \d of 4", result.stdout, re.M)) == 4  # one line per block, not per rank
    _same_steps(references / "student", tmp_path / "out")


@pytest.fixture(scope="module")
def outlier_model_dir(tmp_path_factory):
    """The tiny model with massive activations in block 0, as SmolLM2 has from block 11 on: one token in
    seven embedded along one channel, which block 0's MLP amplifies, so that about 13% of the tokens' errors
    are past the Huber loss's threshold (100x the step's median) and the threshold, the 2-bit default's,
    shapes the steps."""
    from transformers import AutoTokenizer
    from eqat_dist.models.blocks import decoder_layers
    from eqat_dist.models.loading import bundled_model_dir

    folder = tmp_path_factory.mktemp("outliers")
    model = tiny_model("llama", layers=2, vocab=49152)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[::7] = 0.0
        embedding[::7, 0] = 1.0
        mlp = decoder_layers(model)[0].mlp
        mlp.gate_proj.weight[:, 0] *= 5.0
        mlp.up_proj.weight[:, 0] *= 5.0
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(bundled_model_dir())).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("recipe", ["clip-huber", "paper"])
def test_data_parallel_takes_one_ranks_steps_with_the_2_bit_default_recipe_too(outlier_model_dir, tmp_path, recipe):
    """D = 2 against one rank at the same global batch, over MPI: every block's training and validation
    losses within float summation order, with the Huber loss (its threshold from the whole step's median
    token error, not each rank's half) as with the paper's MSE."""
    import json

    extra = ("--recipe", recipe, "--batch-size", "4")
    _single(outlier_model_dir, tmp_path / "one", "student", train_size=16, epochs=1, extra=extra)
    result = subprocess.run(_mpi(2, outlier_model_dir, tmp_path / "two", "student", train_size=16, epochs=1,
                                 extra=extra, dp=2), env=one_process_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = (json.loads((tmp_path / run / "results.json").read_text())["blocks"] for run in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        assert b["train_loss_first"] == pytest.approx(a["train_loss_first"], rel=1e-5), a["index"]
        assert b["train_loss_last"] == pytest.approx(a["train_loss_last"], rel=1e-5), a["index"]
        assert b["val_losses"] == pytest.approx(a["val_losses"], rel=1e-5), a["index"]


def _same_losses(one: Path, other: Path) -> None:
    """Every block's first and last training loss and its validation losses within 1e-5 (the same steps,
    floats summed in another order); the packed integers equal but for a rare rounding at a boundary,
    the exported (float16) scales within one step of their grid."""
    import json

    a, b = (json.loads((run / "results.json").read_text())["blocks"] for run in (one, other))
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss_first", "train_loss_last", "val_losses"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), (x["index"], key)
    sa, sb = export_tensors(one), export_tensors(other)
    packed = [k for k in sa if not sa[k].is_floating_point()]
    assert sum((sa[k] != sb[k]).sum().item() for k in packed) <= 1e-3 * sum(sa[k].numel() for k in packed)
    for k in (k for k in sa if k.endswith(".scales")):  # float16 in the export: one step of it at most
        assert ((sa[k].float() - sb[k].float()).abs().max() <= 1e-3 * sa[k].float().abs().max()), k


@pytest.fixture(scope="module")
def one_rank_runs(outlier_model_dir, tmp_path_factory):
    """One rank's run per (recipe, global batch), made when a test first asks for it."""
    base, made = tmp_path_factory.mktemp("one_rank"), {}

    def run(recipe: str, batch: int) -> Path:
        if (recipe, batch) not in made:
            out = base / f"{recipe}-{batch}"
            _single(outlier_model_dir, out, "student", train_size=16, epochs=1,
                    extra=("--recipe", recipe, "--batch-size", str(batch)))
            made[recipe, batch] = out
        return made[recipe, batch]
    return run


@pytest.mark.parametrize("launcher,data_parallel,sequence_parallel,recipe", [
    ("mpi", 1, 2, "clip-huber"), ("mpi", 1, 2, "paper"), ("mpi", 1, 4, "clip-huber"), ("mpi", 2, 2, "clip-huber"),
    ("deepspeed", 1, 2, "clip-huber")])
def test_sequence_parallel_groups_take_one_ranks_steps(outlier_model_dir, one_rank_runs, tmp_path, launcher,
                                                       data_parallel, sequence_parallel, recipe):
    """S ranks splitting every window's tokens (and D = 2 x S = 2), over MPI and over gloo (the deepspeed
    launcher), with the 2-bit default recipe (the Huber threshold over the whole step's tokens; this
    model's massive activations put 13% of them past it) and the paper's: one rank's steps."""
    ranks, batch = data_parallel * sequence_parallel, 2 * data_parallel
    extra = ("--recipe", recipe, "--batch-size", str(batch), "--sequence-parallel", str(sequence_parallel))
    args = _args(outlier_model_dir, tmp_path / "split", "student", train_size=16, epochs=1, extra=extra,
                 dp=data_parallel)
    env = one_process_env()
    cmd = [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, RUN, *args] if launcher == "mpi" else \
        [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port",
         env["MASTER_PORT"], RUN, *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    layout = "sequence parallel" if data_parallel == 1 else f"data parallel 2 x sequence parallel {sequence_parallel}"
    assert f"in 1 group(s) of {ranks} ({layout}, weight work split)" in result.stdout, result.stdout[-2000:]
    assert re.search(rf"^\[rank 0/{ranks}\] .*tokens 0-\d+,\d+-31 of 32\)", result.stdout, re.M)
    _same_losses(one_rank_runs(recipe, batch), tmp_path / "split")


def test_a_group_whose_ranks_share_a_gpu_is_told_apart_from_one_with_a_gpu_per_rank():
    """NCCL refuses two ranks on one GPU (the first H200 loan: 2 ranks on 1 GPU stopped at their first
    sum); such a group sums over gloo. Told by the GPUs' own identities, not local ranks: under a
    scheduler every rank may see its own GPU as device 0."""
    from eqat_dist.cluster.transport import groups_with_own_gpus

    assert groups_with_own_gpus(["a", "b", "c", "d"], 2) == [True, True]
    assert groups_with_own_gpus(["a", "a", "b", "c"], 2) == [False, True]
    assert groups_with_own_gpus(["a", "b", "a", "b"], 2) == [True, True]  # the same GPUs, other groups
    assert groups_with_own_gpus(["a", "b", "c", "a"], 4) == [False]


@pytest.mark.parametrize("backend", ["mpi", "gloo"])
def test_a_groups_reduce_scatter_sum_and_broadcast_over_three_ranks(backend):
    """The collectives the data-parallel step is made of, on real processes: a reduce-scatter with
    segments of uneven sizes and an empty one (MPI: one Ireduce_scatter; torch.distributed: one reduce
    per segment), a sum started beside it, a broadcast from the last rank."""
    script, env = str(ROOT / "tests" / "helpers" / "group_collectives.py"), one_process_env()
    if backend == "mpi":
        done = [subprocess.run([str(BIN / "mpiexec"), "-n", "3", sys.executable, script], env=env,
                               capture_output=True, text=True, timeout=180)]
    else:
        ranks = [subprocess.Popen([sys.executable, script], env=env | {"RANK": str(r), "WORLD_SIZE": "3"},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(3)]
        outputs = [p.communicate(timeout=180) for p in ranks]  # read as they run: a full pipe would block a rank
        done = [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(ranks, outputs)]
    out = "".join(d.stdout for d in done)
    assert all(d.returncode == 0 for d in done), out + "".join(d.stderr for d in done)[-3000:]
    kind = "mpi" if backend == "mpi" else "torch.distributed"
    assert sorted(re.findall(rf"group collectives OK on rank (\d) of 3 over {re.escape(kind)}", out)) == ["0", "1", "2"]


def test_data_parallel_under_deepspeed_sums_over_a_torch_distributed_group(model_dir, references, tmp_path):
    env = one_process_env()
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           env["MASTER_PORT"], RUN, *_args(model_dir, tmp_path / "out", "student", dp=2)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "over torch.distributed in 1 group(s) of 2 (data parallel, weight work split)" in result.stdout
    _same_steps(references / "student", tmp_path / "out")


def test_two_groups_of_two_ranks_pipelined_match_two_ranks(model_dir, references, tmp_path):
    """4 ranks, --data-parallel 2: blocks alternate over 2 groups, rank d of a group hands its share to
    rank d of the next; the pipelined schedule across the groups gives the 2-rank result. With the weight
    work replicated on each rank (the GPU default; split on the CPU, as in the tests above)."""
    result = subprocess.run(_mpi(4, model_dir, tmp_path / "out", "pipelined", dp=2, extra=["--weight-work", "replicated"]),
                            env=one_process_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 rank(s) over mpi in 2 group(s) of 2 (data parallel, weight work replicated)" in result.stdout
    assert re.search(r"^\[rank 3/4\] .* blocks \[1, 3\] \(group 1, 4 of 8 train windows\)", result.stdout, re.M)
    _same_steps(references / "pipelined", tmp_path / "out")


def _kill_rank_1_of_2_mid_run(model_dir, tmp_path, kw, dp, extra=()):
    """A one-process reference in tmp_path/ref, then 2 MPI ranks in tmp_path/run with rank 1 killed once
    block 1 is saved; the run must stop within 30 s. Returns (run folder, killed pid, stdout, all output)."""
    _single(model_dir, tmp_path / "ref", "student", **kw)
    out = tmp_path / "run"
    proc = subprocess.Popen(_mpi(2, model_dir, out, "student", dp=dp, extra=extra, **kw), env=one_process_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _when_block_exists(proc, out, "block_0001.safetensors")
    pid = _rank_pid(str(out), 1)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.time() - killed_at < 30
    return out, pid, stdout, stdout + stderr


@pytest.mark.parametrize("layout", ["data", "sequence"])
def test_a_killed_rank_stops_its_group_and_a_restart_with_another_layout_completes(model_dir, tmp_path, layout):
    """Rank 1 of a group of 2 (data parallel, or sequence parallel) killed mid-block: the run stops,
    naming the rank, the group, the rank's share and the block where MPI lets a rank speak; one rank
    then finishes the run with the steps of one rank."""
    kw = dict(train_size=16, epochs=3)
    extra = ("--sequence-parallel", "2") if layout == "sequence" else ()
    out, pid, stdout, said = _kill_rank_1_of_2_mid_run(model_dir, tmp_path, kw, dp=2 if layout == "data" else 1,
                                                      extra=extra)
    share = r"8 of 16 train windows" if layout == "data" else r"tokens 0-7,24-31 of 32"
    assert re.search(rf"PID {pid} RUNNING AT", said) or re.search(
        rf"rank 0 stopping at block \d+ \(.*; group 0, {share}\): lost a rank of [\w-]+ group 0 \(ranks 0-1\)",
        said), said[-3000:]
    assert not (out / "results.json").exists()
    again = subprocess.run([sys.executable, RUN, *_args(model_dir, out, "student", **kw)], env=one_process_env(),
                           capture_output=True, text=True)  # one rank now
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[resume]" in again.stdout
    _same_steps(tmp_path / "ref", out)


def _rank_pid(marker: str, rank: int, rank_vars=("PMI_RANK", "RANK")) -> int | None:
    """The pid of the python process of `rank` whose command line mentions `marker`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if any(marker.encode() in c for c in cmd) and b"python" in cmd[0] and RUN.encode() in cmd \
                and any(env.get(v.encode()) == str(rank).encode() for v in rank_vars):
            return int(proc.name)
    return None


def _when_block_exists(proc, out: Path, block_file: str) -> None:
    deadline = time.time() + 120
    while not (out / "blockap" / block_file).exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal was sent"
        time.sleep(0.05)


def _kill_rank_when(proc, out: Path, rank: int, block_file: str):
    _when_block_exists(proc, out, block_file)
    pid = _rank_pid(str(out), rank)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return time.time()


def test_killed_mpi_rank_stops_the_run_and_a_restart_on_one_rank_completes_identically(model_dir, tmp_path):
    kw = dict(train_size=16, epochs=3)
    out, pid, stdout, said = _kill_rank_1_of_2_mid_run(model_dir, tmp_path, kw, dp=1)
    # whoever notices first stops the job: MPI's launcher (naming only the pid), or rank 0 (naming rank 1)
    assert re.search(rf"PID {pid} RUNNING AT", said) or re.search(r"rank 0 stopping at block \d+ \(.*\): lost rank 1 ",
                                                                  said), said[-3000:]
    assert re.search(rf"^\[rank 1/2\] pid {pid} on ", stdout, re.M), stdout[-2000:]  # our log maps pid to rank
    assert not (out / "results.json").exists()
    assert (out / "blockap" / "block_0000.safetensors").exists()
    # same command, other number of ranks: reuses the finished blocks, says where each rank was, completes
    again = subprocess.run([sys.executable, RUN, *_args(model_dir, out, "student", **kw)], env=one_process_env(),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert re.search(rf"^\[resume\] rank 1 \(pid {pid} on \S+\) was at block \d+ \(.*\) when the earlier run "
                     "stopped$", again.stdout, re.M), again.stdout[-2000:]
    assert _same_model(tmp_path / "ref", out)


def test_killed_rank_under_deepspeed_is_named_by_its_peer(model_dir, tmp_path):
    env = one_process_env()
    out = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port",
           env["MASTER_PORT"], RUN, *_args(model_dir, out, "student", train_size=16, epochs=3)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = _kill_rank_when(proc, out, 1, "block_0000.safetensors")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.time() - killed_at < 30
    # whoever notices first stops the job: rank 0 (naming rank 1), or DeepSpeed's launcher, which polls its
    # children every second and kills the others once one has died, naming the dead one's command (a
    # loaded machine can let it come first, as MPI's launcher in the test above)
    ours = re.search(r"rank 0 stopping at block \d+ \(.*\): lost rank 1", output)
    launcher = re.search(r"'--local_rank=1'.*exits with return code = -9", output)
    assert ours or launcher, output[-3000:]
    if ours:
        assert "run the same command again to resume" in output


def test_deepspeed_gets_nccl_on_gpus_and_activations_travel_in_a_gloo_group(monkeypatch):
    """Under the deepspeed launcher the transport creates the default process group first: on GPUs
    it must be NCCL (ZeRO-3's collectives run on it), with a gloo group of its own for host buffers."""
    import torch.distributed as dist

    from eqat_dist.cluster.transport import TorchTransport, backends

    assert backends(cuda=True) == ("nccl", "gloo") and backends(cuda=False) == ("gloo", "gloo")
    calls = {}
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("default", backend))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: calls["default"])
    monkeypatch.setattr(dist, "new_group", lambda backend=None, timeout=None, **kw:
                        calls.setdefault("transport", backend) and calls.setdefault("timeout_h", timeout.total_seconds() / 3600) and backend)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    transport = TorchTransport()
    assert calls == {"default": "nccl", "transport": "gloo", "timeout_h": 168} and transport.group == "gloo"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_to_one_mpi_rank_or_sigterm_to_the_job_stops_both_naming_the_rank_and_block(model_dir, tmp_path, signum):
    """SIGINT to rank 1 while it waits for rank 0's stream, or SIGTERM to mpiexec (a scheduler stopping the
    job; mpiexec passes it to every rank): the run ends at once (MPI Abort) with 128 + the signal, it does
    not hang, and the output's lock is released for the run that resumes."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_mpi(2, model_dir, out, "student", train_size=16, epochs=3), env=one_process_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_default)
    _when_block_exists(proc, out, "block_0000.safetensors")
    pid = _rank_pid(str(out), 1)
    assert pid is not None
    os.kill(pid if signum == signal.SIGINT else proc.pid, signum)
    interrupted_at = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and time.time() - interrupted_at < 30, (proc.returncode, stderr[-3000:])
    said = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert re.search(rf"rank {1 if signum == signal.SIGINT else '[01]'} {said} at block \d+ \(.*\)\. Finished work is "
                     "kept in", stdout + stderr), (stdout + stderr)[-3000:]
    assert not (out / ".eqat-dist.lock").exists()


def test_a_stopped_mpi_rank_ends_the_run_within_the_peer_timeout_naming_it(model_dir, tmp_path):
    """SIGSTOP to rank 1 (nothing dies, nothing is sent): rank 0 notices its silent heartbeat within
    --peer-timeout, names it and where it was, and MPI ends both (the stopped one included)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_mpi(2, model_dir, out, "student", train_size=16, epochs=3,
                                 extra=("--peer-timeout", "10")), env=one_process_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _when_block_exists(proc, out, "block_0000.safetensors")
    pid = _rank_pid(str(out), 1)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        for sig in (signal.SIGKILL, signal.SIGCONT):  # never leave a stopped process behind
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0 and time.time() - stopped_at < 60, (stdout + stderr)[-3000:]
    assert re.search(r"rank 0 stopping at block \d+ \(.*\): rank 1 has given no sign of life for \d+ s "
                     r"\(last seen at block \d+ \(.*\)\); it is stopped or hung", stdout + stderr), (stdout + stderr)[-3000:]


def test_heartbeat_names_a_silent_peer_and_not_a_working_or_finished_one(tmp_path):
    import time as clock

    from eqat_dist.cluster.heartbeat import Heartbeat
    from eqat_dist.cluster.transport import PeerFailure

    mine = Heartbeat(tmp_path, 0, 2, timeout=1.5, where=lambda: " (waiting)")
    peer = Heartbeat(tmp_path, 1, 2, timeout=1.5, where=lambda: " at block 3 (training)")
    for _ in range(8):  # 2.4 s: longer than the timeout, but the peer keeps beating
        mine.check()
        clock.sleep(0.3)
    peer._stop.set()  # as if SIGSTOPped: its thread beats no more
    peer._thread.join()
    with pytest.raises(PeerFailure, match=r"rank 1 has given no sign of life for \d+ s \(last seen at block 3 \(training\)\)"):
        for _ in range(20):
            mine.check()
            clock.sleep(0.2)
    peer._beat(done=True)  # a rank that finished its part is not waited on
    for _ in range(10):
        mine.check()
        clock.sleep(0.2)
    mine.close()


def test_heartbeat_does_not_blame_peers_for_a_pause_of_the_whole_job(tmp_path):
    """SIGSTOP and SIGCONT to every rank (or a suspended machine): the checker itself was not running,
    so the peers' silence in that time is not held against them."""
    import time as clock

    from eqat_dist.cluster.heartbeat import Heartbeat

    mine = Heartbeat(tmp_path, 0, 2, timeout=1.0, where=lambda: " (waiting)")
    peer = Heartbeat(tmp_path, 1, 2, timeout=1.0, where=lambda: " at block 1 (training)")
    mine.check()
    peer._stop.set()
    peer._thread.join()
    clock.sleep(1.5)  # as if both were stopped: nobody checked, nobody beat
    mine.check()  # the first check after the pause: the peer has not had a chance to beat yet
    peer._beat()  # it goes on
    mine.check()
    mine.close()


def test_a_move_is_in_the_heartbeat_file_at_once_not_at_the_threads_next_look(tmp_path):
    """A rank killed or stopped right after it moves on must be reported where it was: the move is
    written by the rank itself, before the next statement runs (the thread looks only every 0.5 s)."""
    import json

    from eqat_dist.cluster.heartbeat import Heartbeat
    from eqat_dist.utils.progress import Progress

    progress = Progress()
    beat = Heartbeat(tmp_path, 1, 2, timeout=600, where=progress.where)
    beat._stop.set()  # no thread: only the rank's own writes can change the file
    beat._thread.join()
    progress.on_change = beat.moved
    progress.block, progress.phase = 3, "waiting for the student stream"
    assert json.loads((tmp_path / "rank1").read_text())["where"] == " at block 3 (waiting for the student stream)"
    progress.on_change = None
    progress.phase = "training"  # not watched any more: the file keeps the last move
    assert json.loads((tmp_path / "rank1").read_text())["where"] == " at block 3 (waiting for the student stream)"
