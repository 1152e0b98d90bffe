"""benchmarks/make_upcycled.py: its tiny output is a valid Qwen2-MoE checkpoint for globe.io, with the upcycled
structure it claims, and fit_model fits it by streaming, equal to a fit of the eagerly read family."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family, fit_model
from globe.io import open_checkpoint
from tests.helpers.scripts import load_benchmark



def _load():
    return load_benchmark("make_upcycled")


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("upcycled") / "ckpt"
    _load().main(["--out", str(out), "--layers", "3", "--experts", "6", "--hidden", "48", "--intermediate", "16",
                  "--parents", "2", "--rank", "12", "--noise", "0.1", "--seed", "1"])
    return out


def test_checkpoint_is_sharded_qwen2_moe(upcycled: Path):
    index = json.loads((upcycled / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3                      # one shard per layer
    with open_checkpoint(upcycled) as reader:
        inv = reader.inventory()
        assert (inv.model_type, inv.num_experts, inv.p, inv.d, inv.moe_layers) == ("qwen2_moe", 6, 16, 48, [0, 1, 2])
        assert inv.dtype == "bfloat16" and inv.layout == "per_expert"
        gate = reader.read_family("gate").weights.float()                   # [18, 16, 48]
    # experts copied from the same parent are close; from different parents, far apart
    same = (gate[0] - gate[2]).norm() / gate[0].norm()
    other = (gate[0] - gate[1]).norm() / gate[0].norm()
    assert same < 0.3 < other
    # every layer's rows lie mostly in one shared row space: a rank-12 projection keeps most of the energy
    rows = gate.reshape(-1, 48)
    energy = torch.linalg.svdvals(rows).square()
    assert float(energy[:12].sum() / energy.sum()) > 0.7


def test_generation_is_deterministic(tmp_path: Path, upcycled: Path):
    again = tmp_path / "again"
    _load().main(["--out", str(again), "--layers", "3", "--experts", "6", "--hidden", "48", "--intermediate", "16",
                  "--parents", "2", "--rank", "12", "--noise", "0.1", "--seed", "1"])
    for shard in upcycled.glob("*.safetensors"):
        assert (again / shard.name).read_bytes() == shard.read_bytes()


def test_streaming_fit_equals_the_in_memory_fit(upcycled: Path):
    cfg = FitConfig(bank=BankConfig(m=6, r=6, families=("gate",)), sparsity=SparsityConfig(target_support=2),
                    train=TrainConfig(am_iters=4, varpro_steps=5))
    streamed = fit_model(upcycled, cfg).families["gate"]                    # lazy reader
    stack = open_checkpoint(upcycled).read_family("gate")                   # whole family in RAM
    eager = fit_family(stack.weights, stack.ids, cfg, "gate", torch.Generator().manual_seed(cfg.train.seed))
    assert torch.equal(streamed.bank, eager.bank) and torch.equal(streamed.codes, eager.codes)
    assert torch.equal(streamed.adapters, eager.adapters)
    assert 0 < streamed.metrics["rel_err"] < 1
