"""A save_pretrained directory is the same format as a `globe compress` one for every tool (info, eval, export);
without a tokenizer beside it globe uses the source model's or says what to pass; `globe eval MODEL --globe OUT
--plots DIR` works from a compressed checkpoint."""
from __future__ import annotations

import json
import shutil

import pytest

import globe
import globe.cli.main as cli
from globe.export import load_compressed, save_compressed
from tests.helpers.fits import char_tokenizer, quick_fit

EVAL = ["--max-length", "32", "--prefill-tokens", "8", "--decode-tokens", "2", "--repeats", "1", "--json"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("fmt")
    model_dir = tmp / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model_dir)
    char_tokenizer(model_dir)
    (tmp / "text.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 8)
    compressed = save_compressed(model_dir, quick_fit(model_dir), tmp / "c")
    load_compressed(compressed).save_pretrained(tmp / "again")
    return model_dir, compressed, tmp / "again", tmp


def _eval(capsys, *args: str) -> dict:
    assert cli.main(["eval", *args, *EVAL]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_info_eval_export_read_a_save_pretrained_directory(dirs, capsys):
    model_dir, compressed, again, tmp = dirs
    assert cli.main(["info", str(again), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["families"]) == {"gate", "up"}
    text = str(tmp / "text.txt")
    first, second = _eval(capsys, str(compressed), "--text", text), _eval(capsys, str(again), "--text", text)
    assert second["perplexity"]["tokens"] > 0
    assert second["perplexity"]["perplexity"] == pytest.approx(first["perplexity"]["perplexity"], rel=1e-6)
    assert cli.main(["export", str(again), "-o", str(tmp / "dense"), "--dense"]) == 0
    assert (tmp / "dense" / "model.safetensors").is_file()


def test_without_a_tokenizer_the_source_models_is_used_or_the_flag_named(dirs, capsys):
    model_dir, compressed, again, tmp = dirs
    bare = tmp / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "globe_config.json"):
        shutil.copy(again / name, bare)
    report = _eval(capsys, str(bare), "--text", str(tmp / "text.txt"))
    assert report["perplexity"]["tokens"] > 0                       # the source model's tokenizer
    (bare / "globe_config.json").unlink()
    assert cli.main(["eval", str(bare), "--text", str(tmp / "text.txt"), *EVAL]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no tokenizer in" in err and "--tokenizer DIR" in err


def test_eval_plots_from_a_compress_output(dirs, capsys, tmp_path):
    model_dir, compressed, again, tmp = dirs
    report = _eval(capsys, str(model_dir), "--globe", str(compressed), "--plots", str(tmp_path / "plots"),
                   "--text", str(tmp / "text.txt"))
    assert report["plots"] and all((tmp_path / "plots").joinpath(p.split("/")[-1]).is_file() for p in report["plots"])


def test_bench_reads_a_save_pretrained_directory_as_a_compress_output(
        dirs, capsys, tmp_path, bench_in_process):
    """globe bench DIR: the same variants and numbers from the save_pretrained copy as from the compress output
    (the original found through the source both record)."""
    model_dir, compressed, again, tmp = dirs
    rows = {}
    for name, path in (("compressed", compressed), ("again", again)):
        out = tmp_path / f"{name}.json"
        assert cli.main(["bench", str(path), "--text", str(tmp / "text.txt"), "--modes", "cached", "--no-speed",
                         "--max-length", "32", "--hit-tokens", "8", "-o", str(out)]) == 0, capsys.readouterr().err
        rows[name] = json.loads(out.read_text())["summary"]
    assert set(rows["again"]) == set(rows["compressed"]) == {"original", "cached"}
    for variant in ("original", "cached"):
        assert rows["again"][variant]["perplexity"] == pytest.approx(rows["compressed"][variant]["perplexity"],
                                                                     rel=1e-6)
