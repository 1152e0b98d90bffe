"""globe.core.mixing: dense and sparse codes mix to the same atoms; the sparse table keeps only the support."""
from __future__ import annotations

import pytest
import torch

from globe.core.mixing import PHI, SparseCodes, compose, sparse_codes


def _codes_and_bank(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(6, 5, generator=g) * (torch.rand(6, 5, generator=g) < 0.5)   # [N, m], some rows sparse
    codes[2] = 0                                                                     # an expert with no atom
    return codes, torch.randn(5, 3, 4, generator=g)                                  # bank [m, r, d]


@pytest.mark.parametrize("phi", sorted(PHI))
def test_dense_and_sparse_codes_give_the_same_atoms(phi):
    codes, bank = _codes_and_bank()
    dense = compose(codes, bank, phi)
    assert dense.shape == (6, 3, 4)
    expected = PHI[phi](torch.einsum("nm,mrd->nrd", codes, bank))
    torch.testing.assert_close(dense, expected)
    torch.testing.assert_close(compose(sparse_codes(codes), bank, phi), dense, rtol=1e-6, atol=1e-6)


def test_sparse_table_holds_the_support_in_atom_order():
    codes, _ = _codes_and_bank()
    table = sparse_codes(codes)
    assert isinstance(table, SparseCodes)
    k = int((codes != 0).sum(1).max())
    assert table.indices.shape == table.values.shape == (6, k) and table.indices.dtype == torch.int64
    for row in range(6):
        kept = table.values[row] != 0
        assert table.indices[row][kept].tolist() == (codes[row] != 0).nonzero().squeeze(1).tolist()
        assert torch.equal(table.values[row][kept], codes[row][codes[row] != 0])
        assert table.indices[row][~kept].eq(0).all()                                 # padding: atom 0, value 0


def test_no_experts_mix_to_an_empty_tensor():
    _, bank = _codes_and_bank()
    empty = SparseCodes(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert compose(empty, bank).shape == (0, 3, 4)
