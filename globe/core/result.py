"""What a fit returns and an artifact holds: each family's bank, codes, adapters and metrics (FamilyFit), and
all families of a model with their provenance (FitResult). Plain tensors; fit never writes files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from globe.core.mixing import compose
from globe.core.params import dense_params, stored_params
from globe.quant.tensor import QuantizedTensor

if TYPE_CHECKING:                     # annotation only: the fit config is the fit layer's
    from globe.fit.config import FitConfig


@dataclass
class FamilyFit:
    """One family's bank, codes and adapters (z-score scales already folded into the adapters)."""

    family: str
    bank: torch.Tensor       # [m, r, d] unit-Frobenius atoms, shared by every layer
    codes: torch.Tensor      # [N, m] sparse codes (non-negative; real with nonlinear.signed_codes)
    adapters: torch.Tensor   # [N, p, r]
    scales: torch.Tensor     # [N] z-score scale recorded at normalisation (folded into adapters)
    ids: torch.Tensor        # [N, 2] (layer, expert)
    phi: str = "identity"
    metrics: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=dict)   # per phase: am / varpro / refine
    quant: dict[str, QuantizedTensor] = field(default_factory=dict)   # stored parts ("bank", "adapters") when the
                                     # factors are quantized; bank / adapters then hold their dequantized values

    @property
    def shape(self) -> dict[str, int]:
        (m, r, d), (n, p, _) = self.bank.shape, self.adapters.shape
        return {"N": n, "p": p, "d": d, "m": m, "r": r}

    def mixed(self, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """tilde_B_i = phi(sum_j alpha_ij B_j) for the selected experts: [n, r, d]."""
        return compose(self.codes[index], self.bank, self.phi)

    def reconstruct(self, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """W_hat_i = A_i tilde_B_i for the selected experts: [n, p, d] (fp32)."""
        return self.adapters[index].float() @ self.mixed(index).float()

    def param_count(self) -> dict[str, int]:
        s = self.shape
        nnz = int((self.codes != 0).sum())
        stored = stored_params(s["N"], s["p"], s["d"], s["m"], s["r"], nnz)
        return {"bank": s["m"] * s["r"] * s["d"], "adapters": s["N"] * s["p"] * s["r"], "codes_nnz": nnz,
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
