"""QuantConfig: how a tensor is quantized (method, bits, group size and the method's knobs), with a format version.

Weight-only, asymmetric, one fp16 scale and one fp16 zero point per group of `group` consecutive entries along the
LAST axis (the input dimension of a weight [out, in]): w ~= (q - zero) * scale, q in 0 .. 2**bits - 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from globe.errors import ConfigError

QUANT_FORMAT_VERSION = 1
BITS = (2, 3, 4, 8)


@dataclass
class QuantConfig:
    """One quantizer's settings; `method` names an entry of globe.quant.QUANTIZERS."""

    method: str = "gptq"       # rtn | gptq | hqq
    bits: int = 4              # 2, 3, 4 or 8
    group: int = 64            # entries per scale / zero pair, along the last (input) axis
    damp: float = 0.01         # gptq: ridge added to H, as a fraction of its mean diagonal
    block: int = 128           # gptq: columns per lazy batch update (rounded up to a multiple of group)
    iters: int = 20            # hqq: half-quadratic iterations
    lp: float = 0.7            # hqq: the p of the l_p error it minimises
    beta: float = 10.0         # hqq: start of the penalty weight
    kappa: float = 1.01        # hqq: growth of beta per iteration
    format_version: int = QUANT_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"quantization bits={self.bits} is not supported: use one of {BITS}")
        if self.group < 1:
            raise ConfigError(f"quantization group={self.group} must be a positive number of entries")
        if not 0 <= self.damp < 1e3 or self.block < 1 or self.iters < 0 or not 0 < self.lp <= 1:
            raise ConfigError(f"quantization config out of range: damp={self.damp}, block={self.block}, "
                              f"iters={self.iters}, lp={self.lp}")
        if not 1 <= self.format_version <= QUANT_FORMAT_VERSION:
            raise ConfigError(f"quantization format_version {self.format_version}: this globe reads "
                              f"1..{QUANT_FORMAT_VERSION}")

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"quantization config has unknown key(s) {', '.join(unknown)}")
        return cls(**data)
