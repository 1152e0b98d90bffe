"""PackedTensor: a quantized factor (globe.quant.QuantizedTensor) held by the runtime as three buffers, dequantized
on use.

    part = PackedTensor.from_quantized(qt, method="gptq")      # buffers codes uint8, scales / zeros fp16
    w = part.dequantize()                                       # [*shape] fp32, bit-identical to qt.dequantize()
    rows = part.rows(torch.tensor([3, 5]))                      # [2, *shape[1:]]: only those rows unpacked
    parts = FactorParts({"gate": part, "up": nn.Parameter(...)})  # what GlobeExperts.bank / .adapters are

The buffers are the stored form (state keys `<name>.codes`, `<name>.scales`, `<name>.zeros`: what a compressed
checkpoint holds and save_pretrained writes back); the shape, bits, group and method are plain attributes (the
checkpoint's quantization_config records them). The buffers are frozen: nothing trains them (see
globe.runtime.experts). Unpacking runs on the buffers' device; with 2, 4 or 8 bits on uint8 directly, with 3 bits
through globe.quant.unpack_bits.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from globe.quant.packing import packed_bytes, unpack_bits
from globe.quant.tensor import SCALE_DTYPE, QuantizedTensor, grouped, pack, ungrouped

PACKED_PARTS: tuple[str, ...] = ("codes", "scales", "zeros")      # buffer names = state key suffixes


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Packed uint8 [packed_bytes(count, bits)] -> codes [count] on the same device (uint8 for 2/4/8 bits)."""
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)          # low bits first
        codes = (packed.unsqueeze(1) >> shifts) & (2 ** bits - 1)                           # [bytes, per_byte]
        return codes.reshape(-1)[:count] if per_byte > 1 else packed[:count]
    return unpack_bits(packed.cpu(), bits, count).to(packed.device)


class PackedTensor(nn.Module):
    """One quantized tensor of shape `shape` (groups of `group` entries along the last axis) as buffers."""

    def __init__(self, shape: tuple[int, ...], bits: int, group: int, method: str | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.shape, self.bits, self.group, self.method = tuple(int(s) for s in shape), int(bits), int(group), method
        groups = math.ceil(self.shape[-1] / self.group)
        self.register_buffer("codes", torch.zeros(packed_bytes(math.prod(self.shape), self.bits), dtype=torch.uint8,
                                                  device=device))
        self.register_buffer("scales", torch.zeros(*self.shape[:-1], groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.zeros(*self.shape[:-1], groups, dtype=SCALE_DTYPE, device=device))

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, method: str | None = None,
                       device: torch.device | str | None = None) -> PackedTensor:
        out = cls(qt.shape, qt.bits, qt.group, method, device="meta")
        out.codes, out.scales, out.zeros = (t.detach().to(device) for t in (qt.codes, qt.scales, qt.zeros))
        return out

    def quantized(self) -> QuantizedTensor:
        """The same tensor as a QuantizedTensor (on the CPU)."""
        return QuantizedTensor(self.codes.cpu(), self.scales.cpu(), self.zeros.cpu(), self.shape, self.bits,
                               self.group)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))

    @property
    def row_bytes(self) -> int | None:
        """Packed bytes of one row of the leading axis when every row starts on a byte (else None)."""
        bits = math.prod(self.shape[1:]) * self.bits
        return bits // 8 if bits % 8 == 0 else None

    def _dequantize(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    shape: tuple[int, ...]) -> torch.Tensor:
        """(q - zero) * scale in fp32, exactly as QuantizedTensor.dequantize computes it."""
        q = grouped(codes.view(shape).float(), self.group)                       # [..., groups, group]
        w = (q - zeros.float()[..., None]) * scales.float()[..., None]
        return ungrouped(w, shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[*shape] in `dtype` (computed in fp32); served from the kept copy while `keep` is on (see keep_dequantized)."""
        stamp = (dtype, *((id(t), t._version, t.device) for t in (self.codes, self.scales, self.zeros)))
        kept = self.__dict__.get("_kept")
        if kept is not None and kept[0] == stamp:
            return kept[1]
        codes = unpack_codes(self.codes, self.bits, math.prod(self.shape))
        out = self._dequantize(codes, self.scales, self.zeros, self.shape).to(dtype)
        if self.__dict__.get("keep"):
            self.__dict__["_kept"] = (stamp, out)
        return out

    def keep_dequantized(self, on: bool) -> None:
        """Keep the last dequantized copy (the cached mode's shared bank: one copy for every layer, counted with
        the caches), recomputed when the buffers change; off drops it."""
        self.__dict__["keep"] = on
        if not on:
            self.__dict__.pop("_kept", None)

    def kept(self) -> torch.Tensor | None:
        """The kept dequantized copy, if any."""
        kept = self.__dict__.get("_kept")
        return None if kept is None else kept[1]

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `index` [U] of the leading axis dequantized: [U, *shape[1:]] in `dtype`; only their bytes are
        unpacked when rows start on bytes."""
        index = index.to(self.codes.device)
        step = self.row_bytes
        if step is None:
            return self.dequantize(dtype).index_select(0, index)
        packed = self.codes.view(self.shape[0], step).index_select(0, index).reshape(-1)
        shape = (index.numel(), *self.shape[1:])
        codes = unpack_codes(packed, self.bits, math.prod(shape))
        return self._dequantize(codes, self.scales.index_select(0, index), self.zeros.index_select(0, index),
                                shape).to(dtype)

    def _apply(self, fn, recurse: bool = True):          # noqa: ANN001 (torch's signature)
        """Moves (`.to(device)`, `.cuda()`) apply; dtype casts (`.half()`, `.to(torch.bfloat16)`) do not: the codes
        stay uint8 and the scales / zeros fp16, so the dequantized values never change."""
        for name in PACKED_PARTS:
            tensor = self._buffers[name]
            moved = fn(tensor)
            self._buffers[name] = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
        return self

    def meta(self) -> dict[str, object]:
        """bits / group / method: the quantization_config record of this part (the shape comes from m, r, k)."""
        return {"bits": self.bits, "group": self.group, "method": self.method}

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, bits={self.bits}, group={self.group}, method={self.method}"


def select_rows(qt: QuantizedTensor, rows: torch.Tensor, rank: int | None = None,
                codes: torch.Tensor | None = None) -> QuantizedTensor:
    """The rows `rows` [E] of a quantized [N, out, r] tensor (one layer's adapters), truncated to its first `rank`
    columns (a layer of rank r_l <= r): the same integer codes, scales and zeros, packed again. `codes`: qt's
    integer codes when already unpacked."""
    codes = qt.integer_codes() if codes is None else codes
    rank = qt.shape[-1] if rank is None else rank
    groups = math.ceil(rank / qt.group)
    part = codes.index_select(0, rows)[..., :rank]                                      # [E, out, r_l]
    return pack(part, qt.scales.index_select(0, rows)[..., :groups], qt.zeros.index_select(0, rows)[..., :groups],
                qt.bits, qt.group)


class FactorParts(nn.Module):
    """One factor (bank or adapters) per family: a Parameter (state key `<family>`) or a PackedTensor (state keys
    `<family>.codes` / `.scales` / `.zeros`). A `shared` packed part (the bank of every MoE layer but the first)
    is referenced, not registered: the first layer stores it, and moving that layer moves the one object."""

    def __init__(self, parts: dict[str, torch.Tensor | PackedTensor], shared: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self._shared: dict[str, PackedTensor] = {}
        for name, part in parts.items():
            if isinstance(part, PackedTensor) and name in shared:
                self._shared[name] = part
            else:
                self[name] = part

    def __getitem__(self, name: str) -> torch.Tensor | PackedTensor:
        if name in self._parameters:
            return self._parameters[name]
        if name in self._modules:
            return self._modules[name]
        return self._shared[name]

    def __setitem__(self, name: str, part: torch.Tensor | PackedTensor) -> None:
        if name in self._shared:
            self._shared[name] = part
        elif isinstance(part, PackedTensor):
            self.add_module(name, part)
        else:
            self.register_parameter(name, part)

    def __contains__(self, name: str) -> bool:
        return name in self._parameters or name in self._modules or name in self._shared

    def keys(self) -> list[str]:
        return [*self._parameters, *self._modules, *self._shared]

    def items(self) -> list[tuple[str, torch.Tensor | PackedTensor]]:
        """(family, part) pairs, as a ParameterDict gives them: a Parameter or a frozen PackedTensor."""
        return [(name, self[name]) for name in self.keys()]

    def is_stored(self, name: str) -> bool:
        return name not in self._shared
