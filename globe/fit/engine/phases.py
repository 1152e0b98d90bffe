"""The phases of a family fit, by the names that the engine times and the dry run (globe.fit.planning) predicts.

    normalize, shape, warm_start, am, varpro, <objective stage>, finalize, nonlinear, refine, ranks, quantize
    (and once per model, between the families' fits and their quantize stages: expert; after them: quant_expert)

`phase(problem_timings, name, device)` times one phase (seconds added up over repeats, e.g. AM of every cycle and
restart; peak memory the largest seen), marks it as a torch.profiler range of the same name (so a traced run
gives each phase's allocation peak, globe.fit.planning.estimate.traced_peak), and tells every listener: a
benchmark listens with `listen(fn)` instead of patching the engine. fn(event, family, name, record) is called
with event "start" (record None) and "end" (record: {"seconds", "peak_mem_mb"} of this occurrence; on CUDA the peak
allocated during this phase, reset at its start; on the CPU the process's peak RSS so far).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from globe.device import peak_memory_mb

PHASES = ("normalize", "shape", "warm_start", "am", "varpro", "activation", "finalize", "nonlinear", "refine",
          "ranks", "expert", "quantize", "quant_expert")
_LISTENERS: list[Callable[[str, str, str, dict | None], None]] = []


@contextmanager
def listen(fn: Callable[[str, str, str, dict | None], None]) -> Iterator[None]:
    """Call fn(event, family, phase, record) at the start and end of every phase while the block runs."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


@contextmanager
def phase(timings: dict, name: str, device: str | torch.device = "cpu", family: str = "") -> Iterator[None]:
    """Record wall time and peak memory of phase `name` into timings[name] (added to an earlier occurrence)."""
    for fn in list(_LISTENERS):
        fn("start", family, name, None)
    if torch.device(device).type == "cuda":          # each phase's own CUDA peak (phases do not nest)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.profiler.record_function(name):
        yield
    record = {"seconds": round(time.perf_counter() - t0, 4), "peak_mem_mb": round(peak_memory_mb(device), 1)}
    for fn in list(_LISTENERS):
        fn("end", family, name, record)
    earlier = timings.get(name)
    if earlier is not None:
        record = {"seconds": round(earlier["seconds"] + record["seconds"], 4),
                  "peak_mem_mb": max(earlier["peak_mem_mb"], record["peak_mem_mb"])}
    timings[name] = record
