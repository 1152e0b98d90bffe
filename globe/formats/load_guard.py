"""The compressed checkpoint's load guard: its config.json names an experts implementation that only globe
registers with transformers, so that a process without globe stops with one line saying what to install or import
instead of loading the routed experts randomly initialised (transformers only warns about an unknown
`quant_method` and then skips it).

    config.json    "experts_implementation": GUARD
    without globe  ValueError: Specified `experts_implementation="globe: ... pip install globe-moe ..."` is not
                   supported
    with globe     `import globe` (or the installed globe-autoload.pth) registers GUARD next to the "globe" quantizer,
                   which swaps every routed-experts module for a GlobeExperts before the weights load

transformers keeps the name it read from config.json out of what it saves, so the writers set it as a plain config
attribute (`mark`), which save_pretrained writes; a dense export removes it (`unmarked`: stock transformers loads
that one as an ordinary checkpoint).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

GUARD_KEY = "experts_implementation"
GUARD = "globe: a GloBE-compressed checkpoint, pip install globe-moe or import globe before loading it"


def mark(config: Any) -> None:
    """Make save_pretrained of this (compressed) model's config write the guard into config.json."""
    setattr(config, GUARD_KEY, GUARD)


@contextmanager
def unmarked(config: Any) -> Iterator[None]:
    """The guard hidden while an ordinary (dense) checkpoint is written from this config."""
    saved = config.__dict__.pop(GUARD_KEY, None) if config is not None else None
    try:
        yield
    finally:
        if saved is not None:
            setattr(config, GUARD_KEY, saved)
