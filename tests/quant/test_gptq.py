"""globe.quant.gptq: beats round-to-nearest on the calibration objective when inputs are correlated."""
import pytest
import torch

from globe.quant import QuantConfig, quantize


def planted(experts=4, rows=32, cols=96, tokens=512, seed=0):
    """Weights and inputs with strongly correlated features (a low-rank mix plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(experts, 8, cols, generator=g)
    x = torch.randn(experts, tokens, 8, generator=g) @ mix + 0.1 * torch.randn(experts, tokens, cols, generator=g)
    w = torch.randn(experts, rows, cols, generator=g)
    return w, x, x.transpose(1, 2) @ x


def output_error(w, w_hat, x):
    return float(((w - w_hat) @ x.transpose(1, 2)).square().sum() / (w @ x.transpose(1, 2)).square().sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 96])
def test_gptq_beats_rtn_on_a_correlated_hessian(bits, group):
    w, x, h = planted()
    rtn = quantize(w, QuantConfig(method="rtn", bits=bits, group=group))
    gptq = quantize(w, QuantConfig(method="gptq", bits=bits, group=group, block=32), h)
    assert output_error(w, gptq.dequantize(), x) < 0.5 * output_error(w, rtn.dequantize(), x)
    assert gptq.nbytes == rtn.nbytes


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w, _, _ = planted()
    eye = torch.eye(w.shape[-1]).expand(w.shape[0], -1, -1).clone()
    gptq = quantize(w, QuantConfig(method="gptq", bits=3, group=32, damp=0.0), eye)
    rtn = quantize(w, QuantConfig(method="rtn", bits=3, group=32))
    assert torch.equal(gptq.integer_codes(), rtn.integer_codes())


def test_block_size_does_not_change_the_result():
    w, _, h = planted(experts=2)
    a = quantize(w, QuantConfig(method="gptq", bits=3, group=16, block=16), h)
    b = quantize(w, QuantConfig(method="gptq", bits=3, group=16, block=96), h)
    assert torch.allclose(a.dequantize(), b.dequantize(), atol=1e-4)


def test_dead_inputs_get_zero_weight():
    w, x, h = planted(experts=1)
    h[:, 5, :] = 0
    h[:, :, 5] = 0
    qt = quantize(w, QuantConfig(method="gptq", bits=4, group=32), h)
    assert bool((qt.dequantize()[..., 5].abs() < 1e-6).all())
