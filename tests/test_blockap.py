"""Block-AP: the trainer on one block and the single-process schedule."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import export_tensors, tiny_model
from eqat_dist.blockap.checkpoint import ResumeError, block_path
from eqat_dist.blockap.steps import make_student
from eqat_dist.blockap.stores import ActivationStore
from eqat_dist.config import StreamsConfig
from eqat_dist.blockap.trainer import BlockAPSettings, NonFiniteLossError, train_block
from eqat_dist.models import decoder_layers, embed, record_block_calls, run_block
from eqat_dist.models.quantize import quant_linears
from eqat_dist.models.lazy import LazyModel
from eqat_dist.pipelines import round_robin as local
from eqat_dist.blockap.steps import assemble
from eqat_dist.pipelines.round_robin import StreamSpec, run_blockap
from eqat_dist.quant import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = QuantConfig(2, 32)
FAST = BlockAPSettings(epochs=2, batch_size=2, quant_lr=1e-3, weight_lr=1e-4, seed=0)


def _stores(tensors):
    out = []
    for t in tensors:
        s = ActivationStore(len(t), t.shape[1], t.shape[2], torch.float32, "cpu", torch.device("cpu"))
        s.put(list(range(len(t))), t)
        out.append(s)
    return out


def _block_setup(seed=0):
    model = tiny_model("llama", layers=2, seed=seed)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(seed))
    _, calls = record_block_calls(model, ids[:1])
    x = embed(model, ids)
    fp_block = decoder_layers(model)[0]
    with torch.no_grad():
        y = run_block(fp_block, x, calls[0])
    return fp_block, calls[0], x, y


def test_training_lowers_the_loss_and_moves_weights_steps_and_zero_points():
    fp_block, call, x, y = _block_setup()
    student = make_student(fp_block, CFG, "cpu")
    before = {n: (q.weight.clone(), q.scale.clone(), q.zero.clone()) for n, q in quant_linears(student).items()}
    xs, ys, vx, vy = _stores([x[:6], y[:6], x[6:], y[6:]])
    report = train_block(student, 0, xs, ys, vx, vy, call, BlockAPSettings(epochs=8, batch_size=2, quant_lr=1e-3,
                                                                           weight_lr=1e-4), "cpu")
    assert report.loss_after < 0.85 * report.loss_before
    assert report.train_loss_last < report.train_loss_first
    assert len(report.val_losses) == 8
    for name, q in quant_linears(student).items():
        w0, s0, z0 = before[name]
        assert not torch.equal(q.weight, w0), name
        assert not torch.equal(q.scale, s0), name
        assert not torch.equal(q.zero, z0), name


@pytest.mark.parametrize("grid,bits,lr", [("q2_0", 2, 1e-3), ("q4_0", 4, 1e-4)])
def test_on_a_format_grid_training_moves_weights_and_steps_never_zero_points_nor_signs(grid, bits, lr):
    """The tiny block's linears are 64 wide: Q2_0's groups of 64, Q4_0's of 32. The packed block holds
    the offset as every zero point and each group's trained, signed step size."""
    from eqat_dist.blockap.steps import finish_student
    from eqat_dist.quant.config import GRIDS

    fp_block, call, x, y = _block_setup()
    cfg = QuantConfig(bits, GRIDS[grid].group, "clip", grid)
    student = make_student(fp_block, cfg, "cpu")
    before = {n: (q.weight.clone(), q.scale.clone(), q.sign.clone()) for n, q in quant_linears(student).items()}
    xs, ys, vx, vy = _stores([x[:6], y[:6], x[6:], y[6:]])
    report = train_block(student, 0, xs, ys, vx, vy, call, BlockAPSettings(epochs=8, batch_size=2, quant_lr=lr,
                                                                           weight_lr=lr / 10, loss="huber"), "cpu")
    assert report.train_loss_last < report.train_loss_first  # (6 windows: at 4 bits the validation loss overfits)
    for name, q in quant_linears(student).items():
        w0, s0, sign0 = before[name]
        assert not torch.equal(q.weight, w0) and not torch.equal(q.scale, s0), name
        assert bool((q.zero == GRIDS[grid].zero).all()) and torch.equal(q.sign, sign0), name
    packed = finish_student(student, cfg)
    from eqat_dist.quant import PackedLinear
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert layers and all(bool((layer.int_zeros() == GRIDS[grid].zero).all()) for layer in layers)
    assert any(bool((layer.scales < 0).any()) for layer in layers)


def test_gradient_clipping_is_applied_before_each_step():
    fp_block, call, x, y = _block_setup()
    student = make_student(fp_block, CFG, "cpu")
    norms = []
    orig_step = torch.optim.AdamW.step

    def spying_step(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.norm(torch.stack([g.norm() for g in grads])).item())
        return orig_step(self, *a, **k)

    xs, ys, vx, vy = _stores([x, y, x[:0], y[:0]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spying_step)
        train_block(student, 0, xs, ys, vx, vy, call, BlockAPSettings(epochs=1, max_grad_norm=1e-3), "cpu")
    assert norms and max(norms) <= 1e-3 * (1 + 1e-4)


def test_non_finite_loss_stops_with_block_and_step():
    fp_block, call, x, y = _block_setup()
    x = x.clone()
    x[3] = float("nan")
    xs, ys, vx, vy = _stores([x, y, x[:0], y[:0]])
    student = make_student(fp_block, CFG, "cpu")
    with pytest.raises(NonFiniteLossError, match=r"block 5, epoch 0, step \d"):
        train_block(student, 5, xs, ys, vx, vy, call, BlockAPSettings(epochs=1, batch_size=2), "cpu")


@pytest.mark.parametrize("restart", [True, False])
def test_pipelined_switch_restarts_the_cosine_or_continues_it(restart):
    """With restart_at_switch the steps on the quantized stream start again at the full rates and decay to
    lr / min_lr_factor by the end; without it they go on down the block's one cosine."""
    fp_block, call, x, y = _block_setup()
    xs, ys, vx, vy = _stores([x, y, x[:0], y[:0]])
    settings = BlockAPSettings(epochs=2, batch_size=2, quant_lr=1e-3, weight_lr=1e-4, min_lr_factor=20.0,
                               correction_lr="restart" if restart else "continue")
    lrs = {}
    log = lambda tag, value, step: lrs.__setitem__(step, value) if tag == "lr_quant" else None  # noqa: E731
    train_block(make_student(fp_block, CFG, "cpu"), 1, xs, ys, vx, vy, call, settings, "cpu", log=log,
                switch_at=4, switch=lambda: (xs, vx))
    total = 8  # 2 epochs x 4 batches
    assert lrs[0] == pytest.approx(1e-3) and lrs[3] < lrs[2] < lrs[1] < lrs[0]
    if restart:
        assert lrs[4] == pytest.approx(1e-3)
        assert lrs[3] == pytest.approx(1e-3 * local_cosine(3, 4)) and lrs[7] == pytest.approx(1e-3 * local_cosine(3, 4))
    else:
        assert lrs[4] == pytest.approx(1e-3 * local_cosine(4, total)) and lrs[7] < lrs[4]


def test_the_wait_for_the_quantized_stream_is_reported_apart_from_training():
    """The timeline model takes a block's training time from its report: the wait inside a pipelined
    block's training (its switch) must be reported on its own, or the model counts it twice."""
    fp_block, call, x, y = _block_setup()
    xs, ys, vx, vy = _stores([x, y, x[:0], y[:0]])

    def slow_switch():
        time.sleep(0.3)  # the quantized stream arrives late
        return xs, vx

    report = train_block(make_student(fp_block, CFG, "cpu"), 1, xs, ys, vx, vy, call,
                         BlockAPSettings(epochs=1, batch_size=2), "cpu", switch_at=2, switch=slow_switch)
    assert 0.3 <= report.switch_wait_s < report.seconds
    plain = train_block(make_student(fp_block, CFG, "cpu"), 1, xs, ys, vx, vy, call, BlockAPSettings(epochs=1, batch_size=2), "cpu")
    assert plain.switch_wait_s == 0.0


def local_cosine(step, total, factor=20.0):
    import math
    return 1 / factor + (1 - 1 / factor) * 0.5 * (1 + math.cos(math.pi * step / total))


def _folder(tmp, layers):
    folder = Path(tmp) / f"model{layers}"
    if not folder.exists():
        tiny_model("llama", layers=layers).save_pretrained(folder)
    return folder


def _run(model, tmp, placement="cpu", student_input="student", settings=FAST, monitor=None, correction=0.5,
         device_bytes=0.0, log=lambda *a: None):
    """Block-AP on a saved copy of `model` (a tiny Llama of seed 0); returns the assembled quantized model."""
    layers = len(decoder_layers(model))
    folder = _folder(tmp, layers)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    run_blockap(LazyModel(str(folder)), CFG, ids[:4], ids[4:], settings, tmp / "ckpt", {"k": 1}, "cpu",
                StreamSpec(StreamsConfig(placement, tmp / "acts", on_gpu_gib=device_bytes / 2**30), torch.float32), student_input,
                monitor=monitor, log=log, correction=correction)
    quantized, _ = assemble(LazyModel(str(folder)), CFG, tmp / "ckpt")
    return quantized


def _packed_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _record_training_inputs(monkeypatch) -> dict:
    """Make the pipeline's trainer record each block's student inputs (index -> tensor)."""
    seen = {}
    real = local.train_block

    def spy(block, index, inputs, *rest, **kw):
        seen[index] = inputs.get(list(range(len(inputs)))).clone()
        return real(block, index, inputs, *rest, **kw)

    monkeypatch.setattr(local, "train_block", spy)
    return seen


def test_student_input_is_the_quantized_stream(tmp_path, monkeypatch):
    """Block 1 must be trained on the output of the *quantized* block 0, not of the fp block 0."""
    seen = _record_training_inputs(monkeypatch)
    fp_model = tiny_model("llama", layers=2)
    model = _run(fp_model, tmp_path)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))[:4]
    _, calls = record_block_calls(fp_model, ids[:1])
    x0 = embed(fp_model, ids)
    with torch.no_grad():
        via_quantized = run_block(decoder_layers(model)[0], x0, calls[0])
        via_fp = run_block(decoder_layers(fp_model)[0], x0, calls[0])
    assert torch.equal(seen[1], via_quantized)
    assert not torch.allclose(seen[1], via_fp, atol=1e-3)


def test_teacher_mode_trains_every_block_on_the_fp_stream(tmp_path, monkeypatch):
    seen = _record_training_inputs(monkeypatch)
    fp_model = tiny_model("llama", layers=2)
    _run(fp_model, tmp_path, student_input="teacher")
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))[:4]
    _, calls = record_block_calls(fp_model, ids[:1])
    with torch.no_grad():
        expected = run_block(decoder_layers(fp_model)[0], embed(fp_model, ids), calls[0])
    assert torch.equal(seen[1], expected)


def test_pipelined_mode_trains_on_the_fp_stream_then_on_the_quantized_stream(tmp_path, monkeypatch):
    """Block 1's first steps see block 0's fp output; from the switch on, the output of the quantized
    block 0 (the paper's input), with the optimizer and schedule going on."""
    seen, switched = {}, {}
    real = local.train_block

    def spy(block, index, inputs, *rest, switch_at=None, switch=None, **kw):
        seen[index] = (inputs.get(list(range(len(inputs)))).clone(), switch_at)

        def recording_switch():
            new_inputs, new_val = switch()
            switched[index] = new_inputs.get(list(range(len(new_inputs)))).clone()
            return new_inputs, new_val
        return real(block, index, inputs, *rest, switch_at=switch_at, switch=recording_switch, **kw)

    monkeypatch.setattr(local, "train_block", spy)
    fp_model = tiny_model("llama", layers=2)
    model = _run(fp_model, tmp_path, student_input="pipelined", correction=0.25)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))[:4]
    _, calls = record_block_calls(fp_model, ids[:1])
    x0 = embed(fp_model, ids)
    with torch.no_grad():
        via_fp = run_block(decoder_layers(fp_model)[0], x0, calls[0])
        via_quantized = run_block(decoder_layers(model)[0], x0, calls[0])
    total = FAST.epochs * -(-4 // FAST.batch_size)
    assert seen[1][1] == local.correction_start(total, 0.25) == total - round(total * 0.25)
    assert torch.equal(seen[1][0], via_fp) and torch.equal(switched[1], via_quantized)


@pytest.mark.parametrize("correction, same_as", [(1.0, "student"), (0.0, "teacher")])
def test_pipelined_mode_at_its_extremes_is_student_or_teacher_mode(tmp_path, correction, same_as):
    a = _packed_state(_run(tiny_model("llama", layers=3), tmp_path / "p", student_input="pipelined",
                           correction=correction))
    b = _packed_state(_run(tiny_model("llama", layers=3), tmp_path / "ref", student_input=same_as))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_disk_and_cpu_stores_give_identical_models(tmp_path):
    a = _run(tiny_model("llama", layers=2), tmp_path / "cpu", "cpu")
    b = _run(tiny_model("llama", layers=2), tmp_path / "disk", "disk")
    sa, sb = _packed_state(a), _packed_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list((tmp_path / "disk" / "acts").glob("*.bin"))  # temporary files removed


@pytest.mark.parametrize("placement", ["cpu", "disk"])
@pytest.mark.parametrize("student_input", ["student", "pipelined"])
def test_stores_with_rows_kept_on_the_device_give_identical_models(tmp_path, placement, student_input, monkeypatch):
    """`activations_on_gpu`: half of every store's rows on the compute device (a CPU tensor here), the
    rest where the placement says: every read, write and stream pass goes across both, the same model."""
    from eqat_dist.pipelines import round_robin

    said, made = [], []

    class Recorded(round_robin.ActivationStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self.count, self.device_rows))

    row = 32 * 64 * 4  # seqlen x hidden x float32 of the tiny model
    stores = 2 if student_input == "student" else 3  # per split: fp (in place) or fp in and out, and q
    with monkeypatch.context() as patched:
        patched.setattr(round_robin, "ActivationStore", Recorded)
        a = _run(tiny_model("llama", layers=2), tmp_path / "split", placement, student_input,
                 device_bytes=0.5 * stores * 6 * row, log=said.append)  # 4 train + 2 val rows per store
    assert sorted(made) == sorted([(4, 2), (2, 1)] * stores)
    b = _run(tiny_model("llama", layers=2), tmp_path / "ref", placement, student_input)
    sa, sb = _packed_state(a), _packed_state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert next(line for line in said if "activation stores" in line).endswith("MiB of it on the GPU)")


def test_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    reference = _run(tiny_model("llama", layers=3), tmp_path / "ref")
    real = local.train_block

    def dies_at_block_2(block, index, *a, **k):
        if index == 2:
            raise KeyboardInterrupt("killed")
        return real(block, index, *a, **k)

    monkeypatch.setattr(local, "train_block", dies_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model("llama", layers=3), tmp_path / "run")
    assert block_path(tmp_path / "run" / "ckpt", 1).exists() and not block_path(tmp_path / "run" / "ckpt", 2).exists()
    monkeypatch.setattr(local, "train_block", real)
    trained = []
    monkeypatch.setattr(local, "train_block", lambda b, i, *a, **k: trained.append(i) or real(b, i, *a, **k))
    resumed = _run(tiny_model("llama", layers=3), tmp_path / "run")
    assert trained == [2]  # blocks 0 and 1 were reused
    sa, sb = _packed_state(reference), _packed_state(resumed)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_other_settings_are_refused_on_resume(tmp_path):
    from eqat_dist.blockap.checkpoint import open_run
    open_run(tmp_path, {"wbits": 2, "epochs": 2})
    with pytest.raises(ResumeError, match="epochs: was 2, now 3"):
        open_run(tmp_path, {"wbits": 2, "epochs": 3})
    # a manifest from before a choice existed holds the paper's value of it
    with pytest.raises(ResumeError, match="init: was 'minmax', now 'clip'"):
        open_run(tmp_path, {"wbits": 2, "epochs": 2, "init": "clip"})
    open_run(tmp_path, {"wbits": 2, "epochs": 2, "init": "minmax"})


def test_tensorboard_gets_losses_lrs_and_block_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from eqat_dist.utils.monitor import Monitor

    monitor = Monitor(tmp_path / "tb")
    _run(tiny_model("llama", layers=2), tmp_path, monitor=monitor)
    monitor.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("block_000/train_loss", "block_001/val_loss", "block_000/grad_norm", "blockap/lr_quant",
                "blockap/lr_weight", "blockap_blocks/loss_after", "blockap_blocks/seconds",
                "blockap_blocks/tokens_per_s", "blockap_blocks/peak_mem_mib"):
        assert tag in tags, tag
    lrs = [e.value for e in acc.Scalars("block_000/lr_quant")]
    assert lrs[0] == pytest.approx(FAST.quant_lr) and lrs[-1] < lrs[0]  # cosine decay within the block


def stop_with(proc, signum) -> None:
    """Deliver `signum` to a child frozen where it is: SIGSTOP first, so the state a test waited for
    lasts however fast the run goes on (a pending signal lands when SIGCONT wakes it)."""
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)


@pytest.mark.slow
def test_cli_killed_or_terminated_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    """A real SIGKILL of `launch/run.py`, then the same command again; then SIGTERM (a cluster's stop):
    exit 143, one line saying where and what is kept, the lock released, every file 0644 under umask 022,
    and again the same command resumes to the uninterrupted run's bits."""
    model_dir = tmp_path / "tiny"
    tiny_model("llama", layers=4, vocab=49152).save_pretrained(model_dir)
    from transformers import AutoTokenizer  # a real tokenizer is needed for calibration text
    AutoTokenizer.from_pretrained(str(_bundled_dir())).save_pretrained(model_dir)

    def command(out):
        return [sys.executable, str(ROOT / "launch" / "run.py"), "--model", str(model_dir), "--wbits", "2",
                "--group-size", "32", "--output", str(out), "--epochs", "4", "--phase", "block-ap", "--train-size", "8", "--val-size", "2",
                "--seqlen", "32", "--eval-datasets", "news", "--zeroshot-tasks", "", "--eval-seqlen", "32", "--eval-max-windows", "2",
                "--quant-lr", "1e-2", "--weight-lr", "1e-3", "--skip-fp-eval", "--no-tensorboard"]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    umask = lambda: os.umask(0o022)  # noqa: E731  the usual umask, whatever the CI's
    subprocess.run(command(tmp_path / "ref"), check=True, env=env, capture_output=True, preexec_fn=umask)
    reference = export_tensors(tmp_path / "ref")
    for signum in (signal.SIGKILL, signal.SIGTERM):
        out = tmp_path / signum.name
        proc = subprocess.Popen(command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=umask)
        deadline = time.time() + 120
        while not block_path(out / "blockap", 1).exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.01)
        stop_with(proc, signum)
        _, err = proc.communicate(timeout=120)
        assert not (out / "results.json").exists()
        if signum == signal.SIGTERM:
            lines = [line for line in err.splitlines() if line.startswith("eqat-dist")]
            assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
            assert len(lines) == 1 and re.match(r"eqat-dist: rank 0 stopped by SIGTERM at block \d \(.*\)\. Finished work "
                                                rf"is kept in {re.escape(str(out))} \(Block-AP blocks\); run the same "
                                                r"command again to resume\.$", lines[0]), lines
            assert not (out / ".eqat-dist.lock").exists()
            assert {oct(p.stat().st_mode & 0o777) for p in (out / "blockap").iterdir()} == {"0o644"}
        done = subprocess.run(command(out), env=env, capture_output=True, text=True, preexec_fn=umask)
        assert done.returncode == 0, done.stderr[-3000:]
        resumed = export_tensors(out)
        assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    files = [p for p in out.rglob("*") if p.is_file() and ".eqat-dist-heartbeats" not in p.parts]
    assert any(p.name.startswith("model") for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}, \
        sorted(f"{p.relative_to(out)} {oct(p.stat().st_mode & 0o777)}" for p in files)


def _bundled_dir():
    from eqat_dist.models.loading import bundled_model_dir
    return bundled_model_dir()


def test_bf16_autocast_on_cpu_trains_with_bf16_stores(tmp_path):
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    settings = BlockAPSettings(epochs=2, batch_size=2, quant_lr=1e-3, weight_lr=1e-4, amp_dtype=torch.bfloat16)
    source = LazyModel(str(_folder(tmp_path, 2)))
    reports = run_blockap(source, CFG, ids[:4], ids[4:], settings, tmp_path / "ckpt", {}, "cpu",
                          StreamSpec(dtype=torch.bfloat16), "student", log=lambda *a: None)
    assert all(torch.isfinite(torch.tensor([r["loss_before"], r["loss_after"]])).all() for r in reports)
    model, _ = assemble(source, CFG, tmp_path / "ckpt")
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())  # fp32 master weights


@pytest.mark.parametrize("name", ["student", "teacher", "pipelined"])
def test_each_schedule_holds_the_stores_it_describes_and_the_planner_counts_them(tmp_path, name):
    """A schedule is described once (pipelines/schedules.py): the stores a rank opens are the ones it
    names, and the planner's memory term counts the same number per split."""
    import re

    from eqat_dist.pipelines.schedules import schedule_named
    from eqat_dist.config import BlockAPConfig
    from eqat_dist.planning.estimate import Settings

    said = []
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    run_blockap(LazyModel(str(_folder(tmp_path, 2))), CFG, ids[:4], ids[4:], FAST, tmp_path / "ckpt", {"k": 1}, "cpu",
                StreamSpec(StreamsConfig("cpu", tmp_path / "acts"), torch.float32), name, log=said.append)
    stores = re.findall(r"(\w+?)_(train|val) \d", next(line for line in said if "activation stores" in line))
    schedule = schedule_named(name)
    assert len(stores) == 2 * schedule.stores_per_split(groups=1) == 2 * Settings(blockap=BlockAPConfig(student_input=name)).schedule.stores_per_split(1)
    assert schedule.stores_per_split(groups=2) == len(stores) // 2 - (name == "pipelined")  # q in the fp input's store
    names = {n for n, _ in stores}
    assert ("q" in names) == schedule.keeps_quantized_stream and ("fp_out" in names) != schedule.fp_stream_in_place


def test_relative_loss_weighs_every_token_alike_and_mse_is_the_papers():
    from eqat_dist.blockap.losses import reconstruction_loss

    torch.manual_seed(0)
    target = torch.randn(2, 5, 8)
    out = target + 0.1 * torch.randn(2, 5, 8)
    assert torch.equal(reconstruction_loss("mse", out, target), torch.nn.functional.mse_loss(out, target))
    per_token = [((out[b, t] - target[b, t]) ** 2).sum() / (target[b, t] ** 2).sum() for b in range(2) for t in range(5)]
    assert torch.allclose(reconstruction_loss("relative", out, target), torch.stack(per_token).mean())
    # a massive token (x1000, as the attention sink's) moves MSE a million-fold, the relative loss not at all
    big_out, big_target = out.clone(), target.clone()
    big_out[:, 0] *= 1000
    big_target[:, 0] *= 1000
    assert reconstruction_loss("mse", big_out, big_target) > 1e4 * reconstruction_loss("mse", out, target)
    assert torch.allclose(reconstruction_loss("relative", big_out, big_target), reconstruction_loss("relative", out, target))
    with pytest.raises(ValueError, match="`loss` 'l1' is not known"):
        reconstruction_loss("l1", out, target)


def test_huber_loss_is_the_mse_until_a_token_stands_far_out_and_then_caps_its_gradient():
    """A reference loop over tokens, the MSE where no token is past the threshold, and a spurious massive
    activation (one element of one token off by 25,000, as SmolLM2's second sinks) whose gradient is that
    of a token at the threshold, not a million times the others'."""
    from eqat_dist.blockap.losses import HUBER_FACTOR, reconstruction_loss

    torch.manual_seed(0)
    target = torch.randn(2, 64, 16)
    out = target + 0.1 * torch.randn(2, 64, 16)
    assert torch.allclose(reconstruction_loss("huber", out, target), reconstruction_loss("mse", out, target))
    far = out.clone()
    far[1, 3, 5] += 25_000.0
    errors = (far - target).square().mean(-1).flatten()
    limit = HUBER_FACTOR * errors.median()
    reference = torch.stack([e if e <= limit else 2 * (limit * e).sqrt() - limit for e in errors]).mean()
    assert torch.allclose(reconstruction_loss("huber", far, target), reference)
    grads = {}
    for name in ("mse", "huber"):
        x = far.clone().requires_grad_(True)
        reconstruction_loss(name, x, target).backward()
        grads[name] = x.grad
    normal = grads["mse"][0].norm(dim=-1).median()
    assert grads["mse"][1, 3].norm() > 1e4 * normal  # under the MSE the one token takes the step
    at_limit = 2 * limit.sqrt() / (16 ** 0.5) / errors.numel()  # gradient norm of a token whose error is the limit
    assert grads["huber"][1, 3].norm() == pytest.approx(at_limit.item(), rel=1e-3)
    assert torch.allclose(grads["huber"][0], grads["mse"][0])  # every other token: the MSE's gradient


def test_the_trainer_minimises_the_loss_it_is_given():
    """batch = all 6 windows: the first step's loss is the chosen loss of the untrained student on them."""
    from eqat_dist.blockap.losses import reconstruction_loss

    fp_block, call, x, y = _block_setup()
    for name in ("mse", "relative"):
        student = make_student(fp_block, CFG, "cpu")
        with torch.no_grad():
            expected = reconstruction_loss(name, run_block(student, x[:6], call), y[:6]).item()
        xs, ys, vx, vy = _stores([x[:6], y[:6], x[6:], y[6:]])
        report = train_block(student, 0, xs, ys, vx, vy, call, BlockAPSettings(epochs=2, batch_size=6, quant_lr=1e-3,
                                                                               weight_lr=1e-4, loss=name), "cpu")
        assert report.train_loss_first == pytest.approx(expected, rel=1e-5), name
        assert report.train_loss_last < report.train_loss_first


def test_weights_fixed_for_a_pass_gives_the_same_outputs_and_lets_go_after():
    """Validation and the stream advances quantize (or dequantize) a block's weights once per pass: the
    outputs are bit-identical to quantizing per batch, and training after the pass sees fresh weights."""
    from eqat_dist.blockap.steps import finish_student
    from eqat_dist.models.quantize import packed_linears, weights_fixed

    fp_block, call, x, y = _block_setup()
    student = make_student(fp_block, CFG, "cpu")
    with torch.no_grad():
        per_batch = run_block(student, x, call)
        with weights_fixed(student):
            assert all(q.fixed_weight is not None for q in quant_linears(student).values())
            once = run_block(student, x, call)
    assert torch.equal(once, per_batch)
    assert all(q.fixed_weight is None for q in quant_linears(student).values())
    xs, ys = _stores([x, y])
    train_block(student, 0, xs, ys, *_stores([x[:2], y[:2]]), call, FAST, "cpu")  # validates inside weights_fixed
    with torch.no_grad():
        trained = run_block(student, x, call)
    assert not torch.equal(trained, per_batch)  # the pass's fixed weights were not kept
    with torch.no_grad(), weights_fixed(student):
        assert torch.equal(run_block(student, x, call), trained)
    packed = finish_student(student, CFG)
    with torch.no_grad():
        per_batch = run_block(packed, x, call)
        with weights_fixed(packed):
            assert all(p.fixed_weight is not None for p in packed_linears(packed).values())
            assert torch.equal(run_block(packed, x, call), per_batch)
    assert all(p.fixed_weight is None for p in packed_linears(packed).values())


@pytest.mark.slow
def test_compiled_block_step_trains_like_the_plain_one_and_compiles_once_for_every_block():
    """--compile: the same steps up to float summation order (per-step losses within 1e-4, the trained
    weights close), and block 1 reuses the graphs block 0 compiled (a recompile per block would cost
    more than compiling saves)."""
    import copy

    from torch._dynamo.utils import counters

    model = tiny_model("llama", layers=2, seed=0)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    _, calls = record_block_calls(model, ids[:1])
    x = embed(model, ids)
    losses, students = {}, {}
    for compiled in (False, True):
        if compiled:
            torch._dynamo.reset()  # graphs compiled by an earlier test would hide block 0's
            counters.clear()
        settings = BlockAPSettings(epochs=2, batch_size=2, quant_lr=1e-3, weight_lr=1e-4, seed=0, compile=compiled)
        h = x
        for i, fp_block in enumerate(decoder_layers(model)):
            with torch.no_grad():
                y = run_block(fp_block, h, calls[i])
            student = make_student(fp_block, CFG, "cpu")
            seen = []
            train_block(student, i, *_stores([h[:6], y[:6], h[6:], y[6:]]), calls[i], settings, "cpu",
                        log=lambda tag, value, step, seen=seen: seen.append(value) if tag == "train_loss" else None)
            losses[compiled, i], students[compiled, i] = seen, copy.deepcopy(student)
            if compiled and i == 0:
                graphs_after_block_0 = counters["stats"]["unique_graphs"]
            h = y
    assert counters["stats"]["unique_graphs"] == graphs_after_block_0 > 0  # block 1: no new graph
    for i in range(2):
        assert losses[True, i] == pytest.approx(losses[False, i], rel=1e-4)
        for (name, a), b in zip(students[False, i].named_parameters(), students[True, i].parameters()):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), (i, name)


def test_gptq_start_is_gptq_on_each_blocks_own_student_inputs(tmp_path, monkeypatch):
    """--init gptq: each block's student starts from GPTQ (quant/gptq.py) with the second moments of each
    linear's inputs when the full-precision block runs on the student's training inputs (the quantized
    stream, in student mode): checked against GPTQ computed here from those inputs, for block 1's q_proj
    (input: the first norm of the stream) and down_proj (input: the gated MLP's product)."""
    import copy

    from eqat_dist.quant.gptq import gptq_weight

    seen = []
    real = local.gptq_start

    def spy(student, fp_block, inputs, call, *args, **kw):
        x = inputs.get(list(range(len(inputs))))
        before = {n: q.weight.clone() for n, q in quant_linears(student).items()}
        real(student, fp_block, inputs, call, *args, **kw)
        seen.append((x, call, copy.deepcopy(fp_block), before, {n: (q.weight.clone(), q.scale.clone(), q.zero.clone())
                                                 for n, q in quant_linears(student).items()}))

    monkeypatch.setattr(local, "gptq_start", spy)
    folder = _folder(tmp_path, 2)
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(2, 32, "gptq")
    run_blockap(LazyModel(str(folder)), cfg, ids[:4], ids[4:], BlockAPSettings(epochs=1, batch_size=2, seed=0),
                tmp_path / "ckpt", {"k": 1}, "cpu", StreamSpec(StreamsConfig("cpu", tmp_path / "acts"), torch.float32), "student",
                log=lambda *a: None)
    assert len(seen) == 2  # one GPTQ start per block
    x, call, fp_block, before, started = seen[1]
    inputs = {}
    hooks = [fp_block.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n in ("self_attn.q_proj", "mlp.down_proj")]
    with torch.no_grad():
        run_block(fp_block, x, call)
    for h in hooks:
        h.remove()
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        xs = torch.cat(inputs[name])
        for got, want in zip(started[name], gptq_weight(before[name], xs.T @ xs, cfg)):
            assert torch.allclose(got, want, atol=1e-5), name


@pytest.mark.parametrize("max_norm", [1.0, 1e3, float("inf")])
def test_the_clipping_inside_the_fused_step_is_clip_grad_norm_then_the_step(max_norm):
    """trainer.clip_in_the_step: the norm read once and the multiply done by the fused AdamW's own pass;
    the same parameters as clip_grad_norm_ then the step, up to float rounding, clipped or not."""
    from eqat_dist.blockap.trainer import clip_in_the_step

    torch.manual_seed(0)
    ours = [torch.randn(64, 48, requires_grad=True), torch.randn(64, 3, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    for step in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p) * (5.0 if step else 0.01)  # far above and below the bound
            q.grad = p.grad.clone()
        if step == 0:
            opt_ours = torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.0, fused=True)
            opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.0, fused=True)
        norm = clip_in_the_step(opt_ours, ours, max_norm)
        want = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        opt_ours.step()
        opt_ref.step()
        assert torch.allclose(norm, want)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)  # the clipped gradient, as before
