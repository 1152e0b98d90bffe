"""`globe export` and `globe eval` through the real dispatcher, on a tiny checkpoint with a character tokenizer."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest

import globe
import globe.cli.main as cli
from globe.export import is_compressed
from tests.helpers.fits import char_tokenizer, quick_fit


@pytest.fixture
def setup(tmp_path, tiny_checkpoint):
    """(model dir with tokenizer, artifact dir, text file) in tmp_path."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model_dir)
    char_tokenizer(model_dir)
    fit = quick_fit(tiny_checkpoint("qwen2_moe"))
    result = dataclasses.replace(fit, source={**fit.source, "model_dir": str(model_dir)})   # the cached fit untouched
    globe.save(result, tmp_path / "art")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 8)
    return model_dir, tmp_path / "art", text


EVAL_ARGS = ["--max-length", "32", "--prefill-tokens", "16", "--decode-tokens", "3", "--repeats", "1", "--json"]


def _eval(capsys, *args: str) -> dict:
    assert cli.main(["eval", *args, *EVAL_ARGS]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_compressed_then_eval_it(setup, tmp_path, capsys):
    model_dir, art, text = setup
    assert cli.main(["export", str(art), "--model", str(model_dir), "-o", str(tmp_path / "c")]) == 0
    assert is_compressed(tmp_path / "c") and "compressed checkpoint written" in capsys.readouterr().out
    report = _eval(capsys, str(tmp_path / "c"), "--text", str(text), "--mode", "cached", "--cache-size", "2")
    patched = _eval(capsys, str(model_dir), "--globe", str(art), "--text", str(text), "--mode", "factored")
    assert report["model"]["globe_mode"] == "cached" and report["cache"]["hits"] > 0
    assert report["perplexity"]["perplexity"] == pytest.approx(patched["perplexity"]["perplexity"], rel=1e-5)
    assert report["footprint"]["routed_ratio"] < 1


def test_export_dense_uses_the_recorded_model_dir_and_evals_like_dense_mode(setup, tmp_path, capsys):
    model_dir, art, text = setup
    assert cli.main(["export", str(art), "--dense", "-o", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    dense = _eval(capsys, str(tmp_path / "hf"), "--text", str(text))
    patched = _eval(capsys, str(model_dir), "--globe", str(art), "--text", str(text), "--mode", "dense")
    original = _eval(capsys, str(model_dir), "--text", str(text))
    assert dense["model"]["globe_mode"] is None and dense["cache"] is None
    assert dense["perplexity"]["perplexity"] == pytest.approx(patched["perplexity"]["perplexity"], rel=1e-4)
    assert dense["perplexity"]["perplexity"] != pytest.approx(original["perplexity"]["perplexity"], rel=1e-6)


def test_eval_text_summary(setup, capsys):
    model_dir, art, text = setup
    assert cli.main(["eval", str(model_dir), "--globe", str(art), "--text", str(text), "--max-length", "32",
                     "--no-speed"]) == 0
    out = capsys.readouterr().out
    for label in ("perplexity", "cache", "routed", "total", "memory"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert "GloBE mode cached" in out and "tok/s" not in out


def test_errors_are_one_line(setup, tmp_path, capsys):
    model_dir, art, text = setup
    cli.main(["export", str(art), "--model", str(model_dir), "-o", str(tmp_path / "c")])
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "c"), "--globe", str(art), "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("globe eval: error:") and "drop --globe" in err and "\n" not in err
    assert cli.main(["export", str(art), "--model", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")]) == 2
    assert "pass --model MODEL_DIR" in capsys.readouterr().err
    assert cli.main(["eval", str(model_dir), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "--text file" in capsys.readouterr().err


def test_apply_is_export_and_says_it_is_deprecated(setup, tmp_path, capsys, caplog):
    model_dir, art, _ = setup
    with caplog.at_level(logging.WARNING, logger="globe"):
        assert cli.main(["apply", str(art), "--model", str(model_dir), "-o", str(tmp_path / "a"), "--device", "cpu"]) == 0
    assert is_compressed(tmp_path / "a") and "compressed checkpoint written" in capsys.readouterr().out
    assert any("deprecated alias of `globe export`" in r.getMessage() and "apply_globe" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="globe"):
        assert cli.main(["export", str(art), "--model", str(model_dir), "-o", str(tmp_path / "b"), "--device", "cpu"]) == 0
    assert not any("deprecated" in r.getMessage() for r in caplog.records)
