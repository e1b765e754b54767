"""Sequence parallelism's split attention (models/sequence_split.py): a block run on S ranks' shares of
every window's tokens equals the block run whole, values and gradients, for every supported family
(causal, grouped-query, sliding windows, Gemma 3's layers); bad layouts are refused in one line."""
import copy
import threading

import pytest
import torch

from conftest import TINY_FAMILIES, tiny_model
from eqat_dist.models import decoder_layers, embed, record_block_calls, run_block
from eqat_dist.models.sequence_split import (SplitError, TokenSplit, check_split, use_split_attention,
                                             zigzag_positions)
from test_data_parallel import _ThreadGroup


def test_the_zigzag_gives_every_rank_two_chunks_and_the_same_causal_work():
    assert zigzag_positions(8, 2, 0).tolist() == [0, 1, 6, 7] and zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    for parts in (1, 2, 4):
        shares = [zigzag_positions(32, parts, p) for p in range(parts)]
        assert sorted(torch.cat(shares).tolist()) == list(range(32))
        assert len({int((share + 1).sum()) for share in shares}) == 1  # keys each rank's queries see, causally
    with pytest.raises(SplitError, match="`seqlen` 30 does not cut into 2 x `sequence_parallel` 4 = 8 equal chunks"):
        check_split(30, 4)


def _split_run(block, x, call, parts, weights):
    """Each of `parts` threads runs a copy of `block` on its tokens; returns (outputs laid back in token
    order, the parameters' gradients summed over the ranks, the input's gradient in token order)."""
    shared = {"barrier": threading.Barrier(parts), "slots": [None] * parts, "started": [[] for _ in range(parts)],
              "finished": [0] * parts}
    out = torch.zeros_like(x)
    x_grad = torch.zeros_like(x)
    grads, errors = [None] * parts, []

    def rank(p):
        try:
            split = TokenSplit(x.shape[1], parts, p, _ThreadGroup(shared, p, parts) if parts > 1 else None)
            mine = use_split_attention(copy.deepcopy(block))
            xs = split.cut(x).detach().requires_grad_(True)
            y = run_block(mine, xs, split.call(call))
            (y * split.cut(weights)).sum().backward()
            positions = split.positions
            out[:, positions] = y.detach()
            x_grad[:, positions] = xs.grad
            grads[p] = {n: q.grad for n, q in mine.named_parameters()}
        except Exception as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(p,)) for p in range(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    summed = {n: sum(g[n] for g in grads) for n in grads[0]}
    return out, summed, x_grad


@pytest.mark.parametrize("family", sorted(set(TINY_FAMILIES.values())))
@pytest.mark.parametrize("parts", [2, 4])
def test_split_attention_equals_the_whole_block_values_and_gradients(family, parts):
    """Every layer of each family (Gemma 3: a sliding and a full one; Mistral: a sliding window shorter
    than the window), two windows of 32 tokens, grouped-query attention (4 heads, 2 key-value heads)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model(family, layers=2)
    ids = torch.randint(0, 256, (2, 32))
    _, calls = record_block_calls(model, ids[:1])
    x = embed(model, ids).detach()
    for i, block in enumerate(decoder_layers(model)):
        block = block.float().train()
        weights = torch.randn_like(x)
        whole = copy.deepcopy(block)
        xw = x.clone().requires_grad_(True)
        y = run_block(whole, xw, calls[i])
        (y * weights).sum().backward()
        out, grads, x_grad = _split_run(block, x, calls[i], parts, weights)
        assert _off(out, y) < 1e-6 and _off(x_grad, xw.grad) < 1e-6, (family, i)
        for name, p in whole.named_parameters():
            assert _off(grads[name], p.grad) < 1e-6, (family, i, name, _off(grads[name], p.grad))


def _off(a, b) -> float:
    """The largest difference relative to the largest value: float summation order gives ~1e-7."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _thread_shared(parts):
    return {"barrier": threading.Barrier(parts), "slots": [None] * parts, "started": [[] for _ in range(parts)],
            "finished": [0] * parts}


def _train_split(fp_block, call, x, y, settings, data_parallel, sequence_parallel):
    """D x S threads standing for a group's ranks: rank d*S + s holds lanes part d of the windows and
    token share s of each; returns (per-rank train losses by step, reports, students)."""
    from eqat_dist.blockap.lanes import Lanes
    from eqat_dist.blockap.steps import make_student
    from eqat_dist.blockap.trainer import train_block
    from test_blockap import CFG, _stores

    width = data_parallel * sequence_parallel
    whole = _thread_shared(width)
    rows = [_thread_shared(sequence_parallel) for _ in range(data_parallel)]
    losses, reports, students, errors = [[] for _ in range(width)], [None] * width, [None] * width, []

    def rank(m):
        try:
            d, s = divmod(m, sequence_parallel)
            seq_group = _ThreadGroup(rows[d], s, sequence_parallel) if sequence_parallel > 1 else None
            split = TokenSplit(x.shape[1], sequence_parallel, s, seq_group)
            train_lanes, val_lanes = Lanes(6, settings.batch_size, data_parallel, d), Lanes(2, settings.batch_size,
                                                                                             data_parallel, d)
            xs, ys = _stores([split.cut(x[:6][train_lanes.windows()]), split.cut(y[:6][train_lanes.windows()])])
            vx, vy = _stores([split.cut(x[6:][val_lanes.windows()]), split.cut(y[6:][val_lanes.windows()])])
            student = use_split_attention(make_student(fp_block, CFG, "cpu"))
            log = lambda tag, value, step: losses[m].append(value) if tag == "train_loss" else None  # noqa: E731
            group = _ThreadGroup(whole, m, width) if width > 1 else None
            reports[m] = train_block(student, 0, xs, ys, vx, vy, split.call(call), settings, "cpu", log=log,
                                     lanes=train_lanes, group=group, split=split)
            students[m] = student
        except Exception as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)
            whole["barrier"].abort()
            for shared in rows:
                shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(m,)) for m in range(width)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return losses, reports, students


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("data_parallel,sequence_parallel,batch", [(1, 2, 2), (1, 4, 2), (2, 2, 4)])
def test_ranks_sharing_windows_and_tokens_take_the_steps_of_one_rank(data_parallel, sequence_parallel, batch, loss,
                                                                     monkeypatch):
    """S ranks splitting every window's tokens (and D x S ranks splitting windows and tokens) train a
    block through the same steps as one rank at the same global batch: every step's loss within 1e-5,
    validation losses and the trained block alike; the Huber loss's threshold made to cap most tokens
    (its median is the whole step's)."""
    from eqat_dist.blockap.trainer import BlockAPSettings
    from eqat_dist.models.quantize import quant_linears
    from test_blockap import _block_setup

    monkeypatch.setattr("eqat_dist.blockap.losses.HUBER_FACTOR", 1.2)
    torch.set_num_threads(1)
    fp_block, call, x, y = _block_setup()
    settings = BlockAPSettings(epochs=3, batch_size=batch, quant_lr=1e-3, weight_lr=1e-4, seed=0, loss=loss)
    (one,), (one_report,), (one_student,) = _train_split(fp_block, call, x, y, settings, 1, 1)
    losses, reports, students = _train_split(fp_block, call, x, y, settings, data_parallel, sequence_parallel)
    for m in range(data_parallel * sequence_parallel):
        assert torch.allclose(torch.tensor(losses[m]), torch.tensor(one), rtol=1e-5, atol=0), m
        assert reports[m].val_losses == pytest.approx(one_report.val_losses, rel=1e-5)
        assert reports[m].loss_before == pytest.approx(one_report.loss_before, rel=1e-6)
        for name, q in quant_linears(students[m]).items():
            ref = quant_linears(one_student)[name]
            torch.testing.assert_close(q.weight, ref.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(q.scale, ref.scale, rtol=1e-5, atol=1e-7)
            assert torch.equal(q.weight, quant_linears(students[0])[name].weight)  # one block on every rank
