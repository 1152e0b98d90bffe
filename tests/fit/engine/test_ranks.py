"""The rank stage (globe.fit.engine.ranks): a planted family whose layers differ in how much rank they need gets
more rank where it matters, within the uniform fit's parameters; the nesting rotation leaves W_hat unchanged."""
from __future__ import annotations

import torch

from globe.core.mixing import compose
from globe.core.shape import BankShape
from globe.fit.config import BankConfig, FitConfig, RankConfig, SparsityConfig, TrainConfig
from globe.fit.engine.family import fit_family
from globe.fit.engine.ranks import greedy_allocation, nesting_rotation

E, P, D, M, R = 12, 32, 16, 4, 6          # bank cheap against adapters (m d << N p)


def _planted() -> tuple[torch.Tensor, torch.Tensor]:
    """Experts on one shared row basis V: layer 0 spreads over 9 of its directions (every rank up to 9 helps),
    layer 1 lives in the first 2 (rank beyond 2 is wasted)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T                    # rows orthonormal
    spread = torch.linspace(2.0, 1.0, 9)
    full = torch.randn(E, P, 9, generator=g) * spread @ basis[:9]
    low = torch.randn(E, P, 2, generator=g) * 2 @ basis[:2]
    ids = torch.tensor([[layer, e] for layer in (0, 1) for e in range(E)])
    return torch.cat([full, low]), ids


def _cfg(allocation: str) -> FitConfig:
    return FitConfig(bank=BankConfig(m=M, r=R), sparsity=SparsityConfig(target_support=2),
                     train=TrainConfig(am_iters=5, varpro_steps=0), ranks=RankConfig(allocation, 1.5, 1)).validate()


def test_more_rank_where_it_matters_within_the_uniform_budget():
    weights, ids = _planted()
    uniform = fit_family(weights, ids, _cfg("uniform"), generator=torch.Generator().manual_seed(0))
    allocated = fit_family(weights, ids, _cfg("sensitivity"), generator=torch.Generator().manual_seed(0))
    assert uniform.ranks is None and allocated.ranks is not None
    r0, r1 = allocated.ranks
    assert r0 > R > r1 >= 2                                                       # rank moved to layer 0
    assert allocated.bank.shape[1] == 9                                  # r_max = 1.5 R
    nnz = int((allocated.codes != 0).sum())
    spent = allocated.param_count()["stored"]
    assert spent == M * 9 * D + E * P * (r0 + r1) + nnz + 2 * E              # the hand count
    assert spent - nnz <= BankShape.uniform(M, R, 2).params((E, E), P, D, 0)      # within the uniform fit's params
    assert bool((allocated.adapters[E:, :, r1:] == 0).all())                      # layer 1 uses only r1 columns
    err = lambda fam: float((fam.reconstruct() - weights).square().sum() / weights.square().sum())   # noqa: E731
    assert err(allocated) < err(uniform)


def test_nesting_rotation_keeps_every_reconstruction_and_orders_energy():
    g = torch.Generator().manual_seed(1)
    bank, codes, adapters = torch.randn(M, R, D, generator=g), torch.rand(8, M, generator=g), torch.randn(8, P, R, generator=g)
    rot = nesting_rotation(adapters, codes, bank, chunk=3)
    assert torch.allclose(rot @ rot.T, torch.eye(R), atol=1e-5)
    rotated_bank = torch.einsum("kr,mrd->mkd", rot, bank)
    before = adapters @ compose(codes, bank)
    after = (adapters @ rot.T) @ compose(codes, rotated_bank)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    energy = [float(((adapters @ rot.T)[:, :, :k] @ compose(codes, rotated_bank)[:, :k]).square().sum())
              for k in range(1, R + 1)]
    random_rot = torch.linalg.qr(torch.randn(R, R, generator=g))[0]
    rb = torch.einsum("kr,mrd->mkd", random_rot, bank)
    assert energy[0] > float(((adapters @ random_rot.T)[:, :, :1] @ compose(codes, rb)[:, :1]).square().sum())


def test_greedy_allocation_spends_where_the_drop_per_parameter_is_largest():
    errors = {0: [10.0, 5.0, 1.0], 1: [2.0, 1.9, 1.8]}
    assert greedy_allocation(errors, [1, 2, 3], [1, 1], limit=4) == [2, 0]
    assert greedy_allocation(errors, [1, 2, 3], [1, 1], limit=6) == [2, 2]
    assert greedy_allocation(errors, [1, 2, 3], [1, 1], limit=2) == [0, 0]


def _alike() -> tuple[torch.Tensor, torch.Tensor]:
    """Two layers of experts alike: each spreads over 9 of the same shared directions (every rank up to 9 helps)."""
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T
    spread = torch.linspace(2.0, 1.0, 9)
    weights = torch.randn(2 * E, P, 9, generator=g) * spread @ basis[:9]
    ids = torch.tensor([[layer, e] for layer in (0, 1) for e in range(E)])
    return weights, ids


def _felt_fit(kl: list[float], sensitivity: bool = True):
    """The sensitivity allocation under the activation objective whose statistics carry a probe with these KLs."""
    from types import SimpleNamespace

    from globe.calibration import ActivationStats
    from globe.fit.config import ActivationConfig
    from globe.fit.objectives.activation import ActivationObjective
    weights, ids = _alike()
    eye = torch.eye(D, dtype=torch.float64)
    counts = torch.full((2, E), 100)
    stats = ActivationStats(layers=[0, 1], hidden=torch.stack([1000 * eye] * 2), tokens=1000, counts=counts,
                            weight_sums=counts.double(), hidden_expert=100 * eye.expand(2, E, D, D).clone(),
                            intermediate_expert=torch.eye(P, dtype=torch.float64).expand(2, E, P, P).clone())
    stats.info["sensitivity"] = {"layers": [0, 1], "kl": {"gate": kl, "up": kl}, "keep": 0.5, "error": 0.2}
    cfg = _cfg("sensitivity")
    cfg.activation = ActivationConfig(steps=0, sensitivity=sensitivity, global_init=False)
    objective = ActivationObjective.for_family(stats, "gate", SimpleNamespace(weights=weights, ids=ids), cfg)
    return fit_family(weights, ids, cfg, generator=torch.Generator().manual_seed(0), objective=objective), weights


def test_the_layer_the_model_feels_gets_more_rank_and_the_budget_is_spent():
    felt, _ = _felt_fit([1e-4, 1e-2])                  # the model feels layer 1 100x more per unit error
    even, _ = _felt_fit([1e-4, 1e-2], sensitivity=False)
    assert felt.ranks[1] > felt.ranks[0]
    even_ranks = even.ranks or (even.bank.shape[1],) * 2          # one rank everywhere: stored as a uniform fit
    assert felt.ranks[1] - felt.ranks[0] > even_ranks[1] - even_ranks[0]
    # the stored bank is cut at the largest rank used; the hand count; within one grid step of the uniform budget
    assert felt.bank.shape[1] == max(felt.ranks) and felt.adapters.shape[2] == max(felt.ranks)
    nnz = int((felt.codes != 0).sum())
    spent = felt.param_count()["stored"]
    assert spent == M * max(felt.ranks) * D + E * P * sum(felt.ranks) + nnz + 2 * E
    uniform = BankShape.uniform(M, R, 2).params((E, E), P, D, 0)
    assert uniform - (M * D + E * P) < spent - nnz - 2 * E <= uniform         # grid step 1: one rank of one layer
