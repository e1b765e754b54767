"""GPTQ v2 export: config, tensors, reload into packed modules, corrupt files."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from eqat_dist import __version__
from eqat_dist.export import CheckpointError, load_packed_model, save_packed_model
from eqat_dist.models import decoder_layers
from eqat_dist.models.quantize import packed_linears, quantize_rtn
from eqat_dist.quant import QuantConfig


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


@pytest.fixture
def exported(tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    cfg = QuantConfig(3, 32)
    model = quantize_rtn(tiny_model("qwen2"), cfg)  # qwen2: q/k/v biases are exported too
    save_packed_model(model, _NoTokenizer(), tmp_path / "out", cfg)
    return model, tmp_path / "out", cfg


def test_config_declares_gptq_v2(exported):
    _, out, _ = exported
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "gptq", "bits": 3, "group_size": 32, "sym": False, "desc_act": False,
                  "lm_head": False, "checkpoint_format": "gptq_v2", "format": "gptq_v2", "pack_dtype": "int32",
                  "meta": {"quantizer": [f"eqat-dist:{__version__}"]}}
    assert "damp_percent" not in qc  # GPTQModel and transformers refuse 0 (issue 15)


def test_tensors_have_gptq_names_shapes_and_dtypes(exported):
    _, out, _ = exported
    state = load_file(out / "model.safetensors")
    prefix = "model.layers.0.self_attn.q_proj."
    assert state[prefix + "qweight"].dtype == torch.int32 and state[prefix + "qweight"].shape == (64 * 3 // 32, 64)
    assert state[prefix + "qzeros"].shape == (2, 64 * 3 // 32)
    assert state[prefix + "scales"].dtype == torch.float16 and state[prefix + "scales"].shape == (2, 64)
    assert torch.equal(state[prefix + "g_idx"], torch.arange(64, dtype=torch.int32) // 32)
    assert prefix + "bias" in state and prefix + "weight" not in state


def test_reload_gives_the_same_integers_and_outputs(exported):
    model, out, _ = exported
    loaded, _ = load_packed_model(out)
    for a, b in zip(decoder_layers(model), decoder_layers(loaded)):
        for (na, la), (nb, lb) in zip(packed_linears(a).items(), packed_linears(b).items()):
            assert na == nb and torch.equal(la.qweight, lb.qweight) and torch.equal(la.qzeros, lb.qzeros)
            assert torch.equal(la.scales.half().float(), lb.scales)
    ids = torch.randint(0, 256, (2, 16))
    for layer in (l for blk in decoder_layers(model) for l in packed_linears(blk).values()):
        layer.scales.data = layer.scales.data.half().float()  # what the fp16 export keeps
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_lazy_tensors_read_what_load_file_reads_and_report_truncation(exported, tmp_path):
    from eqat_dist.export.gptq_v2 import LazyTensors

    _, out, _ = exported
    whole, lazy = load_file(out / "model.safetensors"), LazyTensors(out)
    assert sorted(lazy) == sorted(whole) and len(lazy) == len(whole)
    assert all(torch.equal(lazy[k], v) and lazy[k].dtype == v.dtype for k, v in whole.items())
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        LazyTensors(tmp_path / "cut")


def test_corrupt_checkpoint_is_reported(exported):
    _, out, _ = exported
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_packed_model(out)
