"""`globe compress` options: the fit options are `globe fit`'s own (same flags, help and effect), and --metrics
sends the fit's metrics outside the checkpoint directory."""
from __future__ import annotations

import json

import pytest

import globe.cli.main as cli
from globe.cli.fit import SHARED_FIT_OPTIONS


def _actions(command: str) -> dict:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices[command]._actions}


def test_compress_declares_the_fit_options_as_fit_does():
    fit, compress = _actions("fit"), _actions("compress")
    for name in SHARED_FIT_OPTIONS:
        assert compress[name].option_strings == fit[name].option_strings, name
        assert (compress[name].help, compress[name].default, compress[name].type) == \
               (fit[name].help, fit[name].default, fit[name].type), name


def test_compress_fit_options_reach_the_fit_and_metrics_go_where_asked(tmp_path):
    out, metrics = tmp_path / "small", tmp_path / "logs" / "fit.jsonl"
    assert cli.main(["compress", "-o", str(out), "--families", "gate", "--m", "6", "--r", "16",
                     "--target-support", "3", "--am-iters", "1", "--varpro-steps", "1", "--init", "svd",
                     "--calibration-tokens", "256", "--activation-steps", "1", "--distill-steps", "2",
                     "--metrics", str(metrics)]) == 0
    doc = json.loads((out / "globe_config.json").read_text())
    assert doc["config"]["bank"]["families"] == ["gate"] and doc["config"]["bank"]["init"] == "svd"
    assert (doc["config"]["bank"]["m"], doc["config"]["bank"]["r"]) == (6, 16)
    assert not (out / "metrics.jsonl").exists()
    events = {json.loads(line)["event"] for line in metrics.read_text().splitlines()}
    assert {"am_iter", "family_done"} <= events


def _compress_config(*argv: str):
    from globe.cli.compress import _config
    return _config(cli.build_parser().parse_args(["compress", "-o", "OUT", *argv]))


def test_compress_weights_layers_by_sensitivity_unless_off():
    from globe.run.compress import _calibration
    from globe.run.compress import CompressRun
    cfg, _ = _compress_config("--total-cut", "0.3")                          # a parameter target: on
    assert cfg.activation.sensitivity is True
    assert _calibration(CompressRun("MODEL", "OUT", config=cfg)).sensitivity is True       # the probe runs
    assert _compress_config("--budget", "0.4")[0].activation.sensitivity is True
    cfg, _ = _compress_config("--total-cut", "0.3", "--sensitivity", "off")
    assert cfg.activation.sensitivity is False
    assert _calibration(CompressRun("MODEL", "OUT", config=cfg)).sensitivity is False
    assert _compress_config()[0].activation.sensitivity is False             # the no-option main job: off
    assert _compress_config("--sensitivity", "on")[0].activation.sensitivity is True


def test_compress_defaults_to_4_bit_factors_and_fit_stays_unquantized():
    from globe.cli.compress import QUANT_DEFAULTS
    from globe.cli.fit import build_config
    cfg, plan = _compress_config()
    assert (cfg.quant.bits, cfg.quant.group, cfg.quant.method, cfg.bank.budget) == (4, 64, "gptq", 0.6) and plan is None
    assert QUANT_DEFAULTS == {"bits": 4, "budget": 0.6}
    cfg, _ = _compress_config("--no-quant")
    assert cfg.quant.bits is None and cfg.bank.budget == 0.5
    cfg, _ = _compress_config("--budget", "0.4", "--bits", "3")
    assert (cfg.quant.bits, cfg.bank.budget) == (3, 0.4)
    cfg, _ = _compress_config("--rank-allocation", "sensitivity")       # a rank per layer is stored unquantized
    assert cfg.quant.bits is None and cfg.ranks.allocation == "sensitivity"
    assert build_config(cli.build_parser().parse_args(["fit", "-o", "OUT"])).quant.bits is None


@pytest.mark.parametrize("options, bits, budget", [
    ((), 4, 0.6),                                              # no option: the main job, unchanged
    (("--total-cut", "0.3"), 8, None),                         # a parameter target: 8-bit factors
    (("--budget", "0.4"), 8, 0.4),
    (("--total-cut", "0.3", "--bits", "4"), 4, None),          # explicit bits stand
    (("--budget", "0.4", "--bits", "4"), 4, 0.4),
    (("--total-cut", "0.3", "--no-quant"), None, None),
    (("--no-quant",), None, 0.5),
    (("--m", "8", "--r", "32"), 4, None),                      # a shape, not a parameter target: unchanged
])
def test_a_parameter_target_stores_8_bit_factors_by_default(options, bits, budget):
    from globe.cli.compress import PARAM_TARGET_BITS
    from globe.fit.expert_config import COMPRESS_QUANT_STEPS
    assert PARAM_TARGET_BITS == 8
    cfg, plan = _compress_config(*options)
    assert cfg.quant.bits == bits and plan is None
    assert cfg.quant.group == 64 and cfg.quant.method == "gptq"
    if budget is not None:
        assert cfg.bank.budget == budget
    # the quantized expert phase runs wherever the factors are quantized (8-bit included), as before
    assert cfg.expert.quant_steps == (COMPRESS_QUANT_STEPS if bits else 0)


def test_a_size_target_chooses_its_bits_unaffected_by_the_parameter_target_default():
    cfg, plan = _compress_config("--size", "0.016")
    assert plan.bits == cfg.quant.bits == 4                     # not PARAM_TARGET_BITS: --size picks the bits
    cfg, plan = _compress_config("--size", "0.016", "--bits", "8")
    assert plan.bits == cfg.quant.bits == 8


def test_compress_size_sets_bits_and_budget_and_refuses_in_one_line(tmp_path, capsys):
    cfg, plan = _compress_config("--size", "0.016")
    assert plan.bits == cfg.quant.bits == 4 and cfg.bank.budget == plan.budget < 0.6
    assert plan.predicted_bytes <= plan.target_bytes == int(0.016 * 2**30)
    cfg, plan = _compress_config("--size", "0.016", "--no-quant")
    assert plan.bits is None and cfg.quant.bits is None
    assert cli.main(["compress", "-o", str(tmp_path / "x"), "--size", "0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "smallest reachable checkpoint is 0.0145" in err[0]
    cfg, plan = _compress_config("--size", "0.02")                  # >= 4.25 bits: plain quantization, no refusal
    assert plan.kind == "plain" and cfg.bank.budget == 0 and cfg.quant.residual_bits == plan.residual_bits
    assert cli.main(["compress", "-o", str(tmp_path / "x"), "--size", "0.02", "--bits", "4"]) == 2
    assert "plain quantization of the experts is better" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main(["compress", "-o", str(tmp_path / "x"), "--bits", "4", "--no-quant"]) == 2


def test_compress_distills_after_the_fit_and_records_it(tmp_path, capsys):
    out = tmp_path / "distilled"
    assert cli.main(["compress", "-o", str(out), "--families", "gate", "--m", "6", "--r", "16",
                     "--target-support", "3", "--am-iters", "1", "--varpro-steps", "1", "--calibration-tokens", "512",
                     "--activation-steps", "1", "--distill-steps", "3", "--distill-lr", "1e-4", "--no-quant"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "globe_config.json").read_text())
    info = doc["source"]["distill"]
    assert info["config"]["steps"] == 3 and info["config"]["lr"] == 1e-4 and info["config"]["format_version"] == 1
    assert info["train_sequences"] == 1 and info["validation_sequences"] == 1 and info["tokens_per_sequence"] == 256
    assert "distilled bank, code_values, adapters for 3 steps" in printed
    assert ("kept" if info["accepted"] else "rejected") in printed
    assert "Then distilled (bank, code_values, adapters; nothing else of the model)" in (out / "README.md").read_text()


def test_compress_rejects_bad_distillation_options_before_any_work(tmp_path, capsys):
    assert cli.main(["compress", "-o", str(tmp_path / "x"), "--distill-steps", "-1"]) != 0
    assert "--distill-steps must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compress_with_residuals_distills_and_writes_them(tmp_path, capsys):
    """--residual-bits through the whole main job: fit, distillation with the residuals in the model, the packed
    residual tensors in the checkpoint, the card's byte rows; bad values are refused before any work."""
    out = tmp_path / "resid"
    assert cli.main(["compress", "-o", str(out), "--families", "gate", "--m", "6", "--r", "16",
                     "--target-support", "3", "--am-iters", "1", "--varpro-steps", "1", "--calibration-tokens", "256",
                     "--activation-steps", "1", "--distill-steps", "2", "--residual-bits", "3",
                     "--residual-group", "64"]) == 0
    doc = json.loads((out / "globe_config.json").read_text())
    assert doc["config"]["quant"]["residual_bits"] == 3 and doc["config"]["quant"]["residual_group"] == 64
    assert doc["metrics"]["gate"]["quant"]["residual"]["method"] == "gptq"         # calibrated: the routed Hessian
    assert doc["metrics"]["gate"]["rel_err"] < doc["metrics"]["gate"]["rel_err_factors"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["families"]["gate"]["quant"]["residual"]["bits"] == 3
    assert "bytes of gate: bank / adapters / codes / scales / ids / residual" in (out / "README.md").read_text()
    capsys.readouterr()
    assert cli.main(["compress", "-o", str(tmp_path / "bad"), "--residual-group", "0"]) == 2
    assert "--residual-group" in capsys.readouterr().err
