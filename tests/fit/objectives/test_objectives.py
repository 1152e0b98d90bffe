"""Objectives: the weight-space hooks are the identity; the activation objective weights every chunk by g_i L_i
and reduces to the weight space when L_i = I."""
from __future__ import annotations

import torch

from globe.fit.objectives.activation import ActivationObjective, Whitener
from globe.fit.solvers.adapters import FinalizeOptions, finalize
from globe.fit.solvers.problem import Factors, SolverProblem
from globe.fit.solvers.normalize import Normalizer
from globe.fit.objectives.weights import WEIGHTS
from tests.helpers.planted import make_planted


def test_weight_space_hooks_are_the_identity():
    x = torch.randn(3, 4, 5)
    assert WEIGHTS.right(x, 0, 3) is x and WEIGHTS.select(x, torch.arange(3)) is x
    spaces = WEIGHTS.spaces(x, 2)
    assert spaces.target is x and spaces.work is x and spaces.factor is None


def test_activation_objective_with_identity_factors_gives_the_weight_space_adapters():
    planted = make_planted(n=12, p=10, d=8, m=4, r=3, seed=3)
    norm = Normalizer.fit(planted.weights)
    eye = Whitener(factors=torch.eye(8)[None], index=torch.zeros(12, dtype=torch.long), gains=torch.ones(12))
    codes = planted.codes + 0.05
    options = FinalizeOptions(phi="identity", chunk_size=5, ridge=1e-6)
    plain = finalize(SolverProblem(planted.weights, norm), Factors(planted.bank, codes), options)
    aware = finalize(SolverProblem(planted.weights, norm, ActivationObjective(eye)), Factors(planted.bank, codes),
                     options)
    assert torch.allclose(plain.adapters, aware.adapters, atol=1e-5)
    assert torch.allclose(plain.sq_err, aware.sq_err, rtol=1e-4)


def test_activation_objective_weights_each_expert_by_its_factor():
    gains = torch.tensor([1.0, 2.0])
    whiten = Whitener(factors=torch.eye(3)[None] * 3, index=torch.zeros(2, dtype=torch.long), gains=gains)
    x = torch.ones(2, 1, 3)
    out = ActivationObjective(whiten).right(x, 0, 2)
    assert torch.equal(out[:, 0, 0], torch.tensor([3.0, 6.0]))
