"""Content identity of a checkpoint's routed experts: a hash that changes when their weights change.

    content_hash(reader)        # 32 hex digits over every routed expert matrix, in (family, layer, expert) order

The hash reads each expert's matrix where it lies on disk (see CheckpointReader.expert_blocks), so it does not
depend on the layout (per-expert hub keys or fused tensors) or the shard split: the same weights in the same
dtype give the same hash. Small checkpoints (routed experts up to FULL_HASH_BYTES) are hashed in full; larger
ones hash SAMPLES evenly spaced chunks of CHUNK bytes of every expert (a few hundred MB read at most for the
largest MoE models), so resuming or applying to a checkpoint whose weights were replaced in place is detected
without re-reading everything. The checkpoint fingerprint of `globe fit --resume` and the artifact's
`source.content_hash` both use it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from globe.errors import CheckpointError
from globe.io.arch import FAMILIES

if TYPE_CHECKING:
    from globe.io.reader import CheckpointReader

FULL_HASH_BYTES = 256 << 20
SAMPLES = 4
CHUNK = 4096


def content_hash(reader: "CheckpointReader") -> str:
    """Hash of the routed expert matrices of an open checkpoint (see the module docstring)."""
    size = reader.p * reader.d * _itemsize(reader.dtype)                 # bytes of one expert matrix
    experts = len(reader.moe_layers) * reader.num_experts
    full = 3 * experts * size <= FULL_HASH_BYTES
    digest = hashlib.sha256(f"{reader.dtype}|p={reader.p}|d={reader.d}|{'full' if full else SAMPLES}|".encode())
    handles: dict[Path, object] = {}
    try:
        for family in FAMILIES:
            for block in reader.expert_blocks(family):
                fh = handles.setdefault(block.path, open(block.path, "rb"))
                for pos, length in _pieces(block.offset, size, full):
                    fh.seek(pos)
                    data = fh.read(length)
                    if len(data) != length:
                        raise CheckpointError(f"{block.path} is truncated: cannot read {block.name!r}; "
                                              f"re-download it")
                    digest.update(data)
    except OSError as exc:
        raise CheckpointError(f"cannot read the routed experts of {reader.model_dir} ({exc.strerror})") from None
    finally:
        for fh in handles.values():
            fh.close()
    return digest.hexdigest()[:32]


def _itemsize(dtype: str) -> int:
    import torch
    return getattr(torch, dtype).itemsize


def _pieces(start: int, length: int, full: bool) -> list[tuple[int, int]]:
    """(position, size) of the byte ranges of one expert matrix that enter the hash."""
    if full or length <= SAMPLES * CHUNK:
        return [(start, length)]
    step = (length - CHUNK) // (SAMPLES - 1)
    return [(start + k * step, CHUNK) for k in range(SAMPLES)]
