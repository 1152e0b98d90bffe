"""globe.fit.engine.duplicates: copies of one expert found bit for bit (dead experts left alone) and tied to it."""
from __future__ import annotations

import torch

from globe.fit.engine.duplicates import duplicate_experts, tie_duplicates


def test_copies_are_found_bit_for_bit_and_get_the_first_ones_rows():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 5, generator=gen)
    w[3] = w[1]                                   # a copy
    w[5] = w[1]                                   # another copy of the same
    w[2] = 0
    w[4] = 0                                      # two dead experts: equal, but not "copies"
    near = w[1].clone()
    near[0, 0] = torch.nextafter(near[0, 0], torch.tensor(10.0))
    w = torch.cat([w, near[None]])                # one ulp away: not a copy
    copies = duplicate_experts(w, names=[f"e{i}" for i in range(7)], chunk=3)
    assert copies == {3: 1, 5: 1}
    adapters, codes = torch.randn(7, 4, 2, generator=gen), torch.rand(7, 3, generator=gen)
    tie_duplicates(copies, adapters, codes)
    assert torch.equal(adapters[3], adapters[1]) and torch.equal(codes[5], codes[1])
    assert not torch.equal(adapters[6], adapters[1])


def test_tie_quantized_copies_codes_scales_and_zeros_of_the_first_row():
    from globe.fit.engine.duplicates import tie_quantized
    from globe.quant import QuantConfig, quantize
    gen = torch.Generator().manual_seed(0)
    packed = quantize(torch.randn(4, 6, 10, generator=gen), QuantConfig(method="rtn", bits=3, group=4))
    tied = tie_quantized({3: 1}, packed)
    before, after = packed.dequantize(), tied.dequantize()
    assert torch.equal(after[3], before[1]) and torch.equal(after[:3], before[:3])
    assert not torch.equal(before[3], before[1]) and tied.nbytes == packed.nbytes
    assert tie_quantized({}, packed) is packed
