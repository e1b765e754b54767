"""The quantizer against the reference formulas (reference doc, section 1)."""
import pytest
import torch

from eqat_dist.quant import QuantConfig, QuantConfigError, QuantLinear, fake_quantize, minmax_init, quantize_to_int
from eqat_dist.quant.fake_quant import dequantize


def reference_fake_quant(w, s, z, bits, group):
    """Plain formula, no autograd tricks: clamp(round(W/s) + round(z), 0, qmax) - round(z)) * s."""
    qmax = 2**bits - 1
    wg = w.reshape(w.shape[0], -1, group)
    s = s.clamp(1e-4, 1e4).unsqueeze(-1)
    z = z.clamp(0, qmax).round().unsqueeze(-1)
    return ((torch.clamp(torch.round(wg / s) + z, 0, qmax) - z) * s).reshape(w.shape)


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 64), (8, 16), (4, -1)])
def test_forward_matches_reference_and_minmax_init(bits, group):
    torch.manual_seed(bits)
    w = torch.randn(24, 64)
    cfg = QuantConfig(bits, group)
    s, z = minmax_init(w, cfg)
    g = cfg.effective_group(64)
    wg = w.reshape(24, -1, g)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    assert torch.allclose(s, (hi - lo) / (2**bits - 1))
    assert torch.equal(z, torch.round(-lo / s))
    assert torch.equal(fake_quantize(w, s, z, cfg), reference_fake_quant(w, s, z, bits, g))
    # min/max init reproduces each group's extremes to within half a step
    err = (fake_quantize(w, s, z, cfg) - w).reshape(24, -1, g).abs().amax(-1)
    assert (err <= s / 2 + 1e-6).all()


def test_gradients_match_reference_formulas():
    """dW_hat/ds = round(W/s) - W/s (unclipped) or q_clip - z (clipped); dW_hat/dz = -s only where
    clipped; dW_hat/dW = 1 inside the range, 0 outside."""
    torch.manual_seed(0)
    bits, group = 3, 16
    cfg = QuantConfig(bits, group)
    w = torch.randn(8, 32)
    s0, z0 = minmax_init(w, cfg)
    s0 = s0 * 0.6  # shrink the step so that some elements clip on both sides
    z0 = z0 + 0.3  # a non-integer zero point, rounded in the forward
    w_, s_, z_ = (t.clone().requires_grad_(True) for t in (w, s0, z0))
    out = fake_quantize(w_, s_, z_, cfg)
    upstream = torch.randn_like(out)
    out.backward(upstream)

    wg, s, zr = w.reshape(8, -1, group), s0.unsqueeze(-1), z0.round().unsqueeze(-1)
    raw = torch.round(wg / s) + zr
    qmax = 2**bits - 1
    clipped = (raw < 0) | (raw > qmax)
    assert clipped.any() and (~clipped).any()
    q_clip = raw.clamp(0, qmax)
    up = upstream.reshape(wg.shape)
    ds = torch.where(clipped, q_clip - zr, torch.round(wg / s) - wg / s)
    dz = torch.where(clipped, -s.expand_as(wg), torch.zeros_like(wg))
    dw = torch.where(clipped, 0.0, 1.0)
    torch.testing.assert_close(s_.grad, (ds * up).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_.grad, (dz * up).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_.grad, (dw * up).reshape(w.shape))


def test_scale_gradient_matches_finite_differences_between_rounding_jumps():
    """With the integer codes held fixed, W_hat is linear in s: the STE gradient of the
    dequantization step must equal central finite differences of (W_int - z) * s."""
    torch.manual_seed(1)
    cfg = QuantConfig(4, 16)
    w = torch.randn(4, 32, dtype=torch.float64)
    s, z = minmax_init(w, cfg)
    codes, zeros = quantize_to_int(w, s, z, cfg)
    s64 = s.double().requires_grad_(True)
    loss_fn = lambda scale: (dequantize(codes, scale, zeros, 16) ** 2).sum()
    loss_fn(s64).backward()
    eps = 1e-6
    fd = torch.zeros_like(s64)
    for idx in range(s64.numel()):
        d = torch.zeros(s64.numel(), dtype=torch.float64)
        d[idx] = eps
        d = d.reshape(s64.shape)
        fd.view(-1)[idx] = (loss_fn(s64.detach() + d) - loss_fn(s64.detach() - d)) / (2 * eps)
    torch.testing.assert_close(s64.grad, fd, rtol=1e-6, atol=1e-8)


def test_scale_and_zero_are_kept_in_range_with_straight_through_gradients():
    cfg = QuantConfig(2, 8)
    w = torch.randn(2, 8)
    s = torch.full((2, 1), 1e-6, requires_grad=True)  # below the 1e-4 floor
    z = torch.full((2, 1), 9.0, requires_grad=True)  # above qmax = 3
    out = fake_quantize(w, s, z, cfg)
    ref = reference_fake_quant(w, s.detach(), z.detach(), 2, 8)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert s.grad.abs().sum() > 0 and z.grad is not None  # straight-through: gradients still flow


def test_quant_linear_integers_reproduce_its_forward_bit_exactly():
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 32)
    q = QuantLinear(lin, QuantConfig(3, 32))
    with torch.no_grad():
        q.scale.mul_(1.1)
        q.zero.add_(0.4)
    codes, zeros, scales = q.to_int()
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() <= 7
    assert torch.equal(dequantize(codes, scales, zeros, 32), q.quantized_weight().detach())


@pytest.mark.parametrize("bits,group,msg", [(5, 64, "`wbits` 5"), (1, 64, "`wbits` 1"), (4, 0, "`group_size` 0"),
                                            (4, 33, "`group_size` 33")])
def test_bad_settings_are_refused(bits, group, msg):
    with pytest.raises(QuantConfigError, match=msg):
        QuantConfig(bits, group)


def test_group_that_does_not_divide_the_layer_is_refused_with_a_hint():
    with pytest.raises(QuantConfigError, match="does not divide the input width 576.*`group_size` 32 or 64"):
        QuantConfig(4, 128).check_layer("layers.0.q_proj", 576, 576)


def test_bits_per_weight_matches_paper():
    assert QuantConfig(2, 64).bits_per_weight(4096) == pytest.approx(2.28125)
    assert QuantConfig(4, 128).bits_per_weight(4096) == pytest.approx(4.15625)


@pytest.mark.parametrize("bits, group, rows, cols", [(2, 32, 37, 96), (3, 64, 19, 128), (4, 128, 5, 256),
                                                     (8, -1, 7, 96), (2, -1, 3, 160)])
@pytest.mark.parametrize("clipped", [False, True])
def test_the_layers_fake_quantization_matches_the_composed_one_forward_and_gradients(bits, group, rows, cols, clipped):
    """QuantLinear's path off the GPU (backward written out) against autograd through `fake_quantize`:
    forward bit-identical; dW, ds, dz equal up to summation order, clipped elements and zero points off
    the integer grid included."""
    from eqat_dist.quant.fake_quant import fused_fake_quantize

    torch.manual_seed(bits * 100 + rows)
    cfg = QuantConfig(bits, group)
    w = torch.randn(rows, cols)
    s, z = minmax_init(w, cfg)
    if clipped:
        s = s * 0.6
    z = z + torch.rand_like(z) * 0.8 - 0.4
    ref = [t.clone().requires_grad_() for t in (w, s, z)]
    new = [t.clone().requires_grad_() for t in (w, s, z)]
    want, got = fake_quantize(*ref, cfg), fused_fake_quantize(*new, cfg)
    assert torch.equal(want, got)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(new[0].grad, ref[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new[1].grad, ref[1].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new[2].grad, ref[2].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_init_picks_each_groups_least_error_shrink_and_is_never_worse_than_minmax(bits):
    from eqat_dist.quant.fake_quant import CLIP_GRID, clip_init

    torch.manual_seed(bits)
    weight = torch.randn(32, 128) * 0.02
    weight[torch.rand_like(weight) < 0.01] *= 10  # outliers stretch min/max
    cfg = QuantConfig(bits, 32, "clip")
    scale, zero = clip_init(weight, cfg)

    def group_errors(s, z):
        codes, zeros = quantize_to_int(weight, s, z, cfg)
        return (dequantize(codes, s, zeros, 32) - weight).square().view(32, 4, 32).sum(-1)

    # reference: every group, every factor, one at a time
    for row in range(32):
        for g in range(4):
            w = weight[row, g * 32:(g + 1) * 32].double()
            lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
            errors = []
            for factor in CLIP_GRID:
                s = (hi - lo) * factor / cfg.qmax
                z = round(-lo * factor / s)
                q = ((w / s).round() + z).clamp(0, cfg.qmax)
                errors.append((((q - z) * s - w) ** 2).sum().item())
            best = min(range(len(CLIP_GRID)), key=errors.__getitem__)
            assert scale[row, g].item() == pytest.approx((hi - lo) * CLIP_GRID[best] / cfg.qmax, rel=1e-5)
    minmax = group_errors(*minmax_init(weight, cfg))
    clipped = group_errors(scale, zero)
    assert (clipped <= minmax * (1 + 1e-6)).all() and clipped.sum() < 0.97 * minmax.sum()
    layer = torch.nn.Linear(128, 32, bias=False)
    layer.weight.data = weight.clone()
    assert torch.equal(QuantLinear(layer, cfg).scale.detach(), scale)
    assert torch.equal(QuantLinear(layer, QuantConfig(bits, 32)).scale.detach(), minmax_init(weight, cfg)[0])


def test_unknown_init_is_refused():
    with pytest.raises(QuantConfigError, match="`init` awq is not known; use one of minmax, clip, gptq"):
        QuantConfig(2, 64, "awq")


def _gptq_reference(weight, hessian, cfg):
    """GPTQ written column by column with the full H^-1 update (no lazy blocks), the paper's min/max grid
    of each group taken from the weights as they stand when its first column is reached."""
    from eqat_dist.quant.fake_quant import SCALE_MAX, SCALE_MIN

    w = weight.clone().double()
    h = hessian.clone().double()
    h.diagonal().add_(0.01 * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    group = cfg.effective_group(w.shape[1])
    q = torch.zeros_like(w)
    for col in range(w.shape[1]):
        if col % group == 0:
            g = w[:, col:col + group]
            lo, hi = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
            s = ((hi - lo) / cfg.qmax).clamp(SCALE_MIN, SCALE_MAX)
            z = (-lo / s).round().clamp(0, cfg.qmax)
        q[:, col] = ((w[:, col] / s).round() + z).clamp(0, cfg.qmax).sub(z).mul(s)
        err = (w[:, col] - q[:, col]) / u[col, col]
        w[:, col:] -= err.unsqueeze(1) * u[col, col:].unsqueeze(0)
    return q


@pytest.mark.parametrize("bits, group, cols", [(2, 32, 320), (3, 64, 192), (4, -1, 96), (2, 256, 512)])
def test_gptq_matches_a_column_by_column_reference_and_beats_round_to_nearest_on_the_output(bits, group, cols):
    """quant/gptq.py against the plain algorithm (its lazy 128-column blocks give the same result), its
    weight on the grid it returns (what Block-AP's first fake quantization gives back), and a smaller
    output error ||(W_q - W) X|| than round-to-nearest on correlated inputs."""
    from eqat_dist.quant.gptq import gptq_weight

    torch.manual_seed(bits)
    cfg = QuantConfig(bits, group)
    weight = torch.randn(48, cols)
    mix = torch.randn(cols, cols) / cols ** 0.5
    x = torch.randn(2048, cols) @ (torch.eye(cols) + mix)  # correlated inputs, as a layer's are
    hessian = x.T @ x
    start, scale, zero = gptq_weight(weight, hessian, cfg)
    q = fake_quantize(start, scale, zero, cfg)  # what Block-AP's first step sees
    ref = _gptq_reference(weight, hessian, cfg)
    assert torch.allclose(q.double(), ref, atol=1e-4), (q.double() - ref).abs().max()
    # every weight inside the grid's range (a gradient for each), between grid points where GPTQ left it
    w = start.detach().requires_grad_(True)
    fake_quantize(w, scale, zero, cfg).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert not torch.equal(start, q)
    rtn = fake_quantize(weight, *minmax_init(weight, cfg), cfg)
    error = lambda w: ((w - weight) @ x.T).square().sum()  # noqa: E731
    assert error(q) < 0.8 * error(rtn)


@pytest.mark.parametrize("grid,bits,group", [("q2_0", 2, 64), ("q4_0", 4, 32), ("q8_0", 8, 32)])
@pytest.mark.parametrize("init", ["minmax", "clip"])
def test_a_format_grid_fixes_the_zero_point_signs_each_groups_scale_and_its_integers_reproduce_the_forward(
        grid, bits, group, init):
    """llama.cpp's grids: (q - offset) x d with d of either sign. Every zero point is the offset and is not
    trained; a group whose weights reach further below zero than above gets the side with more levels
    there (Q2_0: +2 d above, -1 d below, so d < 0 mirrors it); the packed integers and the signed scales
    give the fake-quantized weight exactly; clip is never worse than minmax."""
    from eqat_dist.quant.config import GRIDS
    from eqat_dist.quant.fake_quant import dequantize

    torch.manual_seed(0)
    lin = torch.nn.Linear(4 * group, 32, bias=False)
    with torch.no_grad():
        lin.weight[0, :group] = torch.linspace(-1.0, 0.3, group)  # reaches further below zero
        lin.weight[1, :group] = torch.linspace(-0.3, 1.0, group)  # further above
    cfg = QuantConfig(bits, group, init, grid)
    q = QuantLinear(lin, cfg)
    offset = GRIDS[grid].zero
    assert not q.zero.requires_grad and bool((q.zero == offset).all())
    codes, zeros, scales = q.to_int()
    assert bool((zeros == offset).all()) and int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    more_above = 2**bits - 1 - offset > offset
    assert (scales[0, 0] < 0) == more_above and (scales[1, 0] > 0) == more_above  # the long side on the more levels
    assert torch.equal(dequantize(codes, scales, zeros, group), q.quantized_weight().detach())
    error = ((q.quantized_weight() - lin.weight) ** 2).sum().item()
    if init == "clip":
        minmax = QuantLinear(lin, QuantConfig(bits, group, "minmax", grid))
        assert error <= ((minmax.quantized_weight() - lin.weight) ** 2).sum().item()
    q.quantized_weight().square().sum().backward()
    assert q.zero.grad is None and q.scale.grad is not None and q.weight.grad is not None
    assert cfg.tag() == f"w{bits}g{group}-{grid}" and cfg.bits_per_weight(4 * group) == bits + 16 / group


def test_a_format_grid_refuses_other_widths_and_a_gptq_start():
    with pytest.raises(QuantConfigError, match=r"`grid` q2_0 is llama.cpp's Q2_0: 2-bit codes in groups of 64; use "
                                               r"`wbits` 2 `group_size` 64"):
        QuantConfig(2, 32, grid="q2_0")
    with pytest.raises(QuantConfigError, match="`init` gptq chooses its own zero points; `grid` q4_0 fixes them"):
        QuantConfig(4, 32, "gptq", "q4_0")
    with pytest.raises(QuantConfigError, match="`grid` q3_0 is not known"):
        QuantConfig(2, 64, grid="q3_0")
