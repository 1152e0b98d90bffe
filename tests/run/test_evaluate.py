"""`globe eval` compares a compressed model with its original: KL and top-1 agreement for --globe OUT, for a
compressed checkpoint (its recorded source), for --original; one warning line and perplexity only without it."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest

import globe
import globe.cli.main as cli
from tests.helpers.fits import char_tokenizer, quick_fit

EVAL_ARGS = ["--max-length", "32", "--no-speed", "--json"]


@pytest.fixture
def setup(tmp_path, tiny_checkpoint):
    """(model dir with tokenizer, artifact dir, compressed checkpoint, text file) in tmp_path."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model_dir)
    char_tokenizer(model_dir)
    fit = quick_fit(tiny_checkpoint("qwen2_moe"))
    result = dataclasses.replace(fit, source={**fit.source, "model_dir": str(model_dir)})
    globe.save(result, tmp_path / "art")
    assert cli.main(["export", str(tmp_path / "art"), "--model", str(model_dir), "-o", str(tmp_path / "c")]) == 0
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 8)
    return model_dir, tmp_path / "art", tmp_path / "c", text


def _eval(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli.main(["eval", *args, *EVAL_ARGS]) == 0
    return json.loads(capsys.readouterr().out)


def test_kl_to_the_original_for_an_artifact_and_a_compressed_checkpoint(setup, capsys):
    model_dir, art, compressed, text = setup
    patched = _eval(capsys, str(model_dir), "--globe", str(art), "--text", str(text), "--mode", "dense")
    saved = _eval(capsys, str(compressed), "--text", str(text), "--mode", "dense")
    original = _eval(capsys, str(model_dir), "--text", str(text))
    for report in (patched, saved):
        div = report["divergence"]
        assert div["original"] == str(model_dir) and div["tokens"] == report["perplexity"]["tokens"]
        assert 0 < div["kl"] < 1 and 0 < div["top1"] <= 1
        assert div["perplexity"] == pytest.approx(report["perplexity"]["perplexity"], rel=1e-4)
        assert div["reference_perplexity"] == pytest.approx(original["perplexity"]["perplexity"], rel=1e-4)
    assert saved["divergence"]["kl"] == pytest.approx(patched["divergence"]["kl"], rel=1e-3, abs=1e-6)
    assert original["divergence"] is None                                      # the original itself


def test_original_given_missing_or_skipped(setup, tmp_path, capsys, caplog):
    model_dir, art, compressed, text = setup
    assert cli.main(["export", str(art), "--dense", "-o", str(tmp_path / "hf")]) == 0
    dense = _eval(capsys, str(tmp_path / "hf"), "--text", str(text), "--original", str(model_dir))
    assert 0 < dense["divergence"]["kl"] < 1
    skipped = _eval(capsys, str(compressed), "--text", str(text), "--no-kl")
    assert skipped["divergence"] is None
    shutil.move(model_dir, tmp_path / "moved")                                   # the source is no longer here
    with caplog.at_level(logging.WARNING, logger="globe"):
        alone = _eval(capsys, str(compressed), "--text", str(text))
    assert alone["divergence"] is None and alone["perplexity"]["tokens"] > 0
    lines = [r.getMessage() for r in caplog.records if "KL" in r.getMessage()]
    assert len(lines) == 1 and "is not here" in lines[0] and "perplexity only" in lines[0]
    assert cli.main(["eval", str(compressed), "--text", str(text), "--original", str(tmp_path / "nowhere")]) == 2
    assert "--original" in capsys.readouterr().err


def test_the_text_report_shows_kl_and_top1(setup, capsys):
    model_dir, art, _, text = setup
    capsys.readouterr()
    assert cli.main(["eval", str(model_dir), "--globe", str(art), "--text", str(text), "--max-length", "32",
                     "--no-speed"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("vs original"))
    assert "KL" in line and "top-1 agreement" in line and str(model_dir) in line
