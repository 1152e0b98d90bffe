"""`globe compress` runs the whole-expert phase by default wherever it applies (a calibrated fit of gate and up
without quantized residuals); elsewhere its default stays off with one INFO line, an explicit --expert-steps is
refused, and --expert-steps 0 turns it off."""
from __future__ import annotations

import json
import logging

import pytest

import globe.cli.main as cli
from globe.errors import ConfigError
from globe.fit.config import FitConfig
from globe.fit.expert_config import COMPRESS_QUANT_STEPS, COMPRESS_STEPS
from globe.run.compress import expert_default_off

SHORT = ["--m", "6", "--r", "8", "--target-support", "3", "--am-iters", "1", "--varpro-steps", "1", "--init", "svd",
         "--calibration-tokens", "256", "--activation-steps", "2", "--device", "cpu"]


def _doc(out) -> dict:
    return json.loads((out / "globe_config.json").read_text())


def test_the_default_compress_runs_the_phase_and_says_so(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    assert cli.main(["compress", str(tiny_checkpoint("qwen2_moe")), "-o", str(out), *SHORT, "--bits", "4",
                     "--quant-group", "16"]) == 0
    doc = _doc(out)
    assert FitConfig.from_dict(doc["config"]).expert.steps == COMPRESS_STEPS
    assert FitConfig.from_dict(doc["config"]).expert.quant_steps == COMPRESS_QUANT_STEPS > 0   # after quantization
    for family in ("gate", "up"):
        assert doc["metrics"][family]["expert"]["steps"] == COMPRESS_STEPS
        assert doc["metrics"][family]["quant_expert"]["steps"] == COMPRESS_QUANT_STEPS
    card = (out / "README.md").read_text()
    assert f"Whole-expert phase: gate and up refined together for {COMPRESS_STEPS} Adam steps" in card


def test_expert_steps_zero_turns_it_off(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    assert cli.main(["compress", str(tiny_checkpoint("qwen2_moe")), "-o", str(out), *SHORT, "--no-quant",
                     "--expert-steps", "0"]) == 0
    doc = _doc(out)
    assert FitConfig.from_dict(doc["config"]).expert.steps == 0
    assert all("expert" not in doc["metrics"][f] for f in ("gate", "up"))
    assert "Whole-expert phase: off" in (out / "README.md").read_text()


@pytest.mark.parametrize("options, why", [
    (["--no-calibration", "--no-quant"], "--no-calibration"),
    (["--bits", "4", "--quant-group", "16", "--residual-bits", "4"], "--residual-bits"),
])
def test_where_it_cannot_apply_the_default_stays_off_with_one_info_line(tmp_path, tiny_checkpoint, caplog,
                                                                         options, why):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="globe"):
        assert cli.main(["compress", str(tiny_checkpoint("qwen2_moe")), "-o", str(out), *SHORT, *options]) == 0
    lines = [r.getMessage() for r in caplog.records if "whole-expert phase off" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0]
    doc = _doc(out)
    assert FitConfig.from_dict(doc["config"]).expert.steps == 0
    assert all("expert" not in doc["metrics"][f] for f in ("gate", "up"))


@pytest.mark.parametrize("options, match", [
    (["--no-calibration", "--no-quant"], "--expert-steps needs this run's calibration"),
    (["--bits", "4", "--quant-group", "16", "--residual-bits", "4"], "--expert-steps with --residual-bits"),
])
def test_an_explicit_request_there_is_refused_in_one_line(tmp_path, tiny_checkpoint, capsys, options, match):
    out = tmp_path / "out"
    code = cli.main(["compress", str(tiny_checkpoint("qwen2_moe")), "-o", str(out), *SHORT, *options,
                     "--expert-steps", "5"])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any(match in line for line in err)
    assert not (out / "globe_config.json").exists()


def test_the_other_cases_it_cannot_apply_to():
    cfg = FitConfig()
    assert expert_default_off(cfg, calibrate=True) is None
    cfg.activation.stats = "stats.safetensors"
    assert "statistics file" in expert_default_off(cfg, calibrate=True)
    cfg = FitConfig()
    cfg.bank.families = ("gate",)
    assert "gate and up" in expert_default_off(cfg, calibrate=True)
    cfg = FitConfig()
    cfg.quant.bits, cfg.quant.residual_bits = 4, 4
    assert "--residual-bits" in expert_default_off(cfg, calibrate=True)
    cfg.expert.steps = 5
    with pytest.raises(ConfigError, match="--residual-bits"):
        cfg.validate()


def test_globe_fit_keeps_its_default_off():
    assert FitConfig().expert.steps == 0 and "expert" not in FitConfig().to_dict()


@pytest.mark.parametrize("options, steps", [
    ([], COMPRESS_QUANT_STEPS),                                   # quantized factors after the expert phase
    (["--no-quant"], 0),                                          # nothing quantized to train
    (["--expert-steps", "0"], 0),                                 # it runs after the expert phase only
    (["--quant-steps", "7"], 7),
])
def test_the_quantized_phase_defaults_on_only_where_it_runs(tiny_checkpoint, options, steps):
    from globe.cli.compress import _config
    args = cli.build_parser().parse_args(["compress", str(tiny_checkpoint("qwen2_moe")), "-o", "unused", *SHORT,
                                          *options])
    cfg, _ = _config(args)
    assert cfg.expert.quant_steps == steps


@pytest.mark.parametrize("options, match", [
    (["--no-quant"], "the factors are not quantized"),
    (["--expert-steps", "0"], "the whole-expert phase is off"),
])
def test_an_explicit_quantized_phase_where_it_cannot_run_is_refused(tmp_path, tiny_checkpoint, capsys, options,
                                                                    match):
    out = tmp_path / "out"
    code = cli.main(["compress", str(tiny_checkpoint("qwen2_moe")), "-o", str(out), *SHORT, *options,
                     "--quant-steps", "5"])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quant-steps 5" in err[0] and match in err[0]
    assert not out.exists() or not any(out.iterdir())
