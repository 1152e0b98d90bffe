"""Content identity of a checkpoint's routed experts: a hash that changes when their weights change.

    content_hash(reader)        # 32 hex digits over names, dtypes, shapes and bytes of every routed expert tensor

Small checkpoints (routed experts up to FULL_HASH_BYTES) are hashed in full. Larger ones hash the header facts plus
SAMPLES evenly spaced chunks of CHUNK bytes of every tensor (a few MB read in all), so that resuming or applying to a
checkpoint whose weights were replaced in place is detected without re-reading hundreds of GB. The checkpoint
fingerprint of `globe fit --resume` and the artifact's `source.content_hash` both use it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from globe.errors import CheckpointError
from globe.io.lazy import data_offsets

if TYPE_CHECKING:
    from globe.io.reader import CheckpointReader

FULL_HASH_BYTES = 256 << 20
SAMPLES = 16
CHUNK = 4096
_PIECE = 8 << 20


def content_hash(reader: "CheckpointReader") -> str:
    """Hash of the routed expert tensors of an open checkpoint (see the module docstring)."""
    shards, names = reader.shards, sorted(reader.routed_names())
    offsets: dict[str, dict[str, tuple[int, int]]] = {}
    spans = []
    for name in names:
        file = shards.location[name]
        if file not in offsets:
            offsets[file] = data_offsets(reader.model_dir / file)
        spans.append((name, reader.model_dir / file, *offsets[file][name]))
    full = sum(length for *_, length in spans) <= FULL_HASH_BYTES
    digest = hashlib.sha256(b"full" if full else f"sampled {SAMPLES}x{CHUNK}".encode())
    handles: dict[Path, object] = {}
    try:
        for name, path, start, length in spans:
            digest.update(f"{name}|{shards.dtype(name)}|{list(shards.shape(name))}|{length}|".encode())
            fh = handles.setdefault(path, open(path, "rb"))
            for pos, size in _pieces(start, length, full):
                fh.seek(pos)
                data = fh.read(size)
                if len(data) != size:
                    raise CheckpointError(f"{path} is truncated: cannot read {name!r}; re-download it")
                digest.update(data)
    except OSError as exc:
        raise CheckpointError(f"cannot read the routed experts of {reader.model_dir} ({exc.strerror})") from None
    finally:
        for fh in handles.values():
            fh.close()
    return digest.hexdigest()[:32]


def _pieces(start: int, length: int, full: bool) -> list[tuple[int, int]]:
    """(position, size) of the byte ranges of one tensor that enter the hash."""
    if full:
        return [(pos, min(_PIECE, start + length - pos)) for pos in range(start, start + length, _PIECE)]
    if length <= SAMPLES * CHUNK:
        return [(start, length)]
    step = (length - CHUNK) // (SAMPLES - 1)
    return [(start + k * step, CHUNK) for k in range(SAMPLES)]
