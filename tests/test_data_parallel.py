"""Data-parallel Block-AP: the lanes that make a step's windows independent of the ranks sharing it,
and D ranks at global batch B taking the steps one rank takes at batch B (in threads here: the MPI
and torch.distributed runs are in test_distributed.py)."""
import threading

import pytest
import torch

from eqat_dist.blockap.lanes import Lanes
from eqat_dist.blockap.steps import make_student
from eqat_dist.blockap.trainer import BlockAPSettings, train_block
from eqat_dist.cluster.transport import SumGroup
from eqat_dist.models.quantize import quant_linears
from test_blockap import CFG, _block_setup, _stores


@pytest.mark.parametrize("count,batch", [(16, 4), (13, 4), (3, 4), (10, 2)])
def test_every_window_once_per_epoch_and_the_steps_do_not_depend_on_the_ranks(count, batch):
    one = Lanes(count, batch)
    epochs_one = one.epoch(torch.Generator().manual_seed(5))
    seen = sorted(w for step in epochs_one for w in (one.windows()[r] for r in step.rows))
    assert seen == list(range(count))  # each window exactly once
    assert [len(s.rows) for s in epochs_one][:-1] == [batch] * (len(epochs_one) - 1)
    for parts in [p for p in (2, 4) if batch % p == 0]:
        shares = [Lanes(count, batch, parts, d) for d in range(parts)]
        held = sorted(w for lanes in shares for w in lanes.windows())
        assert held == list(range(count))  # the ranks hold the windows between them, none twice
        assert max(len(lanes.windows()) for lanes in shares) <= -(-count // batch) * (batch // parts)
        per_rank = [lanes.epoch(torch.Generator().manual_seed(5)) for lanes in shares]
        for k, step in enumerate(epochs_one):
            union = sorted(lanes.windows()[r] for lanes, steps in zip(shares, per_rank) for r in steps[k].rows)
            assert union == sorted(one.windows()[r] for r in step.rows), (parts, k)
            assert all(steps[k].windows == step.windows == len(step.rows) for steps in per_rank)


def test_a_batch_that_does_not_split_over_the_group_is_refused():
    with pytest.raises(ValueError, match="`batch_size` 3 is the global batch.*multiple of 2"):
        Lanes(8, 3, 2, 0)


class _ThreadGroup(SumGroup):
    """D threads standing for D ranks: sums in rank order, the same on every 'rank', started inside
    the backward (as torch.distributed's groups do) or at the end of the step (as MPI's); the
    reduce-scatter is SumGroup's, one reduce per segment."""

    def __init__(self, shared, rank, size, overlaps=True):
        self.shared, self.rank, self.size, self.overlaps_backward = shared, rank, size, overlaps

    def finish(self, handles):
        self.shared["finished"][self.rank] += len(handles)

    def start_sum_(self, tensor):
        in_backward = torch._C._current_graph_task_id() != -1
        self.allreduce_sum_(tensor)
        self.shared["started"][self.rank].append((tensor.numel(), in_backward))

    def allreduce_sum_(self, tensor, to=None):
        s = self.shared
        s["barrier"].wait()
        s["slots"][self.rank] = tensor.clone()
        s["barrier"].wait()
        total = s["slots"][0].clone()
        for other in s["slots"][1:]:
            total += other
        s["barrier"].wait()
        if to is None or to == self.rank:
            tensor.copy_(total)
        else:
            tensor.fill_(float("nan"))  # a reduce leaves the other ranks' tensors undefined

    def start_reduce_(self, tensor, root):
        in_backward = torch._C._current_graph_task_id() != -1
        self.allreduce_sum_(tensor, to=root)
        self.shared["started"][self.rank].append(("reduce", tensor.numel()))
        self.shared.setdefault("reduces_in_backward", [[] for _ in range(self.size)])[self.rank].append(in_backward)

    def start_broadcast_(self, tensor, root):
        s = self.shared
        s["barrier"].wait()
        if self.rank == root:
            s["slots"][0] = tensor.clone()
        s["barrier"].wait()
        tensor.copy_(s["slots"][0])
        s["barrier"].wait()
        self.shared["started"][self.rank].append(("broadcast", tensor.numel()))
        self.shared.setdefault("broadcast_dtypes", set()).add(tensor.dtype)


def _train(fp_block, call, x, y, settings, parts, overlaps=True, shared=None):
    """(per-rank train losses by step, per-rank reports, per-rank students) for `parts` ranks."""
    shared = shared if shared is not None else {}
    shared |= {"barrier": threading.Barrier(parts), "slots": [None] * parts, "started": [[] for _ in range(parts)],
               "finished": [0] * parts, "norms": [[] for _ in range(parts)]}
    losses, reports, students = [[] for _ in range(parts)], [None] * parts, [None] * parts
    errors = []

    def rank(d):
        try:
            train_lanes = Lanes(6, settings.batch_size, parts, d)
            val_lanes = Lanes(2, settings.batch_size, parts, d)
            xs, ys = _stores([x[:6][train_lanes.windows()], y[:6][train_lanes.windows()]])
            vx, vy = _stores([x[6:][val_lanes.windows()], y[6:][val_lanes.windows()]])
            student = make_student(fp_block, CFG, "cpu")
            log = lambda tag, value, step: (losses[d] if tag == "train_loss" else shared["norms"][d]).append(value) \
                if tag in ("train_loss", "grad_norm") else None
            group = _ThreadGroup(shared, d, parts, overlaps) if parts > 1 else None
            reports[d] = train_block(student, 0, xs, ys, vx, vy, call, settings, "cpu", log=log,
                                     lanes=train_lanes, group=group)
            students[d] = student
        except Exception as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(d,)) for d in range(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return losses, reports, students


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("batch,parts", [(2, 2), (4, 2), (4, 4)])
def test_d_ranks_take_the_steps_of_one_rank_at_the_same_global_batch(batch, parts, loss, monkeypatch):
    """The paper's MSE, and the 2-bit default's Huber loss, whose threshold is a multiple of the step's
    median token error: over the whole step, not each rank's share (made to cap most tokens here, so
    that a rank's own median would change the steps)."""
    monkeypatch.setattr("eqat_dist.blockap.losses.HUBER_FACTOR", 1.2)
    torch.set_num_threads(1)
    fp_block, call, x, y = _block_setup()
    settings = BlockAPSettings(epochs=3, batch_size=batch, quant_lr=1e-3, weight_lr=1e-4, seed=0, loss=loss)
    (one,), (one_report,), (one_student,) = _train(fp_block, call, x, y, settings, 1)
    losses, reports, students = _train(fp_block, call, x, y, settings, parts)
    assert len(one) == 3 * -(-6 // batch)
    for d in range(parts):
        assert torch.allclose(torch.tensor(losses[d]), torch.tensor(one), rtol=1e-5, atol=0), d
        assert reports[d].val_losses == pytest.approx(one_report.val_losses, rel=1e-5)
        assert reports[d].loss_before == pytest.approx(one_report.loss_before, rel=1e-6)
        for name, q in quant_linears(students[d]).items():  # every rank took the same steps: same block
            ref = quant_linears(one_student)[name]
            torch.testing.assert_close(q.weight, ref.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(q.scale, ref.scale, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(q.zero, ref.zero, rtol=1e-5, atol=1e-5)
    for d in range(1, parts):  # the ranks of a group hold one and the same block, bit for bit
        for name, q in quant_linears(students[d]).items():
            assert torch.equal(q.weight, quant_linears(students[0])[name].weight)


@pytest.mark.parametrize("batch,parts,clip,loss", [(2, 2, 1.0, "mse"), (2, 2, 1e-3, "mse"), (4, 4, 1e-3, "mse"),
                                                   (8, 8, 1e-3, "mse"), (4, 2, 1.0, "huber")])
def test_weight_work_split_over_the_group_takes_the_same_steps(batch, parts, clip, loss, monkeypatch):
    """`shard_weights`: each linear fake-quantized, clipped and stepped by its owner alone, the others
    receiving its quantized weight: every step's loss, the validation losses and the trained block are
    those of one rank at the same global batch (the replicated path's test above); with 8 ranks, one
    more than the block's linears, a rank owns none. A norm of 1e-3 clips every step (the group's norm
    must be the whole block's)."""
    monkeypatch.setattr("eqat_dist.blockap.losses.HUBER_FACTOR", 1.2)
    torch.set_num_threads(1)
    fp_block, call, x, y = _block_setup()
    settings = BlockAPSettings(epochs=3, batch_size=batch, quant_lr=1e-3, weight_lr=1e-4, seed=0, shard_weights=True,
                               max_grad_norm=clip, loss=loss)
    alone = {}
    (one,), (one_report,), (one_student,) = _train(fp_block, call, x, y, settings, 1, shared=alone)
    shared = {}
    losses, reports, students = _train(fp_block, call, x, y, settings, parts, shared=shared)
    assert any(kind == "broadcast" for kind, _ in shared["started"][0])  # the split path, not the sums
    for d in range(parts):
        assert torch.allclose(torch.tensor(losses[d]), torch.tensor(one), rtol=1e-5, atol=0), d
        assert torch.allclose(torch.tensor(shared["norms"][d]), torch.tensor(alone["norms"][0]), rtol=1e-5), d
        assert reports[d].val_losses == pytest.approx(one_report.val_losses, rel=1e-5)
        for name, q in quant_linears(students[d]).items():
            ref = quant_linears(one_student)[name]
            torch.testing.assert_close(q.weight, ref.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(q.scale, ref.scale, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(q.zero, ref.zero, rtol=1e-5, atol=1e-5)
            assert q.fixed_weight is None
            assert torch.equal(q.weight, quant_linears(students[0])[name].weight)
            assert torch.equal(q.scale, quant_linears(students[0])[name].scale)


def test_linears_are_dealt_out_by_size_largest_first():
    from eqat_dist.blockap.weight_shards import deal_out
    # SmolLM2's block: q, k, v, o, gate, up, down (576 x 576, 192 x 576 twice, 576 x 576, 1536 x 576 thrice)
    sizes = [331776, 110592, 110592, 331776, 884736, 884736, 884736]
    owner = deal_out(sizes, 2)
    loads = [sum(n for n, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert sorted(loads) == [1769472, 1769472]  # an even split exists here, and is found
    assert deal_out(sizes, 1) == [0] * 7
    assert sorted(set(deal_out(sizes, 8))) == list(range(7))  # one rank left without a linear


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_a_rank_without_a_window_in_the_last_step_still_takes_it(loss, monkeypatch):
    """6 windows at global batch 4 over 4 ranks: the last step has 2 windows, ranks 2 and 3 none (with
    the Huber loss they still take part in the step's median)."""
    monkeypatch.setattr("eqat_dist.blockap.losses.HUBER_FACTOR", 1.2)
    fp_block, call, x, y = _block_setup()
    settings = BlockAPSettings(epochs=2, batch_size=4, quant_lr=1e-3, weight_lr=1e-4, seed=0, loss=loss)
    shares = [Lanes(6, 4, 4, d) for d in range(4)]
    assert [len(s.windows()) for s in shares] == [2, 2, 1, 1]
    (one,), _, _ = _train(fp_block, call, x, y, settings, 1)
    losses, reports, _ = _train(fp_block, call, x, y, settings, 4)
    assert all(r.steps == 4 for r in reports)
    assert torch.allclose(torch.tensor(losses[3]), torch.tensor(one), rtol=1e-5, atol=0)


@pytest.mark.parametrize("overlaps", [True, False])
def test_gradient_sums_start_inside_the_backward_in_the_same_order_on_every_rank(overlaps, monkeypatch):
    """Small buckets (4 KiB) make many sums per step: with a backend that overlaps, sums start while
    the backward runs; every rank starts the same sums in the same order; the steps stay the ones of
    one rank."""
    monkeypatch.setattr("eqat_dist.blockap.grad_sum.BUCKET_BYTES", 4096)
    torch.set_num_threads(1)
    fp_block, call, x, y = _block_setup()
    settings = BlockAPSettings(epochs=2, batch_size=2, quant_lr=1e-3, weight_lr=1e-4, seed=0)
    (one,), _, _ = _train(fp_block, call, x, y, settings, 1)
    shared = {}
    losses, _, _ = _train(fp_block, call, x, y, settings, 2, overlaps=overlaps, shared=shared)
    assert torch.allclose(torch.tensor(losses[1]), torch.tensor(one), rtol=1e-5, atol=0)
    started = shared["started"]
    assert started[0] == started[1] and shared["finished"][0] == shared["finished"][1]
    sizes = {n for n, _ in started[0]}
    assert len(sizes) > 3  # many buckets
    inside = sum(b for _, b in started[0])
    assert (inside > 0) == overlaps


def test_under_bfloat16_autocast_the_split_group_broadcasts_bfloat16_weights_and_takes_the_same_steps():
    """Each linear multiplies by its weight rounded to bfloat16 under autocast, so the owners broadcast
    it rounded (half the bytes): the steps are those of the replicated group, which rounds it itself."""
    torch.set_num_threads(1)
    fp_block, call, x, y = _block_setup()
    common = dict(epochs=2, batch_size=2, quant_lr=1e-3, weight_lr=1e-4, seed=0, amp_dtype=torch.bfloat16)
    split, replicated = {}, {}
    split_losses, _, split_students = _train(fp_block, call, x, y, BlockAPSettings(**common, shard_weights=True), 2,
                                             shared=split)
    losses, _, students = _train(fp_block, call, x, y, BlockAPSettings(**common), 2, shared=replicated)
    assert torch.bfloat16 in split["broadcast_dtypes"] and "broadcast_dtypes" not in replicated  # (sync: float32)
    assert torch.allclose(torch.tensor(split_losses[0]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
    for name, q in quant_linears(split_students[0]).items():
        torch.testing.assert_close(q.weight, quant_linears(students[0])[name].weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overlaps", [True, False])
def test_the_split_groups_reduces_to_the_owners_start_inside_the_backward_where_the_backend_overlaps(overlaps):
    """torch.distributed groups: each owner's reduce starts once the backward has its linears' gradients,
    in owner order on every rank; MPI's: after the backward. The steps are one rank's either way."""
    torch.set_num_threads(1)
    fp_block, call, x, y = _block_setup()
    settings = BlockAPSettings(epochs=2, batch_size=2, quant_lr=1e-3, weight_lr=1e-4, seed=0, shard_weights=True)
    (one,), _, _ = _train(fp_block, call, x, y, settings, 1)
    shared = {}
    losses, _, _ = _train(fp_block, call, x, y, settings, 2, overlaps=overlaps, shared=shared)
    assert torch.allclose(torch.tensor(losses[1]), torch.tensor(one), rtol=1e-5, atol=0)
    inside = shared["reduces_in_backward"]
    assert inside[0] == inside[1] and shared["started"][0] == shared["started"][1]
    assert any(inside[0]) == overlaps
