"""bf16 fast path (TrainConfig.precision): which products it rounds, and bounds on how far it moves a fit."""
from __future__ import annotations

import torch

from globe.fit.solvers.adapters import refit_adapters
from globe.fit.solvers.am import AMOptions, AMState, am_pass
from globe.fit.solvers.problem import SolverProblem
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family
from globe.fit.solvers.linalg import LARGE_EXPERT, low_precision, matmul
from globe.fit.solvers.normalize import Normalizer
from globe.fit.solvers.varpro import LBFGS_HISTORY_BYTES, lbfgs_history
from globe.fit.solvers.sparse_coding import weighted_support_gram
from globe.fit.warm_starts.base import warm_start
from globe.fit.warm_starts.targets import aligned_targets
from tests.helpers.planted import make_planted

CPU = torch.device("cpu")


def _noisy(seed: int = 0, n: int = 48):
    planted = make_planted(n=n, p=32, d=48, m=8, r=8, k=2, seed=seed)
    noise = 0.1 * torch.randn(planted.weights.shape, generator=torch.Generator().manual_seed(seed))
    return planted.weights + noise, planted.ids


def test_auto_uses_bf16_only_for_large_bf16_families():
    big = int(LARGE_EXPERT ** 0.5) + 1
    assert low_precision("fp32", torch.bfloat16, big, big, CPU) is None
    assert low_precision("bf16", torch.float32, 4, 4, CPU) == torch.bfloat16
    assert low_precision("auto", torch.bfloat16, 8, 8, CPU) is None              # small experts
    assert low_precision("auto", torch.float32, big, big, CPU) is None           # fp32 checkpoint
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    assert low_precision("auto", torch.bfloat16, big, big, CPU) == expected


def test_matmul_rounds_operands_and_keeps_the_result_dtype():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 20, 30, generator=gen), torch.randn(3, 30, 10, generator=gen)
    assert torch.equal(matmul(a, b), a @ b)
    low = matmul(a, b, torch.bfloat16)
    assert low.dtype == torch.float32 and not torch.equal(low, a @ b)
    assert float((low - a @ b).norm() / (a @ b).norm()) < 1e-2


def test_bf16_adapter_refit_is_second_order_in_the_error():
    gen = torch.Generator().manual_seed(1)
    weights, mixed = torch.randn(6, 40, 64, generator=gen), torch.randn(6, 12, 64, generator=gen)
    exact, fast = refit_adapters(weights, mixed, 1e-8), refit_adapters(weights, mixed, 1e-8, torch.bfloat16)
    true_fast = (weights - fast.adapters @ mixed).square().sum((1, 2))
    assert bool((true_fast >= exact.sq_err * (1 - 1e-5)).all())                # exact A is the minimiser
    assert float(((true_fast - exact.sq_err) / exact.sq_err).max()) < 1e-4     # bf16 A costs < 0.01 %
    assert float(((fast.sq_err - exact.sq_err) / exact.sq_err).abs().max()) < 1e-2


def test_bf16_support_gram_stays_close():
    gen = torch.Generator().manual_seed(2)
    bank, adapters = torch.randn(10, 6, 32, generator=gen), torch.randn(5, 20, 6, generator=gen)
    grams = adapters.transpose(1, 2) @ adapters
    idx = torch.stack([torch.randperm(10, generator=gen)[:4] for _ in range(5)])
    exact = weighted_support_gram(grams, bank, idx)
    fast = weighted_support_gram(grams, bank, idx, low_bank=bank.bfloat16())
    assert fast.dtype == torch.float32
    assert float((fast - exact).norm() / exact.norm()) < 5e-3


def test_bf16_am_pass_tracks_the_fp32_pass():
    weights, _ = _noisy(3)
    norm = Normalizer.fit(weights)
    errs = {}
    for precision in ("fp32", "bf16"):
        cfg = FitConfig(bank=BankConfig(m=8, r=8, init="svd"), sparsity=SparsityConfig(target_support=2),
                        train=TrainConfig(precision=precision, chunk_size=16))
        bank, codes, temp = warm_start(aligned_targets(weights, norm, 8, 16), 8, cfg, torch.Generator().manual_seed(0))
        state = AMState(bank=bank, codes=codes, temperature=temp)
        errs[precision] = [am_pass(SolverProblem(weights, norm), state, AMOptions.from_config(cfg)) for _ in range(4)]
    for a, b in zip(errs["fp32"], errs["bf16"]):
        assert abs(a["rel_err"] - b["rel_err"]) <= 0.02 * a["rel_err"]
        assert abs(a["median_support"] - b["median_support"]) <= 1          # the support metric is kept


def test_bf16_fit_is_as_good_as_fp32():
    weights, ids = _noisy(4)
    fams = {}
    for precision in ("fp32", "bf16"):
        cfg = FitConfig(bank=BankConfig(m=8, r=8), sparsity=SparsityConfig(target_support=2),
                        train=TrainConfig(am_iters=8, varpro_steps=20, precision=precision))
        fams[precision] = fit_family(weights, ids, cfg)
    a, b = fams["fp32"].metrics["rel_err"], fams["bf16"].metrics["rel_err"]
    assert b <= a * 1.02 + 1e-4
    recon = fams["bf16"].reconstruct()                   # the reported error is the true one (fp32 finalize)
    true = float((recon - weights).norm() / weights.norm())
    assert abs(true - b) < 1e-4


def test_lbfgs_history_shrinks_for_large_banks():
    assert lbfgs_history(1000) == 20
    assert lbfgs_history(LBFGS_HISTORY_BYTES // 8 // 5) == 5
    assert lbfgs_history(10**12) == 3
