"""CLI wording: every option states its default; export prints its final message once; export's positional is
named for what it is; scoring the embedded text on another model is warned about."""
from __future__ import annotations

import logging
import re

import pytest

import globe
import globe.cli.main as cli
from tests.helpers.fits import quick_fit


@pytest.mark.parametrize("command, option", [("fit", "--varpro-steps"), ("eval", "--hit-tokens"),
                                             ("fit", "--log-level"), ("bench", "--cache-bytes")])
def test_options_show_their_default(command, option, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    section = text[text.index("options:"):]                              # past the usage line
    start = re.search(rf" {re.escape(option)} (?:[A-Z_]+|{{[A-Z,]+}}) ", section).start()   # its own entry
    after = section[start + 1:][:300]
    assert "default" in after.split(" --")[0], after


def test_export_names_its_input_and_reports_once(tmp_path, tiny_checkpoint, capsys, caplog):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert "ARTIFACT" in capsys.readouterr().out
    path = tiny_checkpoint("qwen2_moe")
    globe.save(quick_fit(path), tmp_path / "art")
    with caplog.at_level(logging.INFO):
        assert cli.main(["export", str(tmp_path / "art"), "--model", str(path), "-o", str(tmp_path / "c")]) == 0
    both = capsys.readouterr().out + caplog.text
    assert both.count("checkpoint written to") == 1


def test_the_embedded_text_on_another_model_is_warned_about(tmp_path, tiny_checkpoint, caplog):
    from globe.run.evaluate import EvalText, evaluate_model
    from globe.run.load import ModelLoad
    from tests.helpers.fits import char_tokenizer
    import shutil
    model = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model)
    char_tokenizer(model)
    evaluate_model(ModelLoad(str(model)), EvalText(max_tokens=64, max_length=32, no_speed=True, hit_tokens=8))
    assert "embedded model's held-out text" in caplog.text and "heldout.txt" in caplog.text


@pytest.mark.parametrize("command", ["info", "fit", "compress", "eval", "bench", "calibrate"])
def test_the_model_positional_has_one_name(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "[MODEL_DIR]" in usage and "model_dir" not in usage and "MODEL_DIR_OR" not in usage
