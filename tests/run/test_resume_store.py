"""globe.run.resume_store with fit_model: a large finished family waits on disk while the next one fits and comes
back bit-identical; a spilled file that vanished mid-run is a clear error."""
from __future__ import annotations

import pytest
import torch

import globe.fit.engine.model as engine
from globe.errors import CheckpointError
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.run.resume_store import ResumeStore

CFG = FitConfig(bank=BankConfig(m=4, r=4), sparsity=SparsityConfig(target_support=2),
                train=TrainConfig(am_iters=2, varpro_steps=3))


def _spying(store: ResumeStore, calls: list[str]) -> ResumeStore:
    real = store.reload

    def reload(family):
        calls.append(family)
        return real(family)

    store.reload = reload
    return store


def test_large_finished_families_wait_on_disk_and_come_back_bit_identical(tiny_checkpoint, tmp_path, monkeypatch):
    path = tiny_checkpoint("qwen2_moe")
    reference = engine.fit_model(path, CFG)                               # no store: nothing spilled
    monkeypatch.setattr(engine, "SPILL_FAMILY_BYTES", 0)                  # every family counts as large
    calls: list[str] = []
    result = engine.fit_model(path, CFG, store=_spying(ResumeStore(tmp_path / "out", CFG, str(path)), calls))
    assert calls == ["gate"]                                              # the last family is never spilled
    for family in ("gate", "up"):
        a, b = reference.families[family], result.families[family]
        for name in ("bank", "codes", "adapters", "scales", "ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (family, name)
        for key in ("rel_err", "median_support", "params", "energy_captured"):   # timings differ, JSON keys are str
            assert a.metrics[key] == b.metrics[key], (family, key)


def test_small_families_stay_in_memory(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2_moe")
    calls: list[str] = []
    engine.fit_model(path, CFG, store=_spying(ResumeStore(tmp_path / "out", CFG, str(path)), calls))
    assert calls == []


def test_a_spilled_family_that_vanished_is_a_clear_error(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2_moe")
    store = ResumeStore(tmp_path / "out", CFG, str(path))
    with pytest.raises(CheckpointError, match="gate.safetensors went missing.*--resume"):
        store.reload("gate")
