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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_by_block_export_equals_the_whole_model_export(tmp_path, monkeypatch, arch):
    """The streamed export (shards of whole blocks, the model never assembled) holds the same tensors,
    names, dtypes and config as the whole-model export, and loads back to the same outputs."""
    from eqat_dist.export.gptq_v2 import LazyTensors
    from eqat_dist.export import writer_for
    write_packed_blocks = writer_for("gptq_v2").write_blocks
    from eqat_dist.models.lazy import LazyModel
    from eqat_dist.phases.blockap import rtn_blocks

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    cfg = QuantConfig(3, 32)
    tiny_model(arch, layers=3).save_pretrained(tmp_path / "fp")
    whole = quantize_rtn(tiny_model(arch, layers=3), cfg).to(torch.float16)
    save_packed_model(whole, _NoTokenizer(), tmp_path / "whole", cfg, method="rtn")
    source = LazyModel(str(tmp_path / "fp"))
    write_packed_blocks(source, rtn_blocks(source, cfg), None, tmp_path / "streamed", cfg, "rtn", torch.float16)
    a, b = LazyTensors(tmp_path / "whole"), LazyTensors(tmp_path / "streamed")
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert sorted(p.name for p in (tmp_path / "streamed").glob("model*")) == ["model.safetensors"]  # fits one file
    qc = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(tmp_path / "whole") == qc(tmp_path / "streamed")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        want = load_packed_model(tmp_path / "whole")[0](input_ids=ids).logits
        got = load_packed_model(tmp_path / "streamed")[0](input_ids=ids).logits
    assert torch.equal(want, got)

    # a model larger than a shard: whole blocks gathered up to the limit, the shell in the first, the index
    from eqat_dist.export import shards
    block_bytes = sum(t.numel() * t.element_size() for k, t in a.items() if ".layers.1." in k)
    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", int(1.5 * block_bytes))
    source = LazyModel(str(tmp_path / "fp"))
    write_packed_blocks(source, rtn_blocks(source, cfg), None, tmp_path / "sharded", cfg, "rtn", torch.float16)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model*"))
    assert files == [f"model-0000{k}-of-00004.safetensors" for k in (1, 2, 3, 4)] + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    held = {}
    for name, file in index.items():
        block = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "shell"
        held.setdefault(file, set()).add(block)
    # the shell is over half a block here, so each block goes whole into a file of its own
    assert [held[f] for f in files[:4]] == [{"shell"}, {"0"}, {"1"}, {"2"}]
    c = LazyTensors(tmp_path / "sharded")
    assert set(c) == set(a) == set(index) and all(torch.equal(a[k], c[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(load_packed_model(tmp_path / "sharded")[0](input_ids=ids).logits, want)


def test_an_export_replaces_the_weights_of_the_one_before_it(tmp_path, monkeypatch):
    """A Block-AP export (shards) followed by E2E-QP's (one file) in the same folder: no stale shard stays
    for a loader to pick up, and the user's own files stay."""
    from eqat_dist.export.staging import new_stage, publish
    from eqat_dist.export import writer_for
    write_packed_blocks = writer_for("gptq_v2").write_blocks
    from eqat_dist.models.lazy import LazyModel
    from eqat_dist.phases.blockap import rtn_blocks

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    cfg = QuantConfig(2, 32)
    tiny_model("llama", layers=2).save_pretrained(tmp_path / "fp")
    source = LazyModel(str(tmp_path / "fp"))
    out = tmp_path / "out"
    stage = new_stage(out)
    write_packed_blocks(source, rtn_blocks(source, cfg), None, stage, cfg, "block-ap")
    publish(stage, out)
    (out / "notes.txt").write_text("mine")
    save_packed_model(quantize_rtn(tiny_model("llama", layers=2), cfg), _NoTokenizer(), out, cfg, method="block-ap+e2e-qp")
    weights = sorted(p.name for p in out.glob("*.safetensors*"))
    assert weights == ["model.safetensors"] and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_e2e_export_block_by_block_equals_the_whole_model_export(tmp_path, monkeypatch, arch):
    """After E2E-QP the export is written one gathered block at a time from the checkpoint it started
    from: the same tensors as saving the whole trained model, and the self-checks see what changed."""
    from eqat_dist.e2e.ds_setup import gathered_blocks
    from eqat_dist.export.gptq_v2 import LazyTensors
    from eqat_dist.export import writer_for
    write_e2e_blocks = writer_for("gptq_v2").write_retrained
    from eqat_dist.models.family import blocks_name

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    cfg = QuantConfig(2, 32)
    save_packed_model(quantize_rtn(tiny_model(arch, layers=3), cfg), _NoTokenizer(), tmp_path / "start", cfg,
                      method="block-ap")
    trained, _ = load_packed_model(tmp_path / "start")
    layers = [layer for block in decoder_layers(trained) for layer in packed_linears(block).values()]
    with torch.no_grad():
        for layer in layers[::2]:  # "training" moved half of the layers' step sizes
            layer.scales.mul_(1.01)
    save_packed_model(trained.to(torch.float16), _NoTokenizer(), tmp_path / "whole", cfg, method="block-ap+e2e-qp")
    trained, _ = load_packed_model(tmp_path / "whole")
    checks = write_e2e_blocks(tmp_path / "start", gathered_blocks(trained), blocks_name(trained), None,
                              tmp_path / "streamed", "block-ap+e2e-qp")
    a, b = LazyTensors(tmp_path / "whole"), LazyTensors(tmp_path / "streamed")
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert checks == {"integers_unchanged": True, "scales_changed": len(layers[::2])}
    qc = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(tmp_path / "streamed") == qc(tmp_path / "whole")
    with torch.no_grad():  # integers that moved are reported, not hidden
        decoder_layers(trained)[1].mlp.up_proj.qweight.add_(1)
    checks = write_e2e_blocks(tmp_path / "start", gathered_blocks(trained), blocks_name(trained), None,
                              tmp_path / "moved", "block-ap+e2e-qp")
    assert checks["integers_unchanged"] is False


def test_an_export_move_cut_short_is_finished_on_the_next_start(tmp_path):
    """publish() journals its renames: a kill between two of them leaves the journal, and recover()
    completes the move (old shards gone, new files in); a stage never published is deleted."""
    from eqat_dist.export.staging import JOURNAL, new_stage, recover, settled

    out = tmp_path / "run"
    out.mkdir()
    for name, text in (("model.safetensors", "old"), ("results.json", '{"old": 1}'), ("notes.txt", "mine")):
        (out / name).write_text(text)
    stage = new_stage(out)
    new = {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b",
           "model.safetensors.index.json": "{}", "results.json": '{"new": 1}', "config.json": "{}"}
    for name, text in new.items():
        (stage / name).write_text(text)
    (out / JOURNAL).write_text(json.dumps({"stage": stage.name, "items": sorted(new)}))
    (stage / "config.json").rename(out / "config.json")  # the kill came after the first rename
    assert json.loads(settled(out, "results.json").read_text()) == {"new": 1}  # what a restart will see
    leftover = new_stage(out)  # a stage of an export killed before its move
    (leftover / "model.safetensors").write_text("half")
    done = recover(out)
    assert len(done) == 2 and not stage.exists() and not leftover.exists() and not (out / JOURNAL).exists()
    assert {p.name: p.read_text() for p in out.iterdir()} == new | {"notes.txt": "mine"}
    assert recover(out) == []
