"""Atomic file writes: write a temporary file beside the target, fsync it, rename it over the target, fsync the
directory. A crash at any moment leaves the old file or the new one, never a torn one.

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(path, json.dumps(doc))
    atomic_write_all({banks: write_banks, config: write_config})   # both replaced, or neither
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from globe.errors import OutputError


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path) then fsync and rename tmp over path."""
    atomic_write_all({Path(path): write})


def atomic_write_all(writers: dict[Path, Callable[[Path], object]]) -> None:
    """Write several files so that either all of them are replaced or none: every write(tmp) goes to a temp
    file beside its target and is fsynced first, and only then are the temp files renamed over their targets.
    A failure while writing (disk full, ...) leaves every previous file as it was, and no temp file behind;
    safetensors' own write errors become OutputError naming the file."""
    umask = os.umask(0)
    os.umask(umask)
    temps: dict[Path, Path] = {}
    try:
        for path, write in writers.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            temps[path] = Path(tmp)
            try:
                write(Path(tmp))
            except SafetensorError as exc:             # the Rust writer's I/O errors (disk full, ...)
                raise OutputError(f"cannot write {path}: {exc}") from None
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~umask)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for parent in {path.parent for path in writers}:
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file with the header metadata in sorted key order: the writer serialises it from a
    hash map whose order changes from process to process, and the same tensors must give the same bytes."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    sort_metadata(path)


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header in place with its metadata keys sorted (same length, same data)."""
    with open(path, "rb+") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:                           # same content, so never longer; pad as safetensors does
            fh.seek(8)
            fh.write(text + b" " * (size - len(text)))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
