"""Fit configuration: JSON/YAML round trips, validation with clear errors, format versions."""
from __future__ import annotations

import pytest

from globe.errors import ConfigError
from globe.fit.config import (CONFIG_FORMAT_VERSION, ActivationConfig, BankConfig, FitConfig, SparsityConfig,
                              TrainConfig)


def custom() -> FitConfig:
    return FitConfig(bank=BankConfig(m=32, r=16, phi="silu", init="kmeans", families=("gate",)),
                     sparsity=SparsityConfig(method="sparsemax", target_support=5, eta=0.3),
                     train=TrainConfig(am_iters=7, refine_steps=3, amp="bf16", seed=11),
                     activation=ActivationConfig(stats="stats.safetensors", per_expert=False, routing_weights=True))


def test_json_and_yaml_round_trip(tmp_path):
    cfg = custom()
    assert FitConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "c.json").write_text(cfg.to_json())
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert FitConfig.from_file(tmp_path / "c.json") == cfg == FitConfig.from_file(tmp_path / "c.yaml")
    assert cfg.to_dict()["format_version"] == CONFIG_FORMAT_VERSION


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.bank, "m", 0), "bank.m must be > 0"),
    (lambda c: setattr(c.bank, "budget", 1.5), "bank.budget"),
    (lambda c: setattr(c.bank, "phi", "relu"), "bank.phi"),
    (lambda c: setattr(c.sparsity, "target_support", 40), "target_support"),
    (lambda c: setattr(c.train, "amp", "fp8"), "train.amp"),
    (lambda c: setattr(c.activation, "damp", 0.0), "activation.damp"),
    (lambda c: setattr(c.activation, "routing_floor", 0.0), "activation.routing_floor"),
    (lambda c: setattr(c.train, "precision", "fp16"), "train.precision"),
])
def test_out_of_range_values_are_rejected(mutate, message):
    cfg = custom()
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_newer_format_and_unknown_keys_are_rejected(tmp_path):
    data = custom().to_dict()
    with pytest.raises(ConfigError, match="newer"):
        FitConfig.from_dict({**data, "format_version": CONFIG_FORMAT_VERSION + 1})
    with pytest.raises(ConfigError, match="invalid fit config"):
        FitConfig.from_dict({**data, "bank": {"atoms": 3}})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        FitConfig.from_file(tmp_path / "bad.json")


def test_configs_without_an_activation_section_still_load():
    data = FitConfig().to_dict()
    del data["activation"]
    cfg = FitConfig.from_dict(data)
    assert cfg.activation == ActivationConfig() and cfg.activation.stats is None


def test_nonlinear_section_round_trips_validates_and_is_optional():
    from globe.fit.config import NonlinearConfig
    cfg = FitConfig(nonlinear=NonlinearConfig(enabled=True, start="am", groups=3, scope="global", steps=7, lr=0.1))
    assert FitConfig.from_dict(cfg.to_dict()) == cfg
    assert FitConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    data = FitConfig().to_dict()
    del data["nonlinear"]
    assert FitConfig.from_dict(data).nonlinear == NonlinearConfig() and not NonlinearConfig().enabled
    for field, value in [("start", "kmeans"), ("scope", "model"), ("phi", "relu"), ("lr", 0.0), ("groups", -1),
                         ("eval_every", 0)]:
        bad = FitConfig(nonlinear=NonlinearConfig(**{field: value}))
        with pytest.raises(ConfigError, match=f"nonlinear.{field}"):
            bad.validate()


def test_default_target_support_adapts_to_an_explicit_small_m(caplog):
    """README's `python -m globe.fit_banks ... bank.m=8` and `globe fit --m 8` used to fail on the default support."""
    cfg = FitConfig(bank=BankConfig(m=8))
    assert cfg.validate().sparsity.target_support == 4 and "target support set to 4" in caplog.text
    with pytest.raises(ConfigError, match="target_support"):                  # an explicit clash still fails
        FitConfig(bank=BankConfig(m=8), sparsity=SparsityConfig(target_support=9)).validate()
    from globe.hydra_app import compose_run_config
    assert compose_run_config(["model=tiny", "bank.m=8", "train.am_iters=2", "out=runs/hydra"]).fit_config() \
        .sparsity.target_support == 4


def test_a_budget_that_saves_almost_nothing_is_warned_about(caplog):
    FitConfig(bank=BankConfig(budget=0.9999)).validate()
    assert "saves almost nothing" in caplog.text
    caplog.clear()
    FitConfig(bank=BankConfig(budget=0.5)).validate()
    assert "saves almost nothing" not in caplog.text


def test_the_expert_phase_with_residuals_is_refused_in_one_line():
    import dataclasses
    cfg = FitConfig()
    cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, bits=4, residual_bits=2),
                              expert=dataclasses.replace(cfg.expert, steps=10))
    with pytest.raises(ConfigError, match="--expert-steps with --residual-bits"):
        cfg.validate()
    dataclasses.replace(cfg, expert=dataclasses.replace(cfg.expert, steps=0)).validate()
