"""Parameter accounting of one family: what GloBE stores against what the dense experts hold."""
from __future__ import annotations


def stored_params(n: int, p: int, d: int, m: int, r: int, nnz: int) -> int:
    """Stored parameters of one family: bank m*r*d + adapters N*p*r + non-zero codes + N scales."""
    return m * r * d + n * p * r + nnz + n


def dense_params(n: int, p: int, d: int) -> int:
    return n * p * d
