"""Parameter accounting of one family: what GloBE stores against what the dense experts hold (a rank per layer:
globe.core.shape.BankShape.params; this is its uniform case)."""
from __future__ import annotations


def stored_params(n: int, p: int, d: int, m: int, r: int, nnz: int) -> int:
    """Stored parameters of one family with one rank r: bank m*r*d + adapters N*p*r + non-zero codes + N scales."""
    return m * r * d + n * p * r + nnz + n


def dense_params(n: int, p: int, d: int) -> int:
    return n * p * d
