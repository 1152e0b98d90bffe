"""Bars and devices of every command: quiet at --log-level WARNING (transformers' loading / writing bars too), no
bars when stderr is not a terminal unless --progress; --device auto is the default of every command that
computes, and the log names the device picked."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import pytest

import globe
import globe.cli.main as cli
from tests.helpers.fits import char_tokenizer, quick_fit
from tests.helpers.subproc import subprocess_env

BAR = "it/s]"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("quiet")
    model_dir = tmp / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model_dir)
    char_tokenizer(model_dir)
    fit = quick_fit(tiny_checkpoint("qwen2_moe"))
    globe.save(dataclasses.replace(fit, source={**fit.source, "model_dir": str(model_dir)}), tmp / "art")
    return model_dir, tmp / "art", tmp


def _globe(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "globe.cli.main", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_warning_level_and_redirected_stderr_print_no_bars_unless_asked(setup):
    model_dir, art, tmp = setup
    quiet = _globe("--log-level", "WARNING", "export", str(art), "--model", str(model_dir), "-o", str(tmp / "a"))
    assert quiet.stderr.strip() == ""
    redirected = _globe("export", str(art), "--model", str(model_dir), "-o", str(tmp / "b"))
    assert BAR not in redirected.stderr and "device: cpu (--device auto" in redirected.stderr
    asked = _globe("export", str(art), "--model", str(model_dir), "-o", str(tmp / "c"), "--progress")
    assert BAR in asked.stderr                                         # transformers' loading bar, as asked


@pytest.mark.parametrize("command", ["fit", "compress", "export", "eval", "bench", "calibrate"])
def test_every_computing_command_defaults_to_device_auto(command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    device = next(a for a in sub._actions if a.dest == "device")
    assert "auto" in device.help
    if command != "fit":                                   # fit: --config's device first, else auto (below)
        assert device.default == "auto"


def test_fit_without_config_picks_auto_and_says_so(caplog):
    import logging
    from globe.cli.fit import build_config
    parser = cli.build_parser()
    args = parser.parse_args(["fit", "-o", "x"])
    with caplog.at_level(logging.INFO, logger="globe"):
        cfg = build_config(args)
    assert cfg.train.device == "cpu" and "device: cpu (--device auto" in caplog.text
