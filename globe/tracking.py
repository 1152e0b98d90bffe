"""Experiment tracking: `emit(event, **fields)` sends a metric record to every active sink.

    with tracking.session(jsonl="out/metrics.jsonl", wandb_mode="disabled"):
        fit_model(...)                  # globe.fit emits "am_iter", "varpro", "family_done", ...

Sinks: a JSONL file (one object per line: {"time", "event", **fields}) and Weights & Biases (online/offline),
which logs each numeric field as one series `[family/]event/field` (a record with a `family` field, such as the
fit's am_iter of "gate" and of "up", gets one series per family) and keeps its run files in $WANDB_DIR (the
current directory when unset), never in the output directory. wandb is imported only when a wandb sink is
created, i.e. never in "disabled" mode (the default); it is an optional dependency. Without an active session, emit() does nothing, so library code can call it freely.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from globe.errors import ConfigError

log = logging.getLogger(__name__)
WANDB_MODES = ("disabled", "offline", "online")


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


_SINKS: list[Sink] = []


def _plain(value: Any) -> Any:
    """JSON-safe copy: tensors/numpy scalars to Python numbers, non-finite floats to None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


class JsonlSink:
    """One JSON object per record, written to a temporary file beside `path` (.NAME.XXXXXXXX.tmp, opened on the
    first record; with append it starts as a copy of `path`) that replaces `path` in one rename on close: `path`
    holds its previous records or all of this run's, never a torn line (a killed run leaves only the temporary
    file, which the next run on that output removes)."""

    def __init__(self, path: str | Path, append: bool = True) -> None:
        self.path, self.append, self.fh, self.tmp = Path(path), append, None, None

    def write(self, record: dict[str, Any]) -> None:
        if self.fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            self.tmp, self.fh = Path(tmp), os.fdopen(fd, "w", encoding="utf-8")
            if self.append and self.path.is_file():
                old = self.path.read_text(encoding="utf-8")
                self.fh.write(old if not old or old.endswith("\n") else old + "\n")
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is None:
            return
        fh, self.fh = self.fh, None
        os.fsync(fh.fileno())
        fh.close()
        if not self.tmp.exists():              # a failed run removed the directory it was in
            return
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise


def wandb_dir() -> Path:
    """Where a wandb run keeps its files (wandb adds a `wandb/` folder there): $WANDB_DIR, else the current
    directory, as wandb itself does; never next to the metrics file, which usually lies in the artifact."""
    return Path(os.environ.get("WANDB_DIR") or Path.cwd())


def wandb_key(record: dict[str, Any], field: str) -> str:
    """The series of one field: `family/event/field` for a record of one family, else `event/field`."""
    family = record.get("family")
    prefix = f"{family}/" if isinstance(family, str) and family else ""
    return f"{prefix}{record['event']}/{field}"


class WandbSink:
    """Logs the numeric fields of each record to a wandb run, one series per wandb_key."""

    def __init__(self, mode: str, project: str | None, config: dict | None = None, name: str | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"--wandb {mode} needs the wandb package: pip install wandb "
                              f"(or use --wandb disabled)") from None
        directory = wandb_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"WANDB_DIR {directory} cannot be created ({exc.strerror}): "
                              f"set WANDB_DIR to a writable directory") from None
        log.info("wandb %s run files go to %s", mode, directory / "wandb")
        self.run = wandb.init(mode=mode, project=project or "globe", config=config, name=name, dir=str(directory))

    def write(self, record: dict[str, Any]) -> None:
        scalars = {wandb_key(record, k): v for k, v in record.items()
                   if k not in ("event", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self.run.log(scalars)

    def close(self) -> None:
        self.run.finish()


def emit(event: str, **fields: Any) -> None:
    """Record one metric event in every active sink (a no-op when none is active)."""
    if not _SINKS:
        return
    record = {"time": time.time(), "event": event, **_plain(fields)}
    for sink in list(_SINKS):
        sink.write(record)


def active() -> bool:
    return bool(_SINKS)


@contextmanager
def session(jsonl: str | Path | None = None, wandb_mode: str = "disabled", wandb_project: str | None = None,
            config: dict | None = None, append: bool = True, run_name: str | None = None) -> Iterator[list[Sink]]:
    """Activate a JSONL sink (when `jsonl` is given) and a wandb sink (unless wandb_mode is "disabled")."""
    if wandb_mode not in WANDB_MODES:
        raise ConfigError(f"wandb mode must be one of {WANDB_MODES} (got {wandb_mode!r})")
    sinks: list[Sink] = []
    if jsonl is not None:
        sinks.append(JsonlSink(jsonl, append=append))
    if wandb_mode != "disabled":
        sinks.append(WandbSink(wandb_mode, wandb_project, config, run_name))
    _SINKS.extend(sinks)
    failed = True
    try:
        yield sinks
        failed = False
    finally:
        errors = []
        for sink in sinks:
            _SINKS.remove(sink)
            try:
                sink.close()
            except Exception as exc:  # a sink failing to close must not hide the run's own outcome
                log.warning("closing %s failed: %s", type(sink).__name__, exc)
                errors.append(exc)
        if errors and not failed and isinstance(errors[0], OSError):
            raise errors[0]           # the run succeeded but its metrics file could not be written: say so


@contextmanager
def attached(sink: Sink) -> Iterator[Sink]:
    """Send every record to `sink` too while the block runs (a benchmark's own listener, e.g. of "am_iter"); its
    close() is not called."""
    _SINKS.append(sink)
    try:
        yield sink
    finally:
        _SINKS.remove(sink)


def read_jsonl(path: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """Records of a metrics JSONL file, optionally only those of one event."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if event is None or r.get("event") == event]
