"""globe.quant.tensor / rtn / registry / config: byte counts by hand, error bounds, safetensors parts, errors."""
import math

import pytest
import torch

from globe.errors import ConfigError, ShapeError
from globe.quant import QUANTIZERS, QuantConfig, QuantizedTensor, quantize


def weights(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group", [((5, 7, 33), 16), ((13, 64), 64), ((2, 3, 129), 128), ((1, 5), 32)])
def test_nbytes_equals_a_hand_count(method, bits, shape, group):
    w = weights(*shape)
    h = torch.eye(shape[-1]).expand(*shape[:-2], shape[-1], shape[-1]).clone()
    qt = quantize(w, QuantConfig(method=method, bits=bits, group=group), h)
    rows = math.prod(shape[:-1])
    hand = math.ceil(math.prod(shape) * bits / 8) + rows * math.ceil(shape[-1] / group) * (2 + 2)
    assert qt.nbytes == hand
    assert qt.dequantize().shape == w.shape and qt.integer_codes().max() < 2 ** bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [8, 32, 50])
def test_rtn_error_is_at_most_half_a_step(bits, group):
    w = weights(4, 9, 101, seed=bits) * torch.logspace(-3, 1, 101)             # columns of very different scales
    qt = quantize(w, QuantConfig(method="rtn", bits=bits, group=group))
    step = qt.scales.float().repeat_interleave(group, dim=-1)[..., :101]
    err = (qt.dequantize() - w).abs()
    assert bool((err <= step / 2 * (1 + 1e-3) + 1e-7).all())
    assert float(err.max()) > 0.1 * float(step.max()) / 2                      # the bound is not vacuous


def test_more_bits_less_error_and_eight_bits_is_close():
    w = weights(16, 128)
    errs = [float((quantize(w, QuantConfig(method="rtn", bits=b, group=32)).dequantize() - w).norm()) for b in
            (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] / float(w.norm()) < 0.01


def test_constant_and_zero_groups_are_exact():
    w = torch.cat([torch.zeros(2, 32), torch.full((2, 32), -0.75)], dim=-1)
    qt = quantize(w, QuantConfig(method="rtn", bits=2, group=32))
    assert torch.allclose(qt.dequantize(), w)


def test_hqq_lowers_the_error_of_its_min_max_start():
    w = weights(32, 256) + 6 * (torch.rand(32, 256, generator=torch.Generator().manual_seed(1)) > 0.995)
    hqq = quantize(w, QuantConfig(method="hqq", bits=3, group=64))
    start = quantize(w, QuantConfig(method="hqq", bits=3, group=64, iters=0))
    assert float((hqq.dequantize() - w).abs().mean()) < 0.95 * float((start.dequantize() - w).abs().mean())


def test_tensors_round_trip_and_check():
    qt = quantize(weights(3, 8, 40), QuantConfig(method="rtn", bits=3, group=16))
    back = QuantizedTensor.from_tensors(qt.tensors("bank"), "bank", qt.meta())
    assert torch.equal(back.dequantize(), qt.dequantize())
    parts = qt.tensors("bank")
    parts["bank.scales"] = parts["bank.scales"][..., :2]
    with pytest.raises(ShapeError, match="bank: scales"):
        QuantizedTensor.from_tensors(parts, "bank", qt.meta())


def test_config_round_trip_and_errors():
    cfg = QuantConfig(method="hqq", bits=2, group=32)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["format_version"] == 1
    assert {"rtn", "gptq", "hqq"} <= set(QUANTIZERS)
    with pytest.raises(ConfigError, match="bits=5"):
        QuantConfig(bits=5)
    with pytest.raises(ConfigError, match="unknown key"):
        QuantConfig.from_dict({"bitz": 4})
    with pytest.raises(ConfigError, match="unknown quantization method 'awq'"):
        quantize(weights(2, 4), QuantConfig(method="awq"))
    with pytest.raises(ConfigError, match="needs calibration"):
        quantize(weights(2, 4), QuantConfig(method="gptq"))
    with pytest.raises(ShapeError, match="hessian"):
        quantize(weights(2, 4), QuantConfig(method="gptq"), torch.eye(3))


def test_dequantize_is_contiguous_with_a_short_last_group():
    """A row shorter than a group (adapters of rank 4 in groups of 64) dequantizes to a contiguous tensor: views of
    it (a layer's adapters) must be savable by transformers' save_pretrained."""
    from globe.quant import QuantConfig, quantize
    w = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    out = quantize(w, QuantConfig(method="rtn", bits=4, group=64)).dequantize()
    assert out.shape == w.shape and out.is_contiguous()
