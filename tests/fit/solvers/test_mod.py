"""MOD dictionary updates: exact minimisers of their objectives; atom normalisation keeps alpha @ B."""
from __future__ import annotations

import torch

from globe.fit.solvers.mod import ModAccumulator, normalize_atoms, weighted_mod


def mod_objective(codes: torch.Tensor, targets: torch.Tensor, bank: torch.Tensor, ridge_abs: float) -> float:
    """sum_i ||Y_i - alpha_i B||^2 + ridge_abs ||B||^2 (the objective the unweighted MOD minimises)."""
    recon = (codes @ bank.flatten(1)).view_as(targets)
    return float((targets - recon).square().sum() + ridge_abs * bank.square().sum())


def problem(n=40, m=6, r=4, d=10, p=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, m, generator=gen) * (torch.rand(n, m, generator=gen) < 0.5)
    adapters = torch.randn(n, p, r, generator=gen)
    weights = torch.randn(n, p, d, generator=gen)
    return codes, adapters, weights, torch.randn(m, r, d, generator=gen)


def true_objective(weights, adapters, codes, bank):
    mixed = (codes @ bank.flatten(1)).view(codes.shape[0], *bank.shape[1:])
    return float((weights - adapters @ mixed).square().sum())


def test_weighted_mod_never_increases_the_true_objective_and_is_optimal():
    codes, adapters, weights, bank0 = problem()
    grams = adapters.transpose(1, 2) @ adapters
    rhs = torch.einsum("nj,nrd->jrd", codes, adapters.transpose(1, 2) @ weights)
    before = true_objective(weights, adapters, codes, bank0)
    objectives = []
    for iters in (1, 3, 60):
        bank, _, cond = weighted_mod(codes, grams, rhs, bank0, ridge=1e-10, iters=iters)
        assert cond >= 1.0
        objectives.append(true_objective(weights, adapters, codes, bank))
    assert objectives[0] <= before and objectives[1] <= objectives[0] + 1e-6 and objectives[2] <= objectives[1] + 1e-6
    # optimality: random perturbations of the solution never do better
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        worse = true_objective(weights, adapters, codes, bank + 1e-3 * torch.randn(bank.shape, generator=gen))
        assert worse >= objectives[2] - 1e-6


def test_unweighted_mod_accumulated_in_chunks_minimises_its_objective():
    codes, _, _, _ = problem(seed=1)
    targets = torch.randn(40, 4, 10, generator=torch.Generator().manual_seed(2))
    acc = ModAccumulator(6, 4, 10)
    for lo in range(0, 40, 7):                            # chunked accumulation
        acc.add(codes[lo:lo + 7], targets[lo:lo + 7])
    bank, cond = acc.solve(ridge=0.0)
    best = mod_objective(codes, targets, bank, 0.0)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        assert mod_objective(codes, targets, bank + 1e-3 * torch.randn(bank.shape, generator=gen), 0.0) >= best
    assert cond >= 1.0


def test_normalize_atoms_keeps_the_product():
    codes, _, _, bank = problem(seed=4)
    unit, scaled = normalize_atoms(bank, codes)
    assert torch.allclose(unit.flatten(1).norm(dim=1), torch.ones(6))
    assert torch.allclose(scaled @ unit.flatten(1), codes @ bank.flatten(1), atol=1e-5)


def test_residual_in_the_rhs_and_smaller_apply_chunks_give_the_same_bank():
    from globe.fit.solvers.mod import apply_chunk
    codes, adapters, weights, bank0 = problem(seed=3)
    grams = adapters.transpose(1, 2) @ adapters
    rhs = torch.einsum("nj,nrd->jrd", codes, adapters.transpose(1, 2) @ weights)
    ref, iters, _ = weighted_mod(codes, grams, rhs, bank0, ridge=1e-6)
    same, iters2, _ = weighted_mod(codes, grams, rhs.clone(), bank0, ridge=1e-6, overwrite_rhs=True)
    assert torch.equal(ref, same) and iters == iters2                        # bit for bit
    chunked, _, _ = weighted_mod(codes, grams, rhs, bank0, ridge=1e-6, chunk=7)
    assert torch.allclose(chunked, ref, rtol=1e-4, atol=1e-5)
    assert apply_chunk(4, 10) == 256 and apply_chunk(704, 2048) < 64      # large atoms: fewer experts per step
