"""Exact bit packing of integer codes into uint8: n codes of b bits take ceil(n * b / 8) bytes, for b in 1..8.

Codes are packed little-endian in bit order: every run of 8 codes becomes b bytes (2 bits: 4 codes a byte; 3 bits:
8 codes in 3 bytes; 4 bits: 2 codes a byte; 8 bits: one), and the final partial run keeps only the bytes it needs.
"""
from __future__ import annotations

import torch

from globe.errors import ShapeError


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take when packed."""
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (any shape, values in 0 .. 2**bits - 1) -> packed uint8 [packed_bytes(numel, bits)]."""
    if not 1 <= bits <= 8:
        raise ShapeError(f"pack_bits: bits={bits} must be in 1..8")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ShapeError(f"pack_bits: codes outside 0..{2 ** bits - 1} for {bits} bits")
    n = flat.numel()
    pad = (-n) % 8
    runs = torch.nn.functional.pad(flat, (0, pad)).view(-1, 8)                         # [n8, 8]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (runs << shifts).sum(dim=1)                                                # [n8] up to 64 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    packed = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)      # [n8 * bits]
    return packed[:packed_bytes(n, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: packed uint8 -> int64 codes [count]."""
    if not 1 <= bits <= 8:
        raise ShapeError(f"unpack_bits: bits={bits} must be in 1..8")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_bytes(count, bits):
        raise ShapeError(f"unpack_bits: expected uint8 [{packed_bytes(count, bits)}] for {count} codes of {bits} "
                         f"bits, got {str(packed.dtype).removeprefix('torch.')} {list(packed.shape)}")
    runs = (count + 7) // 8
    full = torch.nn.functional.pad(packed.to(torch.int64), (0, runs * bits - packed.numel())).view(runs, bits)
    words = (full << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=1)          # [runs]
    codes = (words[:, None] >> (torch.arange(8, dtype=torch.int64) * bits)) & (2 ** bits - 1)
    return codes.reshape(-1)[:count]
