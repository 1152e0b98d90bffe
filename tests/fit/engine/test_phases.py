"""globe.fit.engine.phases: every phase's record has its seconds and its OWN peak memory on CUDA (the peak is reset
at each phase start), and listeners see both events."""
from __future__ import annotations

import pytest
import torch

from globe.fit.engine.phases import listen, phase


def test_listeners_see_start_and_end_with_the_record():
    seen, timings = [], {}
    with listen(lambda event, family, name, record: seen.append((event, family, name, record))):
        with phase(timings, "am", "cpu", "gate"):
            pass
    assert [s[:3] for s in seen] == [("start", "gate", "am"), ("end", "gate", "am")]
    assert seen[0][3] is None and seen[1][3]["seconds"] >= 0 and timings["am"]["peak_mem_mb"] > 0


def test_each_phase_reports_its_own_cuda_peak(device):
    if device.type != "cuda":
        pytest.skip("CUDA peaks: run with --device cuda")
    timings = {}
    with phase(timings, "warm_start", device):
        big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)          # 256 MiB
        del big
    with phase(timings, "am", device):
        small = torch.empty(2**20, dtype=torch.uint8, device=device)
        del small
    assert timings["warm_start"]["peak_mem_mb"] >= 256
    assert timings["am"]["peak_mem_mb"] < timings["warm_start"]["peak_mem_mb"] - 200
