"""Per-expert z-score normalisation of a family: scales recorded, fitted in unit-RMS space, folded back."""
from __future__ import annotations

from dataclasses import dataclass

import logging

import torch

from globe.errors import NumericalError
from globe.fit.costs import F8, declare_cost

log = logging.getLogger(__name__)


@dataclass
class Normalizer:
    """Per-expert statistics of W [N, p, d]: mean and RMS scale (the fit divides by `scales`)."""

    means: torch.Tensor    # [N]
    stds: torch.Tensor     # [N]
    scales: torch.Tensor   # [N] RMS = sqrt(mean^2 + std^2); what W_i is divided by
    sq_norms: torch.Tensor  # [N] ||W_i||_F^2 in the original space (fp64)

    @classmethod
    def fit(cls, weights: torch.Tensor, chunk_size: int = 64, names: list[str] | None = None) -> "Normalizer":
        """Statistics of weights [N, p, d] (any float dtype), computed chunk by chunk in fp64."""
        n = weights.shape[0]
        means, sq = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
        for lo in range(0, n, chunk_size):
            w = weights[lo:lo + chunk_size].to(torch.float64)          # [c, p, d]
            means[lo:lo + w.shape[0]] = w.mean((1, 2))
            sq[lo:lo + w.shape[0]] = w.square().sum((1, 2))
        if not bool(torch.isfinite(sq).all()):
            i = int((~torch.isfinite(sq)).nonzero()[0])
            where = names[i] if names else f"expert {i}"
            raise NumericalError(f"NaN/Inf in weights of {where}: fix or drop that checkpoint tensor")
        numel = weights.shape[1] * weights.shape[2]
        rms = (sq / numel).sqrt()
        stds = (rms.square() - means.square()).clamp_min(0).sqrt()
        dead = rms == 0
        if bool(dead.any()):            # a dead (all-zero) expert: fitted as it is, its adapters fold back to 0
            where = [names[i] if names else f"expert {i}" for i in dead.nonzero().flatten().tolist()]
            log.warning("%d all-zero (dead) expert(s): %s%s; they are stored with trivial (zero) factors",
                        len(where), ", ".join(where[:3]), " ..." if len(where) > 3 else "")
        scales = torch.where(dead, torch.ones_like(rms), rms)          # dead: fitted unscaled (stays 0)
        return cls(means=means.float(), stds=stds.float(), scales=scales.float(), sq_norms=sq)

    def chunk(self, weights: torch.Tensor, lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Normalised fp32 copy of experts lo:hi: [c, p, d]."""
        w = weights[lo:hi].to(device=device, dtype=torch.float32)
        return w / self.scales[lo:hi].to(device)[:, None, None]

    def fold(self, adapters: torch.Tensor, lo: int = 0, inplace: bool = False) -> torch.Tensor:
        """Adapters [c, p, r] of the normalised fit -> adapters of the original weights (inplace: into the
        given tensor, no second [c, p, r] copy)."""
        c = adapters.shape[0]
        scales = self.scales[lo:lo + c].to(adapters.device, adapters.dtype)[:, None, None]
        return adapters.mul_(scales) if inplace else adapters * scales


def normalize_memory(s) -> int:
    """Normalizer.fit: one chunk's fp64 copy and the square of that (the stored chunk comes from the reader's
    buffers, outside torch's allocator: not counted, as traced_peak does not see it)."""
    return s.c * s.p * s.d * 2 * F8


def normalize_seconds(s, q) -> float:
    """Normalizer.fit: one read of the family and its fp64 squared norms."""
    npd = s.n * s.p * s.d
    return npd * s.stored_bytes / q.read_bps + npd * (s.stored_bytes + 24) / q.stream64


declare_cost("normalize", normalize_memory, normalize_seconds)
