"""`globe calibrate` then `globe fit --calibration` through the real dispatcher, on a tiny checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest

import globe
from globe.calibration import load_stats
from globe.cli.main import main
from tests.helpers.fits import char_tokenizer

FIT = ["--m", "4", "--r", "4", "--target-support", "2", "--am-iters", "3", "--varpro-steps", "5",
       "--activation-steps", "5", "--json"]


@pytest.fixture
def calibrated(tmp_path, tiny_checkpoint, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model_dir)
    char_tokenizer(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 10)
    stats = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(model_dir), "--text", str(text), "-o", str(stats), "--max-tokens", "200",
                 "--window", "32"]) == 0
    assert "200 tokens" in capsys.readouterr().out
    return model_dir, stats


def test_calibrate_writes_stats_and_fit_uses_them(calibrated, tmp_path, capsys):
    model_dir, stats = calibrated
    loaded = load_stats(stats)
    assert loaded.tokens == 200 and loaded.per_expert and loaded.info["text"].endswith("calib.txt")
    out = tmp_path / "art"
    assert main(["fit", str(model_dir), "-o", str(out), *FIT, "--calibration", str(stats),
                 "--families", "gate,up,down"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"gate", "up", "down"}
    assert all(0 < row["act_rel_err"] < 1 for row in summary.values())
    result = globe.load(out)
    assert result.config.activation.stats == str(stats) and result.config.activation.per_expert
    assert result.families["down"].shape["d"] == loaded.intermediate_expert.shape[-1]


def test_fit_flags_need_calibration_and_missing_stats_fail_cleanly(calibrated, tmp_path, capsys):
    model_dir, _ = calibrated
    assert main(["fit", str(model_dir), "-o", str(tmp_path / "a"), *FIT, "--per-layer"]) == 2
    assert "need --calibration" in capsys.readouterr().err
    assert main(["fit", str(model_dir), "-o", str(tmp_path / "b"), *FIT, "--calibration",
                 str(tmp_path / "none.safetensors")]) == 2
    assert "run `globe calibrate" in capsys.readouterr().err
