"""LazyExperts: a read-only, tensor-like view [N, rows, cols] of one family's routed experts that reads them from
the safetensors shards only when indexed, so a family never has to be resident in RAM.

Every expert is one contiguous block in its shard (per-expert keys: the whole tensor; fused gate_up [E, 2p, d]:
rows [0, p) or [p, 2p) of expert e; fused down [E, d, p]: expert e). Blocks are read with plain positional reads
(no mmap, so the page cache is not charged to this process), in the stored dtype, and checked for NaN/Inf.

    experts = reader.read_family("gate", lazy=True).weights    # LazyExperts, shape (N, p, d), dtype bfloat16
    chunk = experts[64:128]                                    # torch.Tensor [64, p, d], read now
    some = experts[torch.tensor([3, 9])]                       # any index tensor / list
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from globe.errors import CheckpointError
from globe.io.checks import check_finite


@dataclass(frozen=True)
class Block:
    """Where one expert's weight lives: file, absolute byte offset, and the tensor name for error messages."""

    path: Path
    offset: int
    name: str


def data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (absolute byte offset of its data, byte length) from a safetensors header (no tensor data read)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc}); re-download or re-save it") from None
    return {name: (8 + size + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
            for name, info in header.items() if name != "__metadata__"}


class LazyExperts:
    """[N, rows, cols] experts read on demand from `blocks` (one per expert, in order), in `dtype`."""

    def __init__(self, blocks: list[Block], rows: int, cols: int, dtype: torch.dtype) -> None:
        self.blocks = blocks
        self.shape = torch.Size((len(blocks), rows, cols))
        self.dtype = dtype
        self.ndim = 3
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self._read([key % len(self)])[0]
        if isinstance(key, slice):
            return self._read(list(range(*key.indices(len(self)))))
        index = torch.as_tensor(key)
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        return self._read([int(i) % len(self) for i in index.reshape(-1).tolist()]).view(*index.shape,
                                                                                         *self.shape[1:])

    def _read(self, experts: list[int]) -> torch.Tensor:
        rows, cols = self.shape[1:]
        out = torch.empty(len(experts), rows, cols, dtype=self.dtype)
        raw = out.view(len(experts), -1).view(torch.uint8)                  # [c, rows * cols * itemsize]
        handles: dict[Path, int] = {}
        try:
            for i, e in enumerate(experts):
                block = self.blocks[e]
                if block.path not in handles:
                    handles[block.path] = os.open(block.path, os.O_RDONLY)
                got = os.preadv(handles[block.path], [raw[i].numpy()], block.offset)   # straight into `out`
                if got != raw.shape[1]:
                    raise CheckpointError(f"{block.path} is truncated: cannot read {block.name!r}; re-download it")
                check_finite(out[i], block.name)
        finally:
            for fd in handles.values():
                os.close(fd)
        return out

    def to_tensor(self) -> torch.Tensor:
        """Everything, read now (what the eager reader returns)."""
        return self[:]
