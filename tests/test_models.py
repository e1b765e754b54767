"""Block discovery and replay on every supported family."""
import pytest
import torch

from conftest import TINY_FAMILIES, tiny_model
from eqat_dist.models import block_linears, decoder_layers, embed, record_block_calls, run_block
from eqat_dist.models.family import SUPPORTED_FAMILIES

ARCHS = [TINY_FAMILIES[t] for t in SUPPORTED_FAMILIES]  # every family models/family.py supports


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_replayed_alone_reproduce_the_full_model(arch):
    model = tiny_model(arch, layers=4)
    ids = torch.randint(0, 256, (3, 40))  # longer than the sliding windows: masks differ per layer type
    layers = decoder_layers(model)
    assert len(layers) == 4
    linears = block_linears(layers[0])
    assert {"self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"} <= set(linears)
    _, calls = record_block_calls(model, ids[:1])  # recorded once, with batch size 1
    hidden = embed(model, ids)
    with torch.no_grad():
        for block, call in zip(layers, calls):
            hidden = run_block(block, hidden, call)
        ref = model.base_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        ours = model.base_model.norm(hidden)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_every_keyword_argument_is_captured():
    model = tiny_model("gemma3", layers=2)
    _, calls = record_block_calls(model, torch.randint(0, 256, (1, 20)))
    for call in calls:
        assert "position_embeddings" in call.kwargs and "attention_mask" in call.kwargs
        assert call.kwargs["use_cache"] is False
    # sliding and full attention layers get different rotary tables in Gemma3
    assert not torch.equal(calls[0].kwargs["position_embeddings"][0], calls[1].kwargs["position_embeddings"][0])


@pytest.mark.parametrize("arch", ARCHS)
def test_the_shell_and_an_empty_block_compute_their_buffers_as_a_normally_built_model(arch):
    """models/lazy.py builds the shell and every block without the random initialisation (their weights
    are loaded next); what is not loaded, the rotary tables and Gemma's embedding scale, must still be
    what transformers' own construction computes, for every family we support."""
    from eqat_dist.models.lazy import empty_block, model_shell

    reference = tiny_model(arch, layers=2)
    shell, layers, prefix = model_shell(reference.config, torch.float32)
    want = dict(reference.named_buffers())
    got = {**dict(shell.named_buffers()),
           **{f"{prefix}.{i}.{k}": v for i in range(2) for k, v in empty_block(layers, i, reference.config,
                                                                                torch.float32).named_buffers()}}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
