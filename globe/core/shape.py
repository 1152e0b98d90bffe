"""BankShape: the shape of one family's bank, m atoms and a rank per layer (room for one per expert).

    shape = BankShape(m=16, ranks=(32, 24, 32, 8))    # 4 MoE layers; the bank is [m, r_max, d] = [16, 32, d]
    shape.params(experts=(8, 8, 8, 8), p=64, d=96, nnz=...)

Layer l (the l-th MoE layer of the family, in layer order) uses the first ranks[l] rows of every atom, so the bank
stays one global [m, r_max, d] tensor and each of its experts' adapters is [p, ranks[l]]. A uniform rank is the
special case ranks = (r,) * layers. Parameter accounting lives here so that the budget solver, the artifact, the
runtime and the reports count the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BankShape:
    m: int                        # atoms
    ranks: tuple[int, ...]        # rank per MoE layer (in layer order), each in 1..r_max; all 0: no base (a plain
                                  # family, globe.fit.engine.plain: empty bank and adapters)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        baseless = bool(self.ranks) and max(self.ranks) == 0
        if self.m < 1 or not self.ranks or (min(self.ranks) < 1 and not baseless):
            raise ValueError(f"BankShape needs m >= 1 and ranks >= 1 per layer (or all 0: no base), got m={self.m}, "
                             f"ranks={self.ranks}")

    @classmethod
    def uniform(cls, m: int, r: int, layers: int) -> BankShape:
        return cls(m, (r,) * layers)

    @property
    def r_max(self) -> int:
        return max(self.ranks)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.ranks)) == 1

    def bank_params(self, d: int) -> int:
        return self.m * self.r_max * d

    def adapter_params(self, experts: tuple[int, ...], p: int) -> int:
        """sum over layers of E_l * p * r_l; experts: experts per layer, in the order of ranks."""
        if len(experts) != len(self.ranks):
            raise ValueError(f"{len(experts)} layers of experts for {len(self.ranks)} ranks")
        return sum(e * p * r for e, r in zip(experts, self.ranks))

    def params(self, experts: tuple[int, ...], p: int, d: int, nnz: int) -> int:
        """Stored parameters of the family: bank m*r_max*d + adapters sum_l E_l*p*r_l + non-zero codes + N scales."""
        return self.bank_params(d) + self.adapter_params(experts, p) + nnz + sum(experts)

    def expert_ranks(self, layer_index: torch.Tensor) -> torch.Tensor:
        """[N] rank of each expert from its layer position [N] (0..layers-1)."""
        return torch.tensor(self.ranks, dtype=torch.long)[layer_index.long()]

    def to_dict(self) -> dict:
        return {"m": self.m, "ranks": list(self.ranks)}


def rank_mask(ranks: torch.Tensor, r_max: int) -> torch.Tensor:
    """[N, r_max] bool: column c of expert i is used (c < ranks[i])."""
    return torch.arange(r_max).unsqueeze(0) < ranks.unsqueeze(1)
