"""Expert-sharded fit on 2 local gloo processes versus 1 process.

Both ranks run once per module (spawn costs a few seconds); rank 0 writes what it returns and the tests compare.

Tolerance: the 2-process fit sums over experts in another order (per-rank partial sums, then all-reduce), so
every reduction differs at fp32 rounding (~1e-7 relative). Through ~5 AM iterations (Cholesky solves, 12 CG
steps) and ~10 L-BFGS evaluations this grows with the conditioning of those systems: observed relative
Frobenius differences are <= 1e-5 for banks and codes and <= 4e-5 for adapters (A_i = W_i M_i^T (M_i M_i^T)^-1
amplifies the bank's difference by the conditioning of M_i M_i^T). Tolerances 1e-4 (bank, codes) and 5e-4
(adapters) leave a ~10x margin, while a missing or double-counted reduction (an O(1) change of a normal
equation) is caught by orders of magnitude. Supports must match exactly: the problems have no near-ties.
Seed 6 is such a problem. Near-ties are common at this size: over seeds 3-7 the 2-process bank equals the
1-process one to <= 2e-5 for seeds 4 and 6, while for 3, 5 and 7 a rotation inside a near-degenerate eigenspace of
the family covariance (sums in another order) changes the hybrid warm start and the fits part ways (equal quality).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from globe.errors import ConfigError
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.parallel.comm import LOCAL, Comm, run_local, shard_bounds
from globe.fit.engine import fit_family, fit_model
from tests.helpers.fits import on_device
from tests.helpers.planted import make_planted

RTOL = {"bank": 1e-4, "codes": 1e-4, "adapters": 5e-4}


def planted_problem(n: int = 48, seed: int = 6):
    planted = make_planted(n=n, seed=seed)
    noise = 0.05 * torch.randn(planted.weights.shape, generator=torch.Generator().manual_seed(seed))
    return planted.weights + noise, planted.ids


def planted_config(train: dict, device) -> FitConfig:
    """Shape from the budget solver (exercises the gathered spectra), hybrid warm start, few iterations."""
    return FitConfig(bank=BankConfig(budget=0.6, init="hybrid"), sparsity=SparsityConfig(target_support=2),
                     train=TrainConfig(**{"am_iters": 5, "varpro_steps": 10, **train, "device": str(device)}))


MODEL_CFG = FitConfig(bank=BankConfig(m=4, r=4), sparsity=SparsityConfig(target_support=2),
                      train=TrainConfig(am_iters=4, varpro_steps=8))
CASES = {"weighted": (48, {"mod": "weighted"}), "normal": (48, {"mod": "normal"}),
         "adam": (48, {"refine_steps": 12, "refine_batch": 16, "refine_lr": 1e-4, "varpro_steps": 4}),  # kept
         "uneven": (49, {"chunk_size": 8})}


def model_config(device) -> FitConfig:
    return on_device(FitConfig.from_dict(MODEL_CFG.to_dict()), device)


def _save_family(fam, path) -> None:
    save_file({"bank": fam.bank, "codes": fam.codes, "adapters": fam.adapters, "scales": fam.scales,
               "ids": fam.ids}, str(path) + ".safetensors")
    path.with_suffix(".json").write_text(json.dumps({**{k: fam.metrics[k] for k in ("rel_err", "median_support")},
                                                     "refine_steps": len(fam.history.get("refine", []))}))


def _worker(comm: Comm, out_dir, model_dir, device: str) -> None:
    sizes = torch.arange(comm.rank * 5, comm.rank * 5 + 5 + comm.rank) % 7             # uneven shards of ints
    rows = torch.arange(22.0).view(11, 2)[slice(*shard_bounds(11, comm.world, comm.rank))]
    gathered = comm.gather_rows(rows, 11)
    stats = comm.support_stats(sizes, 6)
    if comm.is_main:
        save_file({"gather": gathered, "all_gather": comm.all_gather_rows(rows, 11),
                   "stats": torch.tensor(stats, dtype=torch.float64)}, str(out_dir / "comm.safetensors"))
    else:
        comm.all_gather_rows(rows, 11)
    weights, ids = planted_problem(48)
    lo, hi = comm.shard(48)
    with pytest.raises(ConfigError, match="fp16"):                                 # raised on every rank alike
        fit_family(weights[lo:hi], ids[lo:hi], planted_config({"refine_steps": 2, "amp": "fp16"}, device), comm=comm)
    for name, (n, train) in CASES.items():
        weights, ids = planted_problem(n)
        lo, hi = comm.shard(n)
        fam = fit_family(weights[lo:hi], ids[lo:hi], planted_config(train, device), comm=comm)
        assert (fam is None) != comm.is_main
        if fam is not None:
            _save_family(fam, out_dir / name)
    result = fit_model(model_dir, model_config(device), comm=comm)
    if result is not None:
        for family, fam in result.families.items():
            _save_family(fam, out_dir / f"model_{family}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_checkpoint, device):
    out = tmp_path_factory.mktemp("dist")
    model_dir = tiny_checkpoint("qwen2_moe", dtype=torch.bfloat16)
    run_local(_worker, 2, out, model_dir, str(device))
    return out, model_dir


def _load(path):
    return load_file(str(path) + ".safetensors"), json.loads(path.with_suffix(".json").read_text())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _assert_same_fit(two: dict, one) -> None:
    assert torch.equal(two["ids"], one.ids) and torch.equal(two["scales"], one.scales)
    assert torch.equal(two["codes"] != 0, one.codes != 0)                       # same supports
    for key in ("bank", "codes", "adapters"):
        assert two[key].shape == getattr(one, key).shape
        assert _rel(two[key], getattr(one, key)) < RTOL[key], key


def test_collectives_gather_in_rank_order_and_reduce_support_statistics(two_ranks):
    out, _ = two_ranks
    got = load_file(str(out / "comm.safetensors"))
    rows = torch.arange(22.0).view(11, 2)
    assert torch.equal(got["gather"], rows) and torch.equal(got["all_gather"], rows)
    sizes = torch.cat([torch.arange(0, 5), torch.arange(5, 11)]) % 7
    support = sizes.float()
    assert got["stats"].tolist() == pytest.approx([float(support.median()), float(support.mean()), int(sizes.max())])


@pytest.mark.parametrize("name", ["weighted", "normal", "adam"])
def test_two_processes_fit_the_same_bank_as_one(two_ranks, name, device):
    out, _ = two_ranks
    n, train = CASES[name]
    weights, ids = planted_problem(n)
    one = fit_family(weights, ids, planted_config(train, device))
    two, metrics = _load(out / name)
    _assert_same_fit(two, one)
    assert metrics["rel_err"] == pytest.approx(one.metrics["rel_err"], rel=RTOL["bank"])
    assert metrics["refine_steps"] == len(one.history.get("refine", [])) == train.get("refine_steps", 0)


def test_uneven_shards_and_chunks_give_a_consistent_gathered_fit(two_ranks, device):
    """49 experts in chunks of 8: rank 0 has 3 chunks, rank 1 has 4 (an idle temperature step on rank 0).
    The per-chunk temperature trajectory differs from one process, so compare quality, not bits."""
    out, _ = two_ranks
    n, train = CASES["uneven"]
    weights, ids = planted_problem(n)
    two, metrics = _load(out / "uneven")
    assert torch.equal(two["ids"], ids)
    recon = two["adapters"] @ (two["codes"] @ two["bank"].flatten(1)).view(n, *two["bank"].shape[1:])
    assert _rel(recon, weights) == pytest.approx(metrics["rel_err"], rel=1e-3)
    one = fit_family(weights, ids, planted_config(train, device))
    assert metrics["rel_err"] < 1.2 * one.metrics["rel_err"] and abs(metrics["median_support"] - 2) <= 1


@pytest.mark.parametrize("family", ["gate", "up"])
def test_fit_model_on_two_processes_matches_one(two_ranks, family, device):
    out, model_dir = two_ranks
    one = fit_model(model_dir, model_config(device)).families[family]
    two, metrics = _load(out / f"model_{family}")
    _assert_same_fit(two, one)


def test_local_comm_is_a_no_op():
    x = torch.arange(6.0).view(3, 2)
    assert LOCAL.all_reduce(x) is x and LOCAL.gather_rows(x, 3) is x and LOCAL.shard(3) == (0, 3)
    assert LOCAL.support_stats(torch.tensor([1, 3, 2, 2]), 4) == (2.0, 2.0, 3)
