"""tqdm progress bars for long loops, shown while the `globe` logger is at INFO or more verbose.

    for layer in progress(layers, "read gate"):
        ...
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
    """`iterable` wrapped in a tqdm bar (stderr), silent when logging.getLogger("globe") is above INFO."""
    return tqdm(iterable, desc=desc, total=total, leave=leave,
                disable=not logging.getLogger("globe").isEnabledFor(logging.INFO))
