"""Refinement after alternating minimisation.

varpro_refine: variable projection. The adapters are eliminated exactly (A_i = argmin, batched Cholesky) and
L-BFGS optimises the bank and the code logits on the reduced objective sum_i ||W_i - A_i*(M) phi(M_i)||^2,
streamed over expert chunks. This converges where plain alternation stalls.
adam_refine: Adam on (bank, code logits, adapters) with the real phi, minibatches of experts, AMP and optional
gradient checkpointing of the mixer.
"""
from __future__ import annotations

import logging
import math

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from globe.errors import NumericalError
from globe.fit.adapters import PHI, refit_adapters
from globe.fit.config import FitConfig
from globe.fit.linalg import low_precision
from globe.fit.normalize import Normalizer
from globe.fit.sparse_coding import codes_to_logits, mapping

log = logging.getLogger(__name__)


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
        probs = mapping(self.method)(self.logits[sel] / self.temperature, dim=-1)
        return probs * self.log_gain[sel].exp()[:, None]


def _mix(codes: torch.Tensor, bank: torch.Tensor, phi: str) -> torch.Tensor:
    m, r, d = bank.shape
    return PHI[phi]((codes @ bank.reshape(m, r * d)).view(-1, r, d))


LBFGS_HISTORY_BYTES = 2 * 2**30   # L-BFGS keeps 2 fp32 vectors of all parameters per history entry


def lbfgs_history(numel: int, most: int = 20) -> int:
    """L-BFGS history length: `most`, fewer when the history would exceed LBFGS_HISTORY_BYTES (large banks)."""
    return int(max(3, min(most, LBFGS_HISTORY_BYTES // (8 * numel))))


def varpro_refine(weights: torch.Tensor, norm: Normalizer, bank: torch.Tensor, codes: torch.Tensor,
                  cfg: FitConfig, steps: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """L-BFGS on (bank, logits) with adapters projected out; returns (bank, codes, loss history)."""
    phi, ridge, n = cfg.bank.phi, cfg.train.ridge, weights.shape[0]
    low = low_precision(cfg.train.precision, weights.dtype, weights.shape[1], weights.shape[2], bank.device)
    bank = torch.nn.Parameter(bank.clone(memory_format=torch.contiguous_format))
    params = CodeParams(codes, temperature, cfg.sparsity.method, learn_gain=phi != "identity")
    total = float(n * weights.shape[1] * weights.shape[2])                   # ||W||^2 in unit-RMS space
    opt = torch.optim.LBFGS([bank, *params.parameters()], lr=1.0, max_iter=steps,
                            history_size=lbfgs_history(bank.numel() + params.logits.numel()),
                            tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    history: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.0
        for lo in range(0, n, cfg.train.chunk_size):
            hi = min(lo + cfg.train.chunk_size, n)
            w = norm.chunk(weights, lo, hi, bank.device)
            mixed = _mix(params(lo, hi), bank, phi)                            # [c, r, d]
            with torch.no_grad():
                adapters = refit_adapters(w, mixed, ridge, low).adapters      # envelope: A* held fixed
            part = (w - adapters @ mixed).square().sum() / total
            part.backward()
            loss += float(part.detach())
        if not math.isfinite(loss):
            raise NumericalError("NaN/Inf in variable-projection refinement (try a larger train.ridge)")
        history.append(loss ** 0.5)
        return torch.tensor(loss, device=bank.device)

    opt.step(closure)
    with torch.no_grad():
        out_codes = params()
        out_codes = torch.where(out_codes >= cfg.sparsity.eps * out_codes.amax(-1, keepdim=True), out_codes,
                                torch.zeros_like(out_codes))
    log.info("varpro: %d evaluations, rel_err %.5f -> %.5f", len(history), history[0], history[-1])
    return bank.detach(), out_codes.detach(), history


def adam_refine(weights: torch.Tensor, norm: Normalizer, bank: torch.Tensor, codes: torch.Tensor,
                adapters: torch.Tensor, cfg: FitConfig, temperature: float, gen: torch.Generator):
    """Adam on (bank, logits, adapters) with minibatches of experts; adapters in the normalised space.

    Returns (bank, codes, adapters, loss history). AMP: bf16 autocast, or fp16 autocast with a GradScaler.
    """
    t, phi, n = cfg.train, cfg.bank.phi, weights.shape[0]
    dev = bank.device
    bank = torch.nn.Parameter(bank.clone(memory_format=torch.contiguous_format))
    adapters = torch.nn.Parameter(adapters.clone(memory_format=torch.contiguous_format))
    params = CodeParams(codes, temperature, cfg.sparsity.method, learn_gain=phi != "identity")
    opt = torch.optim.Adam([bank, adapters, *params.parameters()], lr=t.refine_lr)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
    scaler = torch.amp.GradScaler(dev.type, enabled=t.amp == "fp16")
    numel = weights.shape[1] * weights.shape[2]
    history: list[float] = []
    for _ in tqdm(range(t.refine_steps), desc="refine", leave=False, disable=not log.isEnabledFor(logging.INFO)):
        idx = torch.randperm(n, generator=gen)[: t.refine_batch].sort().values.to(dev)
        w = weights[idx.cpu()].to(dev, torch.float32) / norm.scales[idx.cpu()].to(dev)[:, None, None]
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            mix = (lambda c, b: _mix(c, b, phi))
            mixed = checkpoint(mix, params(index=idx), bank, use_reentrant=False) if t.grad_checkpoint \
                else mix(params(index=idx), bank)
            recon = adapters[idx] @ mixed
        loss = (w - recon.float()).square().sum() / (idx.numel() * numel)
        if not torch.isfinite(loss):
            raise NumericalError("NaN/Inf in Adam refinement (lower train.refine_lr or use amp=none)")
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        history.append(float(loss.detach()) ** 0.5)
    with torch.no_grad():
        out_codes = params()
    return bank.detach(), out_codes, adapters.detach(), history
