"""benchmarks/scale.py: the fit and processes sections on a tiny upcycled checkpoint, and the memory model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.scripts import load_benchmark

_load = load_benchmark


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scale") / "ckpt"
    _load("make_upcycled").main(["--out", str(out), "--layers", "2", "--experts", "4", "--hidden", "32",
                                 "--intermediate", "16", "--rank", "8"])
    return out


def test_fit_section_records_memory_and_timings(tiny: Path, tmp_path: Path):
    scale, out = _load("scale"), tmp_path / "scale.json"
    scale.main(["--out", str(out), "--fit", str(tiny), "--m", "4", "--r", "4", "--target-support", "2",
                "--am-iters", "2", "--varpro-steps", "1"])
    fit = json.loads(out.read_text())["fit"]
    assert (fit["n"], fit["p"], fit["d"], fit["dtype"]) == (8, 16, 32, "bfloat16")
    assert fit["peak_rss_gib"] > 0 and len(fit["am_seconds_per_iteration"]) == 2
    assert {"normalize", "warm_start", "am", "varpro"} <= set(fit["seconds_per_phase"])
    assert 0 < fit["rel_err"] < 1
    scale.main(["--out", str(out), "--procs", "1", "2", "--proc-problem", "16", "8", "16", "4", "4", "2"])
    merged = json.loads(out.read_text())                                 # merged into the same file
    assert merged["fit"] == fit
    runs = merged["processes"]["processes"]
    assert set(runs) == {"1", "2"} and runs["1"]["bank_rel_diff_vs_1"] == 0.0
    assert all(0 < row["rel_err"] < 1 and row["seconds"] > 0 for row in runs.values())


def test_memory_model_grows_with_the_rank_and_names_its_peak():
    model = _load("scale").memory_model
    small, large = model(1440, 1408, 2048, 128, 64), model(1440, 1408, 2048, 704, 256)
    assert small["peak"] == max(v for k, v in small.items() if k != "peak")
    assert all(large[k] >= small[k] for k in ("warm_start", "am", "varpro", "finalize"))
