"""MOD dictionary update: B = (alpha^T alpha + lambda I)^-1 alpha^T Y accumulated over expert chunks,
then unit-Frobenius atoms with the codes rescaled so that alpha @ B is unchanged."""
from __future__ import annotations

import torch

from globe.device import acc_dtype
from globe.fit.constants import MOD_CG_ITERS, MOD_CG_RTOL
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.solvers.linalg import cond_from_cholesky, ridge_cholesky, solve_left


class ModAccumulator:
    """Accumulates the m x m normal equations of the dictionary update over chunks of experts."""

    def __init__(self, m: int, r: int, d: int, device: torch.device | str = "cpu") -> None:
        self.shape = (m, r, d)
        self.ata = torch.zeros(m, m, dtype=acc_dtype(device), device=device)  # sum_i alpha_i alpha_i^T
        self.aty = torch.zeros(m, r * d, dtype=torch.float32, device=device)  # sum_i alpha_i Y_i

    def add(self, codes: torch.Tensor, targets: torch.Tensor) -> None:
        """codes [c, m], targets [c, r, d] (fp32)."""
        self.ata += codes.T.to(self.ata.dtype) @ codes.to(self.ata.dtype)
        self.aty.addmm_(codes.T, targets.flatten(1))

    def solve(self, ridge: float, previous: torch.Tensor | None = None,
              comm: Comm = LOCAL) -> tuple[torch.Tensor, float]:
        """New bank [m, r, d] and the condition number of the system. Unused atoms keep `previous`.
        Distributed, the per-rank sums are all-reduced first."""
        comm.all_reduce(self.ata)
        comm.all_reduce(self.aty)
        chol = ridge_cholesky(self.ata, ridge)
        bank = solve_left(chol, self.aty.to(self.ata.dtype)).float().view(self.shape)
        if previous is not None:
            unused = self.ata.diagonal() <= 0
            bank[unused] = previous[unused]
        return bank, float(cond_from_cholesky(chol))


def normalize_atoms(bank: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-Frobenius atoms; codes [N, m] scaled by the atom norms so codes @ bank is unchanged."""
    norms = bank.flatten(1).norm(dim=1).clamp_min(1e-30)                    # [m]
    return bank / norms[:, None, None], codes * norms[None, :]


def weighted_apply(bank: torch.Tensor, codes: torch.Tensor, grams: torch.Tensor, chunk: int,
                   comm: Comm = LOCAL) -> torch.Tensor:
    """H(B)_j = sum_i alpha_ij G_i (sum_k alpha_ik B_k): the weighted MOD operator (summed over every rank's
    experts). Returns [m, r, d]."""
    m, r, d = bank.shape
    flat = bank.reshape(m, r * d)
    out = torch.zeros(m, r * d, dtype=bank.dtype, device=bank.device)
    for lo in range(0, codes.shape[0], chunk):
        c = codes[lo:lo + chunk]
        mixed = (c @ flat).view(-1, r, d)                                   # [c, r, d]
        out.addmm_(c.T, (grams[lo:lo + chunk] @ mixed).reshape(c.shape[0], -1))
    return comm.all_reduce(out).view(m, r, d)


APPLY_BYTES = 2**28      # fp32 mixed atoms [chunk, r, d] of one step of weighted_apply (large banks: fewer experts)


def apply_chunk(r: int, d: int, most: int = 256) -> int:
    """Experts per step of weighted_apply: `most`, fewer when their mixed atoms would exceed APPLY_BYTES."""
    return int(max(1, min(most, APPLY_BYTES // (4 * r * d))))


def weighted_mod(codes: torch.Tensor, grams: torch.Tensor, rhs: torch.Tensor, bank0: torch.Tensor, ridge: float,
                 iters: int = MOD_CG_ITERS, chunk: int | None = None, comm: Comm = LOCAL,
                 overwrite_rhs: bool = False) -> tuple[torch.Tensor, int, float]:
    """Exact dictionary update under the true objective sum_i ||W_i - A_i alpha_i B||^2 with A fixed.

    Solves sum_i alpha_ij G_i M_i(B) + lambda B_j = rhs_j (rhs_j = sum_i alpha_ij A_i^T W_i) by preconditioned
    CG started at bank0, so every iterate lowers the quadratic. Preconditioner: (alpha^T alpha) x diag(mean G).
    codes [N, m], grams [N, r, r], rhs/bank0 [m, r, d]. Returns (bank, CG iterations, cond of alpha^T alpha).
    Distributed: codes/grams are this rank's experts, rhs/bank0 already summed / identical on every rank.
    overwrite_rhs: rhs's storage becomes the CG residual (one bank-sized vector fewer; rhs is garbage after).
    """
    m, r, d = bank0.shape
    chunk = apply_chunk(r, d) if chunk is None else chunk
    acc = acc_dtype(codes.device)                                          # float64 (float32 on MPS)
    ata = comm.all_reduce(codes.T.to(acc) @ codes.to(acc))
    gbar = comm.mean_rows(grams.to(acc))
    lam = ridge * float(ata.diagonal().mean() * gbar.diagonal().mean()) + 1e-30
    chol_left = ridge_cholesky(ata, max(ridge, 1e-8))
    cond = float(cond_from_cholesky(chol_left))
    inv_left = torch.cholesky_inverse(chol_left).float()                                # [m, m]
    inv_diag = (1.0 / gbar.diagonal().clamp_min(1e-30)).float()[None, :, None]            # [1, r, 1]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return weighted_apply(x, codes, grams, chunk, comm).add_(x, alpha=lam)   # in place: no [m, r, d] temporaries

    def precond(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty_like(x)
        torch.matmul(inv_left, x.reshape(m, r * d), out=out.view(m, r * d))  # (alpha^T alpha)^-1 over atoms
        return out.mul_(inv_diag)                                           # diag(mean G)^-1 over atom rows

    x = bank0.clone()
    norm0 = float(rhs.norm()) + 1e-30
    res = rhs.sub_(apply(x)) if overwrite_rhs else apply(x).neg_().add_(rhs)   # rhs - H(x)
    z = precond(res)
    direction, rz = z.clone(), float(torch.vdot(res.flatten(), z.flatten()))
    for it in range(iters):
        if float(res.norm()) <= MOD_CG_RTOL * norm0:
            return x, it, cond
        hd = apply(direction)
        step = rz / max(float(torch.vdot(direction.flatten(), hd.flatten())), 1e-30)
        x.add_(direction, alpha=step)
        res.sub_(hd, alpha=step)
        del hd
        z = precond(res, out=z)                                             # in place: z is not needed any more
        rz_new = float(torch.vdot(res.flatten(), z.flatten()))
        direction.mul_(rz_new / max(rz, 1e-30)).add_(z)
        rz = rz_new
    return x, iters, cond

