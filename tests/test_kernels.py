"""The Triton kernels (eqat_dist/kernels, linked as cuda/) against the PyTorch reference they replace
on GPUs. Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET)."""
import pytest
import torch

triton = pytest.importorskip("triton")

from eqat_dist.kernels.fake_quant import fake_quantize as fused_fake_quantize  # noqa: E402
from eqat_dist.kernels.packed_linear import _wide, packed_linear  # noqa: E402
import triton.language as tl  # noqa: E402
from eqat_dist.quant import QuantConfig  # noqa: E402
from eqat_dist.quant.fake_quant import QuantLinear, fake_quantize, minmax_init  # noqa: E402
from eqat_dist.quant.packed_linear import PackedLinear  # noqa: E402

GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _on_the_gpu_when_there_is_one():
    """On a GPU machine every tensor here is a CUDA tensor, so the kernels are checked where they run
    (without one, conftest has Triton's interpreter run them on CPU tensors)."""
    if not GPU:
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)


# rows and columns that leave a program's tile part empty (kernels/fake_quant._tiles: 8 rows x 256
# columns of whole groups): 10 groups of 32 are a full tile and a part; per-channel 300 takes two steps
CASES = [(2, 32, 37, 96), (3, 64, 19, 128), (4, 128, 5, 256), (8, -1, 7, 96), (2, -1, 3, 160), (3, 32, 1, 64),
         (2, 32, 9, 320), (4, -1, 5, 300)]


@pytest.mark.parametrize("bits, group, rows, cols", CASES)
@pytest.mark.parametrize("clipped", [False, True])
def test_fused_fake_quantization_matches_the_reference_forward_and_gradients(bits, group, rows, cols, clipped):
    """Forward bit-identical; dW, ds, dz equal to autograd through the PyTorch quantizer, including
    clipped elements (no gradient to W, all of it to s and z) and zero points off the integer grid."""
    torch.manual_seed(bits * 100 + rows)
    cfg = QuantConfig(bits, group)
    g = cfg.effective_group(cols)
    w = torch.randn(rows, cols)
    s, z = minmax_init(w, cfg)
    if clipped:  # a smaller step clips the largest weights of every group
        s = s * 0.6
    z = z + torch.rand_like(z) * 0.8 - 0.4
    ref_w, ref_s, ref_z = (t.clone().requires_grad_() for t in (w, s, z))
    fw, fs, fz = (t.clone().requires_grad_() for t in (w, s, z))
    want = fake_quantize(ref_w, ref_s, ref_z, cfg)
    got = fused_fake_quantize(fw, fs, fz, cfg.qmax, g)
    assert torch.equal(want, got)
    codes = (w.reshape(rows, -1, g) / s.clamp(1e-4, 1e4).unsqueeze(-1)).round() + z.clamp(0, cfg.qmax).round().unsqueeze(-1)
    outside = ((codes < 0) | (codes > cfg.qmax)).sum().item()
    assert (outside > 0) == clipped or not clipped  # the clipped cases do clip
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(fw.grad, ref_w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fs.grad, ref_s.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fz.grad, ref_z.grad, rtol=1e-4, atol=1e-5)


def _packed(bits, group, out_f, in_f, seed=0, bias=False):
    torch.manual_seed(seed)
    cfg = QuantConfig(bits, group)
    g = cfg.effective_group(in_f)
    codes = torch.randint(0, 2**bits, (out_f, in_f))
    zeros = torch.randint(0, 2**bits, (out_f, in_f // g)).float()
    scales = torch.rand(out_f, in_f // g) * 0.05 + 0.005
    return PackedLinear.from_int(codes, zeros, scales, cfg, bias=torch.randn(out_f) if bias else None), g


@pytest.fixture(params=["dequant", "fused"])
def path(request, monkeypatch):
    """Both ways of the packed layer (EQAT_PACKED_LINEAR): dequantize + matmul, and the fused tiles."""
    monkeypatch.setenv("EQAT_PACKED_LINEAR", request.param)
    return request.param


@pytest.mark.parametrize("bits, group, out_f, in_f, tokens", [
    (2, 32, 96, 128, 5), (3, 64, 64, 128, 17), (4, 128, 160, 256, 1), (8, -1, 64, 96, 3), (3, 32, 96, 96, 2),
    (2, -1, 64, 160, 1)])
def test_packed_linear_matches_the_reference_forward_and_gradients(bits, group, out_f, in_f, tokens, path):
    """y, dx and the scales' gradient as PackedLinear's dequantize-then-matmul (3-bit layout included,
    batch-1 GEMV and odd row counts)."""
    layer, g = _packed(bits, group, out_f, in_f, seed=bits + tokens, bias=bits == 3)
    x = torch.randn(2, tokens, in_f)
    rx, kx = x.clone().requires_grad_(), x.clone().requires_grad_()
    ks = layer.scales.detach().clone().requires_grad_()
    want = layer(rx)
    got = packed_linear(kx, layer.qweight, layer.qzeros, ks, layer.bias, bits, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(kx.grad, rx.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ks.grad, layer.scales.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_packed_linear_in_16_bit(dtype, tol, path):
    """float16 and bfloat16 activations (bfloat16 tiles go through float32 in the interpreter, whose
    bfloat16 tl.dot is broken; on a GPU they are multiplied as they are)."""
    layer, g = _packed(4, 64, 64, 128)
    x = torch.randn(3, 128).to(dtype)
    rx, kx = x.clone().requires_grad_(), x.clone().requires_grad_()
    ks = layer.scales.detach().clone().requires_grad_()
    want = layer(rx)
    got = packed_linear(kx, layer.qweight, layer.qzeros, ks, None, 4, g)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(kx.grad.float(), rx.grad.float(), rtol=tol, atol=tol)
    # the scales' gradient against float64 arithmetic: the PyTorch path forms dW = dy^T x in 16 bits,
    # the kernel accumulates in float32, so it must be at least as close to the truth
    truth = (grad.double().reshape(-1, 64).t() @ x.double().reshape(-1, 128))  # [out, in]
    codes = layer.int_codes().double() - layer.int_zeros().double().repeat_interleave(g, dim=1)
    truth = (truth * codes).reshape(64, -1, g).sum(-1).t()
    err = lambda t: ((t.double() - truth).norm() / truth.norm()).item()  # noqa: E731
    assert err(ks.grad) <= max(1e-5, err(layer.scales.grad) * 1.01), (err(ks.grad), err(layer.scales.grad))


def test_packed_linear_saves_no_float_weight_for_backward(path):
    """What autograd keeps between forward and backward: the PyTorch path saves the dequantized float
    weight (out x in x 4 bytes); the kernel saves the input and the packed tensors only."""
    layer, g = _packed(2, 64, 256, 512)
    x = torch.randn(4, 512)

    def saved_bytes(fn):
        sizes = []

        def pack(t):
            sizes.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
        return sizes

    reference = saved_bytes(lambda: layer(x.clone().requires_grad_()))
    kernel = saved_bytes(lambda: packed_linear(x.clone().requires_grad_(), layer.qweight, layer.qzeros,
                                               layer.scales, None, 2, g))
    float_weight = 256 * 512 * 4
    assert any(sorted(shape) == [256, 512] and dtype.is_floating_point for shape, dtype, _ in reference)
    assert not any(dtype.is_floating_point and n >= float_weight for shape, dtype, n in kernel), kernel
    packed = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales))
    assert sum(n for *_, n in kernel) <= x.numel() * 4 + packed
    assert sum(n for *_, n in reference) > sum(n for *_, n in kernel) + float_weight - packed


@pytest.mark.parametrize("bits, out_f", [(3, 96), (4, 160), (2, 64)])
def test_the_scales_gradient_in_column_slices_equals_one_pass(monkeypatch, bits, out_f):
    """The dequantize path forms the scales' gradient a slice of 32 output columns at a time when the
    layer is large (its temporaries bounded): slices at 32-column borders of the zeros' packed words
    (3 bits: 32 values in 3 words) give the one-pass result, and both the reference's."""
    from eqat_dist.kernels import packed_linear as pl_mod

    monkeypatch.setenv("EQAT_PACKED_LINEAR", "dequant")
    layer, g = _packed(bits, 32, out_f, 64, seed=out_f)
    x, grad = torch.randn(5, 64), torch.randn(5, out_f)
    grads = []
    for budget in (1 << 26, 32 * 64):  # one pass; then 32 columns a slice
        monkeypatch.setattr(pl_mod, "DS_TEMPORARY_ELEMENTS", budget)
        scales = layer.scales.detach().clone().requires_grad_()
        packed_linear(x, layer.qweight, layer.qzeros, scales, None, bits, g).backward(grad)
        grads.append(scales.grad)
    assert torch.equal(grads[0], grads[1])
    layer.scales = torch.nn.Parameter(layer.scales.detach().clone())  # the reference's own gradient
    layer(x).backward(grad)
    torch.testing.assert_close(grads[1], layer.scales.grad, rtol=1e-4, atol=1e-4)


def test_an_unknown_packed_linear_path_is_named(monkeypatch):
    monkeypatch.setenv("EQAT_PACKED_LINEAR", "cublas")
    layer, g = _packed(4, 32, 32, 64)
    with pytest.raises(ValueError, match="EQAT_PACKED_LINEAR='cublas': choose 'dequant'"):
        packed_linear(torch.randn(2, 64), layer.qweight, layer.qzeros, layer.scales, None, 4, g)


def test_the_layers_call_the_kernels_where_enabled(monkeypatch):
    """QuantLinear and PackedLinear take the kernel path when `enabled_for` says so (on CUDA tensors in
    real runs; forced here) and give the reference path's results; --no-kernels (set_enabled) or EQAT_KERNELS=0 turns it off."""
    from eqat_dist import kernels

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    q = QuantLinear(lin, QuantConfig(3, 64))
    layer, g = _packed(4, 32, 64, 128)
    x = torch.randn(5, 128)
    want_q, want_p = q(x), layer(x)
    calls = []
    import eqat_dist.kernels.fake_quant as fq
    import eqat_dist.kernels.packed_linear as pl
    real_fq, real_pl = fq.fake_quantize, pl.packed_linear
    monkeypatch.setattr(fq, "fake_quantize", lambda *a: calls.append("fake_quant") or real_fq(*a))
    monkeypatch.setattr(pl, "packed_linear", lambda *a: calls.append("packed") or real_pl(*a))
    monkeypatch.setattr(kernels, "enabled_for", lambda t: True)
    torch.testing.assert_close(q(x), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), want_p, rtol=1e-5, atol=1e-5)
    assert calls == ["fake_quant", "packed"]
    monkeypatch.undo()

    class OnCuda:  # what enabled_for looks at
        is_cuda = True
    assert kernels.enabled_for(OnCuda()) and not kernels.enabled_for(x)
    kernels.set_enabled(False)  # --no-kernels, as the runner sets it
    try:
        assert not kernels.enabled_for(OnCuda())
    finally:
        kernels.set_enabled(True)
    monkeypatch.setenv("EQAT_KERNELS", "0")  # the environment's override
    assert not kernels.enabled_for(OnCuda())


def test_every_kernel_launches_under_its_tensors_device(monkeypatch, path):
    """Triton launches on the current device: each launch must sit inside `on_device_of(tensor)`
    (torch.cuda.device of the tensor's GPU), or every rank's kernels run on GPU 0. The spy stands in
    for the guard and every kernel is wrapped to check it is launched inside one for its tensors."""
    import contextlib

    from eqat_dist.kernels import fake_quant as fq_mod, packed_linear as pl_mod

    inside, launched = [], []

    @contextlib.contextmanager
    def guard(tensor):
        inside.append(tensor.device)
        try:
            yield
        finally:
            inside.pop()

    class Checked:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                assert inside and devices == {inside[-1]}, f"{self.name} launched outside its tensors' device"
                launched.append(self.name)
                return self.kernel[grid](*args, **kwargs)
            return launch

    for module, names in ((fq_mod, ("_fq_fwd", "_fq_bwd")),
                          (pl_mod, ("_forward", "_grad_input", "_grad_scales", "_dequantize"))):
        monkeypatch.setattr(module, "on_device_of", guard)
        for name in names:
            monkeypatch.setattr(module, name, Checked(name, getattr(module, name)))
    cfg = QuantConfig(2, 32)
    w = torch.randn(8, 64, requires_grad=True)
    s, z = (t.requires_grad_() for t in minmax_init(w, cfg))
    fused_fake_quantize(w, s, z, cfg.qmax, 32).sum().backward()
    layer, g = _packed(4, 32, 32, 64)
    x = torch.randn(3, 64, requires_grad=True)
    scales = layer.scales.detach().clone().requires_grad_()
    packed_linear(x, layer.qweight, layer.qzeros, scales, None, 4, g).sum().backward()
    packed_kernels = ["_forward", "_grad_input", "_grad_scales"] if path == "fused" else ["_dequantize"] * 3
    assert sorted(launched) == sorted(["_fq_fwd", "_fq_bwd", *packed_kernels])


@triton.jit
def _offset_of_row_80000(out_ptr, width):
    row = _wide(tl.program_id(0) * 0 + 80_000 + tl.arange(0, 1))
    tl.store(out_ptr + tl.arange(0, 1), row * width)


def test_row_offsets_are_64_bit():
    """tokens x width passes 2^31 at about 75k tokens of width 28672: the kernels' row indices are
    widened before they are multiplied by a width (checked on the helper every kernel uses)."""
    out = torch.zeros(1, dtype=torch.int64)
    _offset_of_row_80000[(1,)](out, 28672)
    assert out.item() == 80_000 * 28672  # 2_293_760_000 > 2^31: an int32 product wraps negative


@pytest.mark.skipif(GPU, reason="the interpreter stands in for a GPU here; on one, bench/gpu_smoke.py's pipeline")
def test_autocast_reaches_the_packed_kernel_in_the_stream_pass_and_in_evaluation(monkeypatch):
    """The quantized-stream pass after each block and the evaluation of a packed model run under the
    training's autocast dtype: the kernel must see 16-bit activations (tensor cores), not float32."""


    from eqat_dist import kernels
    from eqat_dist.blockap.steps import advance
    from eqat_dist.blockap.stores import ActivationStore
    from eqat_dist.kernels import packed_linear as pl_mod
    import copy

    from eqat_dist.models.blocks import decoder_layers, embed, record_block_calls
    from eqat_dist.models.quantize import to_fake_quant, to_packed
    from eqat_dist.config import EvalConfig
    from eqat_dist.phases.evaluation import evaluate

    from conftest import tiny_model
    from transformers import AutoTokenizer
    from eqat_dist.models.loading import bundled_model_dir

    seen, real = [], pl_mod.packed_linear

    def spy(x, *args):
        seen.append(x.dtype)
        return real(x, *args)

    monkeypatch.setattr(kernels, "enabled_for", lambda tensor: True)  # the interpreter stands in for a GPU
    monkeypatch.setattr(pl_mod, "packed_linear", spy)
    model = tiny_model("llama", layers=1, vocab=49152)
    cfg = QuantConfig(4, 32)
    block = decoder_layers(model)[0]
    ids = torch.randint(0, 100, (2, 16))
    _, calls = record_block_calls(model, ids[:1])
    packed = to_packed(to_fake_quant(copy.deepcopy(block), cfg), cfg, dtype=torch.float32)
    store = ActivationStore(2, 16, 64, torch.bfloat16, "cpu", torch.device("cpu"))
    store.put([0, 1], embed(model, ids))
    advance(packed, store, store, calls[0], 1, torch.bfloat16)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    decoder_layers(model)[0] = packed
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    settings = EvalConfig(datasets=("news",), seqlen=16, max_windows=1, batch_size=1, zeroshot_tasks=())
    evaluate(model, tokenizer, settings, torch.bfloat16, torch.device("cpu"), "w4g32")
    assert seen and set(seen) == {torch.bfloat16}


def test_the_runner_hands_the_runs_kernels_setting_to_every_layer(monkeypatch):
    """--no-kernels reaches the layers through the runner (kernels.set_enabled), before any work."""
    from types import SimpleNamespace

    from eqat_dist import kernels, runner

    class Started(Exception):
        pass

    def transport(launch):
        raise Started
    asked = []
    monkeypatch.setattr(kernels, "set_enabled", asked.append)
    monkeypatch.setattr(runner, "make_transport", transport)
    for on in (False, True):
        with pytest.raises(Started):
            runner.run(SimpleNamespace(machine=SimpleNamespace(launch=None, kernels=on)))
    assert asked == [False, True]
