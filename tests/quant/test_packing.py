"""globe.quant.packing: exact round trips and exact byte counts for every bit width and odd lengths."""
import pytest
import torch

from globe.errors import ShapeError
from globe.quant import pack_bits, packed_bytes, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("count", [1, 3, 7, 8, 9, 24, 1001])
def test_round_trip_is_exact(bits, count):
    g = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 2 ** bits, (count,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8 == packed_bytes(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_three_bits_pack_eight_codes_in_three_bytes():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    packed = pack_bits(codes, 3)
    word = sum(int(c) << (3 * k) for k, c in enumerate(codes))
    assert packed.tolist() == [word & 255, (word >> 8) & 255, (word >> 16) & 255]


def test_extremes_and_multidimensional_input():
    codes = torch.tensor([[15, 0, 15], [0, 15, 0]])
    assert torch.equal(unpack_bits(pack_bits(codes, 4), 4, 6).view(2, 3), codes)
    assert pack_bits(torch.tensor([3, 0, 0, 0]), 2).tolist() == [3]


def test_bad_inputs_raise():
    with pytest.raises(ShapeError, match="outside 0..3"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ShapeError, match="expected uint8"):
        unpack_bits(torch.zeros(5, dtype=torch.uint8), 3, 8)
