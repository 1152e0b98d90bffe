"""tqdm progress bars for long loops: shown while the `globe` logger is at INFO or more verbose and stderr is a
terminal (tqdm's own `disable=None` switch), or everywhere at INFO once asked for (`globe --progress`).

    for layer in progress(layers, "read gate"):
        ...
    bar = counter("VarPro gate", total=125)       # a bar advanced by hand: bar.update(1), bar.close()
    show_progress(True)                            # bars even when stderr is redirected (--progress)
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_forced = False


def show_progress(on: bool) -> None:
    """Show bars even when stderr is not a terminal (on), or only on a terminal (off, the default)."""
    global _forced
    _forced = bool(on)


def _disable() -> bool | None:
    """tqdm's `disable`: True above INFO; None (off unless stderr is a terminal) unless forced on."""
    if not logging.getLogger("globe").isEnabledFor(logging.INFO):
        return True
    return False if _forced else None


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False,
             initial: int = 0) -> Iterable[T]:
    """`iterable` wrapped in a tqdm bar (stderr), silent when logging.getLogger("globe") is above INFO.

    initial: steps already done before `iterable` starts (a resumed loop shows 15/30, not 0/15)."""
    return tqdm(iterable, desc=desc, total=total, leave=leave, initial=initial, disable=_disable())


def counter(desc: str, total: int | None = None, leave: bool = False) -> tqdm:
    """A tqdm bar without an iterable, advanced with .update(n) (closure-driven loops such as L-BFGS)."""
    return tqdm(desc=desc, total=total, leave=leave, disable=_disable())
