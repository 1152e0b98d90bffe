"""`globe bench`: the original model against each runtime mode, one JSON."""
from __future__ import annotations

import json
import shutil

import pytest

import globe
import globe.cli.main as cli
from tests.helpers.fits import char_tokenizer, quick_fit

ARGS = ["--max-length", "32", "--prefill-tokens", "16", "--decode-tokens", "3", "--repeats", "1", "--hit-tokens", "16"]


@pytest.fixture
def setup(tmp_path, tiny_checkpoint):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model_dir)
    char_tokenizer(model_dir)
    globe.save(quick_fit(tiny_checkpoint("qwen2_moe")), tmp_path / "art")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 8)
    return model_dir, tmp_path / "art", text


def test_bench_compares_original_and_modes(setup, tmp_path, capsys):
    model_dir, art, text = setup
    out = tmp_path / "bench.json"
    assert cli.main(["bench", str(model_dir), "--globe", str(art), "--modes", "factored", "dense", "--text",
                     str(text), "-o", str(out), *ARGS]) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert list(doc["summary"]) == ["original", "factored", "dense"] and "benchmark written" in table
    s = doc["summary"]
    assert s["original"]["perplexity_ratio"] == pytest.approx(1.0) and s["original"]["routed_ratio"] == 1.0
    assert s["factored"]["perplexity"] == pytest.approx(s["dense"]["perplexity"], rel=1e-4)   # same weights
    assert s["factored"]["perplexity"] != pytest.approx(s["original"]["perplexity"], rel=1e-6)
    assert s["factored"]["routed_ratio"] < 1 and s["dense"]["decode_tok_s"] > 0
    assert doc["reports"]["factored"]["model"]["globe_mode"] == "factored"


def test_bench_needs_something_to_run(setup, capsys):
    model_dir, _, text = setup
    assert cli.main(["bench", str(model_dir), "--no-original", "--text", str(text), *ARGS]) == 2
    assert "nothing to benchmark" in capsys.readouterr().err


def test_bench_of_a_compressed_checkpoint_compares_it_with_its_source(
        setup, tmp_path, capsys, bench_in_process):
    model_dir, art, text = setup
    compressed = globe.save_compressed(model_dir, art, tmp_path / "compressed")
    out = tmp_path / "bench.json"
    assert cli.main(["bench", str(compressed), "--modes", "cached", "factored", "--text", str(text),
                     "-o", str(out), *ARGS]) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert list(doc["summary"]) == ["original", "cached", "factored"] and "held MB" in table
    s = doc["summary"]
    assert s["original"]["runtime_ratio"] == 1.0 and s["factored"]["runtime_ratio"] < 1
    assert s["cached"]["perplexity"] == pytest.approx(s["factored"]["perplexity"], rel=1e-4)
    assert doc["reports"]["original"]["model"]["path"] == globe.export.load_artifact(compressed).source["model_dir"]
