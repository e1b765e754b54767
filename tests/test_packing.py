"""GPTQ v2 packing: layouts against GPTQ's own packing loop, bit-exact round trips."""
import numpy as np
import pytest
import torch

from eqat_dist.quant import PackedLinear, QuantConfig, QuantLinear, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from eqat_dist.quant.packing import pack_rows, unpack_rows


def gptq_reference_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ's original row-packing loop (qweight layout), including its special 3-bit case."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values in 3 words
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_equals_gptq_reference_and_round_trips(bits):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (96, 40), generator=gen, dtype=torch.int32)
    values[0] = 2**bits - 1  # top bits set: exercises the int32 sign bit
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    np.testing.assert_array_equal(packed.numpy(), gptq_reference_pack(values.numpy(), bits))
    assert torch.equal(unpack_rows(packed, bits), values)


def test_qweight_and_qzeros_shapes_and_round_trip():
    bits, out_f, in_f, groups = 3, 64, 128, 4
    codes = torch.randint(0, 8, (out_f, in_f), dtype=torch.int32)
    zeros = torch.randint(0, 8, (out_f, groups), dtype=torch.int32)
    qw, qz = pack_qweight(codes, bits), pack_qzeros(zeros, bits)
    assert qw.shape == (in_f * bits // 32, out_f) and qz.shape == (groups, out_f * bits // 32)
    assert torch.equal(unpack_qweight(qw, bits), codes) and torch.equal(unpack_qzeros(qz, bits), zeros)


def test_zero_points_are_clamped_before_packing():
    zeros = torch.tensor([[-3.0], [2.0], [9.0]] + [[1.0]] * 29)  # out of the 2-bit range on both sides
    unpacked = unpack_qzeros(pack_qzeros(zeros, 2), 2)
    assert unpacked[:3, 0].tolist() == [0, 2, 3]  # neighbours not corrupted


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 32), (4, -1), (8, 64)])
def test_fake_quant_to_packed_round_trip_is_bit_exact(bits, group):
    torch.manual_seed(bits)
    lin = torch.nn.Linear(128, 64)
    cfg = QuantConfig(bits, group)
    q = QuantLinear(lin, cfg)
    with torch.no_grad():  # trained-looking parameters: non-integer zero points, perturbed scales
        q.scale.mul_(torch.rand_like(q.scale) + 0.5)
        q.zero.add_(torch.rand_like(q.zero) - 0.5)
    codes, zeros, scales = q.to_int()
    packed = PackedLinear.from_int(codes, zeros, scales, cfg, bias=lin.bias.detach())
    assert torch.equal(packed.int_codes(), codes)
    assert torch.equal(packed.int_zeros(), zeros)
    assert torch.equal(packed.dequantized_weight(), q.quantized_weight().detach())


def test_packed_linear_stores_integers_as_frozen_parameters_and_trains_scales():
    cfg = QuantConfig(4, 32)
    layer = PackedLinear(64, 32, cfg)
    params = dict(layer.named_parameters())
    assert set(params) == {"qweight", "qzeros", "scales"}
    assert list(layer.named_buffers()) == []  # ZeRO-3 replicates buffers: nothing may be one
    assert params["qweight"].dtype == torch.int32 and not params["qweight"].requires_grad
    assert params["qzeros"].dtype == torch.int32 and not params["qzeros"].requires_grad
    assert params["scales"].requires_grad


def test_packed_linear_gradient_reaches_scales_and_matches_gradcheck():
    """The module's forward against the plain formula, and its scale gradient against finite differences."""
    torch.manual_seed(3)
    cfg = QuantConfig(2, 32)
    codes = torch.randint(0, 4, (32, 64), dtype=torch.int32)
    zeros = torch.randint(0, 4, (32, 2), dtype=torch.int32)
    layer = PackedLinear.from_int(codes, zeros, torch.rand(32, 2) + 0.1, cfg, dtype=torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64)
    expected_w = (codes.double() - zeros.double().repeat_interleave(32, 1)) * layer.scales.detach().t().repeat_interleave(32, 1)
    torch.testing.assert_close(layer(x), x @ expected_w.t())
    as_function = lambda scales: torch.func.functional_call(layer, {"scales": scales}, (x,))
    assert torch.autograd.gradcheck(as_function, (layer.scales.detach().clone().requires_grad_(True),))
    layer(x).sum().backward()
    assert layer.scales.grad is not None and layer.scales.grad.abs().sum() > 0


def test_packed_linear_holds_nothing_but_its_parameters_between_forwards():
    """Under ZeRO-3 only the parameters are partitioned: a kept unpacked copy would sit whole on every rank."""
    cfg = QuantConfig(2, 32)
    codes = torch.randint(0, 4, (64, 96))
    layer = PackedLinear.from_int(codes, torch.randint(0, 4, (64, 3)).float(), torch.rand(64, 3) + 0.1, cfg)
    before = set(vars(layer))
    out = layer(torch.randn(5, 96))
    out.sum().backward()
    tensors = [k for k, v in vars(layer).items() if isinstance(v, torch.Tensor)]
    assert set(vars(layer)) == before and tensors == []
    assert torch.equal(layer.int_codes(), codes.to(torch.int32))
