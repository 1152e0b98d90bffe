"""globe.progress: bars start at the steps already done (a resumed loop), hand-driven counters count updates,
and both are silent while the globe logger is above INFO."""
from __future__ import annotations

import logging

import pytest

from globe.progress import counter, progress, show_progress


@pytest.fixture
def verbose():
    logger = logging.getLogger("globe")
    level = logger.level
    logger.setLevel(logging.INFO)
    show_progress(True)                          # pytest's stderr is no terminal: bars on as with --progress
    yield
    show_progress(False)
    logger.setLevel(level)


def test_a_resumed_loop_counts_from_the_steps_already_done(verbose):
    bar = progress(range(15, 30), "AM gate", total=30, initial=15)
    assert (bar.n, bar.total) == (15, 30)
    assert list(bar) == list(range(15, 30))
    assert bar.n == 30


def test_counter_counts_its_updates(verbose):
    bar = counter("VarPro gate", total=12)
    for _ in range(5):
        bar.update(1)
    assert (bar.n, bar.total, bar.desc) == (5, 12, "VarPro gate")
    bar.close()


def test_bars_are_silent_above_info():
    logger = logging.getLogger("globe")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        assert progress(range(3), "x").disable and counter("y").disable
    finally:
        logger.setLevel(level)


def test_bars_follow_the_terminal_unless_forced():
    logger = logging.getLogger("globe")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert progress(range(3), "x").disable                   # pytest's stderr is not a terminal
        show_progress(True)
        assert not progress(range(3), "x").disable and not counter("y").disable
    finally:
        show_progress(False)
        logger.setLevel(level)
