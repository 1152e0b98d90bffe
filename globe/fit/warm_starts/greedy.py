"""Warm start `greedy`: residual greedy atoms (normalised residuals of the worst-fit experts, in batches, recoding
between) and K-SVD sweeps after the first coding; the streamed variants never hold an [N, r d] fp32 residual
(K-SVD keeps one residual in the targets' dtype). `hybrid` (globe.fit.warm_starts.hybrid) reuses both."""
from __future__ import annotations

import torch

from globe.fit.constants import KSVD_SWEEPS
from globe.fit.warm_starts.base import F4, ROWS, WarmStartInit, WarmStartOptions, encode, encode_seconds, register
from globe.fit.warm_starts.svd import svd_memory
from globe.progress import counter


def residual_atoms(x: torch.Tensor, atoms: torch.Tensor, m: int, gen: torch.Generator, options: WarmStartOptions,
                   batches: int = 8) -> torch.Tensor:
    """Residual greedy: add normalised residuals of the worst-fit experts in batches, recoding between."""
    bar = counter("greedy atoms", total=m)
    bar.update(min(atoms.shape[0], m))
    while atoms.shape[0] < m:
        res = x - encode(x, atoms, options)[0] @ atoms if atoms.shape[0] else x
        k = min(max((m - atoms.shape[0] + batches - 1) // batches, 1), m - atoms.shape[0], x.shape[0])
        worst = res.norm(dim=1).topk(k).indices
        new = res[worst] / res[worst].norm(dim=1, keepdim=True).clamp_min(1e-30)
        atoms = torch.cat([atoms, new])
        bar.update(new.shape[0])
    bar.close()
    return atoms[:m]


def ksvd_sweep(x: torch.Tensor, atoms: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One K-SVD sweep: rank-1 refit of every used atom on its users' residual (codes kept >= 0)."""
    atoms, codes = atoms.clone(), codes.clone()
    res = x - codes @ atoms
    for j in range(atoms.shape[0]):
        users = (codes[:, j] > 0).nonzero().squeeze(1)
        if users.numel() == 0:
            continue
        e = res[users] + codes[users, j, None] * atoms[j]                   # [u, D]
        a = e @ atoms[j]                                                    # power step from the old atom
        b = a @ e
        b = b / b.norm().clamp_min(1e-30)
        a = (e @ b).clamp_min(0)
        atoms[j], codes[users, j] = b, a
        res[users] = e - a[:, None] * b
    return atoms, codes


def _residual(x: torch.Tensor, atoms: torch.Tensor, codes: torch.Tensor | None, rows) -> torch.Tensor:
    """fp32 residual x[rows] - codes[rows] @ atoms (x[rows] itself without atoms)."""
    part = x[rows].float()
    return part if codes is None else part - codes[rows] @ atoms


def streamed_residual_atoms(x: torch.Tensor, atoms: torch.Tensor, m: int, gen: torch.Generator,
                            options: WarmStartOptions, batches: int = 8, *, encode=encode) -> torch.Tensor:
    """residual_atoms without the [N, r d] residual."""
    n = x.shape[0]
    atoms = atoms.float()
    bar = counter("greedy atoms", total=m)
    bar.update(min(atoms.shape[0], m))
    while atoms.shape[0] < m:
        codes = encode(x, atoms, options)[0] if atoms.shape[0] else None
        norms = torch.cat([_residual(x, atoms, codes, slice(lo, lo + ROWS)).norm(dim=1) for lo in range(0, n, ROWS)])
        k = min(max((m - atoms.shape[0] + batches - 1) // batches, 1), m - atoms.shape[0], n)
        worst = norms.topk(k).indices
        res = _residual(x, atoms, codes, worst)
        atoms = torch.cat([atoms, res / res.norm(dim=1, keepdim=True).clamp_min(1e-30)])
        bar.update(res.shape[0])
    bar.close()
    return atoms[:m]


def streamed_ksvd_sweep(x: torch.Tensor, atoms: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ksvd_sweep with the residual stored in x's dtype and each atom's users in chunks."""
    atoms, codes = atoms.clone(), codes.clone()
    n = x.shape[0]
    res = torch.empty_like(x)
    for lo in range(0, n, ROWS):
        res[lo:lo + ROWS] = _residual(x, atoms, codes, slice(lo, lo + ROWS)).to(res.dtype)
    for j in range(atoms.shape[0]):
        users = (codes[:, j] > 0).nonzero().squeeze(1)
        if users.numel() == 0:
            continue
        parts = users.split(ROWS)
        b = torch.zeros_like(atoms[j])
        for part in parts:                                                # power step from the old atom
            e = res[part].float() + codes[part, j, None] * atoms[j]
            b += (e @ atoms[j]) @ e
        b = b / b.norm().clamp_min(1e-30)
        for part in parts:
            e = res[part].float() + codes[part, j, None] * atoms[j]
            a = (e @ b).clamp_min(0)
            res[part] = (e - a[:, None] * b).to(res.dtype)
            codes[part, j] = a
        atoms[j] = b
    return atoms, codes


def greedy_rounds(m: int, start: int, batches: int = 8) -> list[int]:
    """Atom counts at each round of residual_atoms growing `start` atoms to m (hybrid: start = (m + 1) // 2)."""
    have, out = start, []
    while have < m:
        out.append(have)
        have += max((m - have + batches - 1) // batches, 1)
    return out


@register
class GreedyInit(WarmStartInit):
    name = "greedy"

    def first_atoms(self, x, m, gen, streamed: bool) -> torch.Tensor:
        """The atoms the residual rounds start from (greedy: none)."""
        return x.new_zeros(0, x.shape[1], dtype=torch.float32)

    def atoms(self, x, m, gen, options: WarmStartOptions, streamed: bool) -> torch.Tensor:
        residual = streamed_residual_atoms if streamed else residual_atoms
        return residual(x, self.first_atoms(x, m, gen, streamed), m, gen, options)

    sweep_label = "K-SVD sweeps"

    def sweeps(self, streamed: bool) -> list:
        return [streamed_ksvd_sweep if streamed else ksvd_sweep] * KSVD_SWEEPS

    def start(self, m: int) -> int:
        """Atoms made before the residual rounds."""
        return 0

    def memory(self, s, streamed: bool) -> int:
        dim, atoms, big = s.r * s.d, s.bank, s.n * s.r * s.d * F4
        if streamed:
            rows = min(ROWS, s.n) * dim * F4
            residual = atoms + 3 * rows + s.c * dim * F4
            sweep = 2 * atoms + s.targets() + 4 * rows
            return max(svd_memory(s, streamed), residual, sweep)
        return max(svd_memory(s, streamed), 2 * big + atoms, 2 * atoms + big + 3 * big)   # residual; K-SVD

    def seconds(self, s, q) -> float:
        nd, m = s.n * s.r * s.d, s.m
        residual = sum(4 * nd * a / q.bank + 5 * nd * 4 / q.stream for a in greedy_rounds(m, self.start(m)))
        sweeps = 2 * (2 * nd * m / q.bank + 6 * nd * 4 / q.stream + s.support * nd * 24 / q.stream)
        return residual + encode_seconds(s, q) + sweeps
