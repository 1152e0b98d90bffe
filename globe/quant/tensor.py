"""QuantizedTensor: packed integer codes plus fp16 group scales and zero points, with dequantize() and nbytes.

A tensor of shape [..., rows, cols] is split along its last axis into ceil(cols / group) groups (the last may be
shorter); entry w of group g dequantizes to (q - zeros[..., g]) * scales[..., g]. `nbytes` is what it stores:
ceil(numel * bits / 8) code bytes + 2 bytes per scale + 2 bytes per zero (shape, bits and group are metadata).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from globe.errors import ShapeError
from globe.quant.packing import pack_bits, unpack_bits

SCALE_DTYPE = torch.float16


@dataclass
class QuantizedTensor:
    """Weight-only group quantization of one tensor (see the module docstring)."""

    codes: torch.Tensor       # uint8 [ceil(numel * bits / 8)] packed codes, row-major order of `shape`
    scales: torch.Tensor      # fp16 [..., rows, groups]
    zeros: torch.Tensor       # fp16 [..., rows, groups] (in code units; integers for rtn / gptq)
    shape: tuple[int, ...]
    bits: int
    group: int

    @property
    def groups(self) -> int:
        return math.ceil(self.shape[-1] / self.group)

    @classmethod
    def empty(cls, shape: tuple[int, ...], bits: int, group: int) -> QuantizedTensor:
        """A tensor with no entries (0 bytes): the empty bank and adapters of a family with no base."""
        groups = (*shape[:-1], math.ceil(shape[-1] / group))
        return cls(torch.zeros(0, dtype=torch.uint8), torch.zeros(groups, dtype=SCALE_DTYPE),
                   torch.zeros(groups, dtype=SCALE_DTYPE), tuple(shape), bits, group)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size() \
            + self.zeros.numel() * self.zeros.element_size()

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(math.prod(self.shape), 1)

    def integer_codes(self) -> torch.Tensor:
        """The unpacked codes, int64 [*shape]."""
        return unpack_bits(self.codes, self.bits, math.prod(self.shape)).view(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[*shape] weights (q - zero) * scale, computed in fp32."""
        q = grouped(self.integer_codes().float(), self.group)                  # [..., rows, groups, group]
        w = (q - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        return ungrouped(w, self.shape[-1]).to(dtype).contiguous()     # (a short last group is sliced off)

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Rows `index` of the leading axis dequantized (fp32); only their bytes are unpacked when every row
        starts on a byte."""
        rows = torch.arange(self.shape[0])[index].reshape(-1)
        row_bits = math.prod(self.shape[1:]) * self.bits
        if row_bits % 8:
            return self.dequantize()[rows]
        step = row_bits // 8
        packed = self.codes.view(self.shape[0], step)[rows].reshape(-1)
        part = QuantizedTensor(packed, self.scales[rows], self.zeros[rows], (rows.numel(), *self.shape[1:]),
                               self.bits, self.group)
        return part.dequantize()

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """{prefix.codes, prefix.scales, prefix.zeros} for a safetensors file (shape/bits/group go in metadata)."""
        return {f"{prefix}.codes": self.codes, f"{prefix}.scales": self.scales, f"{prefix}.zeros": self.zeros}

    def meta(self) -> dict[str, object]:
        return {"shape": list(self.shape), "bits": self.bits, "group": self.group}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> QuantizedTensor:
        """Inverse of tensors() + meta(); ShapeError naming the tensor when a part does not fit the metadata."""
        shape = tuple(int(s) for s in meta["shape"])
        out = cls(tensors[f"{prefix}.codes"], tensors[f"{prefix}.scales"], tensors[f"{prefix}.zeros"], shape,
                  int(meta["bits"]), int(meta["group"]))
        out.check(prefix)
        return out

    def check(self, name: str = "tensor") -> None:
        want = (*self.shape[:-1], self.groups)
        if tuple(self.scales.shape) != want or tuple(self.zeros.shape) != want:
            raise ShapeError(f"{name}: scales/zeros {list(self.scales.shape)}/{list(self.zeros.shape)}, "
                             f"expected {list(want)} for shape {list(self.shape)} and group {self.group}")
        unpack_bits(self.codes, self.bits, math.prod(self.shape))              # raises on a wrong byte count


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[..., cols] -> [..., ceil(cols / group), group]; a short last group is padded by repeating its last entry
    (which changes neither its min nor its max; padded entries are dropped again by ungrouped)."""
    pad = (-w.shape[-1]) % group
    if pad:
        w = torch.cat([w, w[..., -1:].expand(*w.shape[:-1], pad)], dim=-1)
    return w.reshape(*w.shape[:-1], w.shape[-1] // group, group)


def ungrouped(w: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of grouped: [..., groups, group] -> [..., cols]."""
    return w.reshape(*w.shape[:-2], w.shape[-2] * w.shape[-1])[..., :cols]


def minmax_params(w: torch.Tensor, levels: int, include_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) of each row of w [..., n] for codes 0..levels: scale >= (max - min) / levels after fp16
    rounding (so every entry is within scale / 2 of its code), integer zero = round(-min / scale)."""
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / levels).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s16 = scale.to(SCALE_DTYPE)
    s16 = torch.where(s16.float() < scale, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    zero = torch.round(-lo / s16.float()).clamp(0, levels)
    return s16, zero.to(SCALE_DTYPE)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes clamp(round(w / scale + zero), 0, levels), scale/zero broadcast against w; float tensor."""
    return torch.clamp(torch.round(w / scale.float() + zero.float()), 0, levels)


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """A QuantizedTensor from integer codes [..., rows, cols] and fp16 scales/zeros [..., rows, groups]."""
    return QuantizedTensor(pack_bits(codes.to(torch.int64), bits), scales.to(SCALE_DTYPE).contiguous(),
                           zeros.to(SCALE_DTYPE).contiguous(), tuple(codes.shape), bits, group)


def concat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """QuantizedTensors [n_k, ...] of the same trailing shape, bits and group -> one [sum n_k, ...]: their packed
    codes joined (repacked when a part does not end on a byte), scales and zeros concatenated."""
    first = parts[0]
    if any(p.shape[1:] != first.shape[1:] or p.bits != first.bits or p.group != first.group for p in parts):
        raise ShapeError("concat_rows: the parts differ in trailing shape, bits or group")
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    scales = torch.cat([p.scales for p in parts])
    zeros = torch.cat([p.zeros for p in parts])
    if all(math.prod(p.shape) * p.bits % 8 == 0 for p in parts[:-1]):
        codes = torch.cat([p.codes for p in parts])
    else:
        codes = pack_bits(torch.cat([p.integer_codes() for p in parts]), first.bits)
    return QuantizedTensor(codes, scales, zeros, shape, first.bits, first.group)
