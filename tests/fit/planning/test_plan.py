"""globe.fit.planning.plan: the header-only planner on a sparse-file Qwen1.5-MoE-shaped checkpoint (no tensor data exists
or is read) and its parameter accounting against a real fit's."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_model
from globe.fit.planning.plan import plan_fit
from globe.fit.planning.timing import KernelRates
from tests.helpers.scripts import load_benchmark

KEY = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def sparse_checkpoint(out: Path, layers: int = 24, experts: int = 60, p: int = 1408, d: int = 2048) -> Path:
    """config.json + one model.safetensors whose header lists every routed expert (bf16) and router, and whose
    data section is a hole (a sparse file: ~25 GB long, nothing written)."""
    make = load_benchmark("make_upcycled")
    args = make.parse_args(["--out", str(out), "--layers", str(layers), "--experts", str(experts),
                            "--hidden", str(d), "--intermediate", str(p)])
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(make.qwen2_moe_config(args)))
    header, offset = {}, 0
    for layer in range(layers):
        shapes = {f"model.layers.{layer}.mlp.gate.weight": [experts, d]}
        for e in range(experts):
            shapes |= {KEY.format(layer=layer, expert=e, proj=proj): shape
                       for proj, shape in (("gate_proj", [p, d]), ("up_proj", [p, d]), ("down_proj", [d, p]))}
        for name, shape in shapes.items():
            size = 2 * shape[0] * shape[1]
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return out


@pytest.fixture
def no_data_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the planner read tensor data")
    monkeypatch.setattr("globe.io.shards.ShardSet._read", refuse)
    monkeypatch.setattr("globe.io.lazy.LazyExperts._read", refuse)


RATES = KernelRates(device="cpu", wd=5e10, wd32=2.5e10, bank=1e10, rr=5e10, chol=0.2, svd=3.0, align=0.3,
                    stream=5e9, stream64=3e9)


def test_plan_of_a_sparse_qwen_checkpoint_reads_headers_only(tmp_path, no_data_reads):
    model = sparse_checkpoint(tmp_path / "qwen15")
    assert (model / "model.safetensors").stat().st_blocks * 512 < 2**20          # nothing but the header on disk
    cfg = FitConfig(bank=BankConfig(m=256, r=704, families=("gate", "up")))
    plan = plan_fit(model, cfg, out=tmp_path / "out", rates=RATES)
    gate, up = plan.families
    assert (gate.n, gate.p, gate.d, gate.m, gate.r) == (1440, 1408, 2048, 256, 704)
    assert gate.params["bank"] == 256 * 704 * 2048 and gate.params["adapters"] == 1440 * 1408 * 704
    assert gate.params["dense"] == 1440 * 1408 * 2048
    assert set(gate.memory) >= {"normalize", "warm_start", "am", "varpro", "finalize", "peak"}
    assert gate.seconds["total"] > 0 and gate.seconds["am"] > gate.seconds["normalize"]
    # the finished gate family (6.7 GiB of fp32 results) waits on disk while up fits, and both are read back at
    # the end: the run's peak is one family's fit, not a family's fit plus the other's results
    assert up.held_bytes == 0 and plan.peak_bytes == max(gate.memory["peak"], up.memory["peak"])
    assert plan.peak_bytes < 16 * 2**30
    assert json.loads(json.dumps(plan.to_dict()))["families"][0]["m"] == 256
    assert "gate: N=1440 p=1408 d=2048 -> m=256 r=704" in plan.table()


def test_plan_without_a_shape_plans_the_shape_the_fit_chooses(tmp_path):
    model = tmp_path / "small"
    load_benchmark("make_upcycled").main(["--out", str(model), "--layers", "2", "--experts", "8", "--hidden", "128",
                                          "--intermediate", "64", "--rank", "8"])
    cfg = FitConfig(bank=BankConfig(budget=0.3, families=("gate",)), train=TrainConfig(am_iters=1, varpro_steps=1))
    fam = plan_fit(model, cfg, calibrate=False).families[0]
    assert fam.memory["shape"] > 0 and "read the experts" in fam.shape_from
    assert fam.params["stored"] <= 0.3 * fam.params["dense"]
    fitted = fit_model(model, cfg).families["gate"]
    assert (fam.m, fam.r) == (fitted.shape["m"], fitted.shape["r"])


def test_plan_warns_when_the_peak_exceeds_free_memory(tmp_path, no_data_reads, monkeypatch):
    model = sparse_checkpoint(tmp_path / "warn", layers=2, experts=8, p=64, d=128)
    monkeypatch.setattr("globe.fit.planning.plan.free_memory", lambda device: 1024)
    plan = plan_fit(model, FitConfig(bank=BankConfig(m=16, r=16, families=("gate",))), calibrate=False)
    assert any("exceeds the" in w and "free" in w for w in plan.warnings)


def test_planned_params_equal_the_fit_accounting(tmp_path):
    model = tmp_path / "tiny"
    load_benchmark("make_upcycled").main(["--out", str(model), "--layers", "2", "--experts", "8", "--hidden", "64",
                                          "--intermediate", "32", "--rank", "8"])
    cfg = FitConfig(bank=BankConfig(m=6, r=8, families=("gate",)), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=2, varpro_steps=2))
    planned = plan_fit(model, cfg, calibrate=False).families[0].params
    real = fit_model(model, cfg).families["gate"].param_count()
    assert {k: planned[k] for k in ("bank", "adapters", "scales", "dense")} == \
        {k: real[k] for k in ("bank", "adapters", "scales", "dense")}
    assert planned["stored"] - planned["codes_nnz"] == real["stored"] - real["codes_nnz"]
