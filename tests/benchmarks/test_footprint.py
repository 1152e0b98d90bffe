"""benchmarks/footprint.py: the goal arithmetic (disk vs parameter ratio, runtime vs stored ratio, decode ratio)."""
from __future__ import annotations

import pytest

from tests.helpers.scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("footprint")


def _row(export_bytes: int, runtime_ratio: float, cached_speeds: list[float]) -> dict:
    fp = {"runtime_ratio": runtime_ratio, "stored_bytes_ratio": 0.75, "model_bytes": 1, "original_bytes": 1}
    variants = {name: {"footprint": fp, "rss_before_load_mb": 1.0, "rss_after_load_mb": 2.0, "rss_mb": 3.0}
                for name in ("original", "cached")}
    return {"cut": 0.25, "param_ratio": 0.75, "export_bytes": export_bytes, "variants": variants,
            "speed": {"original": {"samples": [10.0, 20.0]}, "cached": {"samples": cached_speeds}}}


def test_goals_pass_and_fail_at_their_thresholds(bench):
    ok = _row(export_bytes=765, runtime_ratio=0.80, cached_speeds=[9.6, 19.2])
    ok["speed"]["cached"]["ratio_to_original"] = 0.96
    goals = bench.goals(ok, original_disk=1000)
    assert goals["disk_ok"] and goals["runtime_ok"] and goals["decode_ok"]
    bad = _row(export_bytes=766, runtime_ratio=0.81, cached_speeds=[9.0, 18.0])
    bad["speed"]["cached"]["ratio_to_original"] = 0.94
    goals = bench.goals(bad, original_disk=1000)
    assert not (goals["disk_ok"] or goals["runtime_ok"] or goals["decode_ok"])


def test_decode_ratio_is_the_median_of_per_round_ratios(bench):
    class Fake:
        def __init__(self, speeds):
            self.speeds = iter(speeds)

        def ask(self, what):
            return {"decode_tok_s": next(self.speeds)}

    out = bench.timed({"original": Fake([10, 20, 40]), "cached": Fake([9, 20, 20])}, rounds=3)
    assert out["cached"]["ratio_to_original"] == pytest.approx(0.9)          # median of 0.9, 1.0, 0.5
    assert out["original"]["ratio_to_original"] == 1.0
