"""What a fit returns and an artifact holds: each family's bank, codes, adapters and metrics (FamilyFit), and
all families of a model with their provenance (FitResult). Plain tensors; fit never writes files."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from globe.core.mixing import compose
from globe.core.params import dense_params, stored_params
from globe.core.shape import BankShape, rank_mask
from globe.quant.tensor import QuantizedTensor

if TYPE_CHECKING:                     # annotation only: the fit config is the fit layer's
    from globe.fit.config import FitConfig


@dataclass
class FamilyFit:
    """One family's bank, codes and adapters (z-score scales already folded into the adapters)."""

    family: str
    bank: torch.Tensor       # [m, r, d] unit-Frobenius atoms, shared by every layer
    codes: torch.Tensor      # [N, m] sparse codes (non-negative; real with nonlinear.signed_codes)
    adapters: torch.Tensor   # [N, p, r_max]; an expert of layer l uses columns :r_l, the rest are zero
    scales: torch.Tensor     # [N] z-score scale recorded at normalisation (folded into adapters)
    ids: torch.Tensor        # [N, 2] (layer, expert)
    phi: str = "identity"
    metrics: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=dict)   # per phase: am / varpro / refine
    ranks: tuple[int, ...] | None = None   # rank per MoE layer (layer order of ids); None: r_max everywhere
    quant: dict[str, QuantizedTensor] = field(default_factory=dict)   # stored parts ("bank", "adapters") when the
                                     # factors are quantized; bank / adapters then hold their dequantized values;
                                     # "residual" [N, p, d]: W_i - A_i tilde_B_i quantized, added to every W_hat_i

    @property
    def shape(self) -> dict[str, int]:
        """N, p, d, m, r (= r_max), plus `ranks` (per MoE layer) when they differ."""
        (m, r, d), (n, p, _) = self.bank.shape, self.adapters.shape
        out = {"N": n, "p": p, "d": d, "m": m, "r": r}
        if self.ranks is not None and len(set(self.ranks)) > 1:
            out["ranks"] = list(self.ranks)
        return out

    @property
    def layers(self) -> list[int]:
        """The MoE layers of this family, in order (positions index `ranks`)."""
        return sorted({int(l) for l in self.ids[:, 0].tolist()})

    @property
    def bank_shape(self) -> BankShape:
        ranks = self.ranks if self.ranks is not None else (self.bank.shape[1],) * len(self.layers)
        return BankShape(self.bank.shape[0], ranks)

    def layer_position(self) -> torch.Tensor:
        """[N] position of each expert's layer among `layers`."""
        return torch.searchsorted(torch.tensor(self.layers), self.ids[:, 0].long().contiguous())

    def layer_rank(self) -> dict[int, int]:
        """MoE layer -> its rank."""
        return dict(zip(self.layers, self.bank_shape.ranks))

    def experts_per_layer(self) -> tuple[int, ...]:
        return tuple(torch.bincount(self.layer_position(), minlength=len(self.layers)).tolist())

    def with_ranks(self, ranks: tuple[int, ...]) -> FamilyFit:
        """This fit truncated to `ranks` per layer (each <= r_max): adapter columns past r_l set to zero."""
        shape = BankShape(self.bank.shape[0], ranks)
        keep = rank_mask(shape.expert_ranks(self.layer_position()), self.bank.shape[1])     # [N, r_max]
        return replace(self, adapters=self.adapters * keep.unsqueeze(1).to(self.adapters.dtype),
                       ranks=None if shape.is_uniform and shape.r_max == self.bank.shape[1] else shape.ranks)

    def mixed(self, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """tilde_B_i = phi(sum_j alpha_ij B_j) for the selected experts: [n, r, d]."""
        return compose(self.codes[index], self.bank, self.phi)

    def reconstruct(self, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """W_hat_i = A_i tilde_B_i (+ the dequantized residual R_i when the fit stores one) for the selected experts:
        [n, p, d] (fp32)."""
        out = self.adapters[index].float() @ self.mixed(index).float()
        if "residual" in self.quant:
            out = out + self.quant["residual"].rows(index)
        return out

    def param_count(self) -> dict[str, int]:
        s, shape, experts = self.shape, self.bank_shape, self.experts_per_layer()
        nnz = int((self.codes != 0).sum())
        stored = shape.params(experts, s["p"], s["d"], nnz)
        return {"bank": shape.bank_params(s["d"]), "adapters": shape.adapter_params(experts, s["p"]), "codes_nnz": nnz,
                "scales": s["N"], "stored": stored, "dense": dense_params(s["N"], s["p"], s["d"])}


@dataclass
class FitResult:
    """All fitted families of a model plus the provenance needed to apply them."""

    families: dict[str, FamilyFit]
    config: FitConfig
    source: dict[str, Any] = field(default_factory=dict)   # model dir, model_type, inventory, hash
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, fam in self.families.items():
            counts = fam.param_count()
            out[name] = counts["stored"]
            out[f"dense_{name}"] = counts["dense"]
        return out

    @property
    def metrics(self) -> dict[str, dict]:
        return {name: fam.metrics for name, fam in self.families.items()}
