"""The one parametrisation of the sparse codes that the gradient solvers optimise: alpha_i = g_i * map(l_i / T).

map is the fit's sparse mapping (entmax15 / sparsemax, globe.fit.solvers.sparse_coding.mapping), l_i the logits,
T the temperature and g_i = exp(log_gain_i) the expert's code sum (learned for a nonlinear phi). Variable
projection (globe.fit.solvers.varpro), its lean form (globe.fit.solvers.lean_varpro, the same parameters laid
out in one flat vector) and Adam (globe.fit.solvers.adam) all use `code_values`.
"""
from __future__ import annotations

import torch

from globe.fit.solvers.sparse_coding import codes_to_logits, mapping


def code_values(logits: torch.Tensor, log_gain: torch.Tensor, temperature: float, method: str) -> torch.Tensor:
    """alpha = exp(log_gain) * mapping(logits / T): logits [c, m], log_gain [c] -> [c, m]."""
    probs = mapping(method)(logits / temperature, dim=-1)
    return probs * log_gain.exp()[:, None]


class CodeParams(torch.nn.Module):
    """Codes alpha_i = g_i * mapping(logits_i / T) with a learned gain g_i (kept at 1 for identity phi)."""

    def __init__(self, codes: torch.Tensor, temperature: float, method: str, learn_gain: bool) -> None:
        super().__init__()
        logits, sums = codes_to_logits(codes, temperature, method)
        self.logits = torch.nn.Parameter(logits.contiguous())                                    # [N, m]
        self.log_gain = torch.nn.Parameter(sums.log(), requires_grad=learn_gain)      # [N]
        self.temperature, self.method = temperature, method

    def forward(self, lo: int = 0, hi: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        sel = index if index is not None else slice(lo, hi)
        return code_values(self.logits[sel], self.log_gain[sel], self.temperature, self.method)
