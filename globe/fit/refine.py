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

from globe.errors import NumericalError
from globe.fit.adapters import PHI, refit_adapters
from globe.fit.config import FitConfig
from globe.fit.distributed import LOCAL, Comm
from globe.fit.linalg import low_precision
from globe.fit.normalize import Normalizer
from globe.fit.sparse_coding import codes_to_logits, mapping
from globe.progress import progress

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


class _Targets:
    """Normalised weight chunks, whitened (W_i L_i) and cached in fp32 when a whitener is given."""

    def __init__(self, weights: torch.Tensor, norm: Normalizer, device, whiten) -> None:
        self.weights, self.norm, self.device, self.whiten = weights, norm, device, whiten
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        if self.whiten is None:
            return self.norm.chunk(self.weights, lo, hi, self.device)
        if (lo, hi) not in self.cache:
            self.cache[lo, hi] = self.whiten(self.norm.chunk(self.weights, lo, hi, self.device), lo, hi)
        return self.cache[lo, hi]


LBFGS_HISTORY_BYTES = 2 * 2**30   # L-BFGS keeps 2 fp32 vectors of all parameters per history entry


def lbfgs_history(numel: int, most: int = 20) -> int:
    """L-BFGS history length: `most`, fewer when the history would exceed LBFGS_HISTORY_BYTES (large banks)."""
    return int(max(3, min(most, LBFGS_HISTORY_BYTES // (8 * numel))))


def uses_lean_varpro(bank_numel: int, logits_numel: int, whiten=None) -> bool:
    """Whether varpro_refine runs globe.fit.lean_varpro: for banks whose full 20-pair history does not fit
    LBFGS_HISTORY_BYTES (and no activation whitening)."""
    return whiten is None and lbfgs_history(bank_numel + logits_numel) < 20


def varpro_refine(weights: torch.Tensor, norm: Normalizer, bank: torch.Tensor, codes: torch.Tensor,
                  cfg: FitConfig, steps: int, temperature: float,
                  comm: Comm = LOCAL, whiten=None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """L-BFGS on (bank, logits) with adapters projected out; returns (bank, codes, loss history).

    Distributed: weights/norm/codes are this rank's experts. Every rank runs the same L-BFGS on the bank and on
    the logits of all experts (gathered: [N, m] is small); each rank evaluates its experts' loss terms, and the
    loss and gradients are summed over ranks, so the optimiser state stays identical everywhere.
    whiten(x, lo, hi) (a globe.fit.activation.Whitener) makes the objective sum_i ||(W_i - A_i M_i) L_i||^2;
    the whitened weights W_i L_i are then kept in fp32 for the run (N p d floats; single process only).
    Large banks (uses_lean_varpro) go to globe.fit.lean_varpro, which keeps a few flat vectors instead."""
    phi, ridge, n = cfg.bank.phi, cfg.train.ridge, weights.shape[0]
    start = (bank, codes)
    n_all = comm.total(n)
    if uses_lean_varpro(bank.numel(), n_all * bank.shape[0], whiten):
        from globe.fit.lean_varpro import lean_varpro
        return lean_varpro(weights, norm, bank, codes, cfg, steps, temperature, comm)
    offset = comm.shard(n_all)[0]
    low = low_precision(cfg.train.precision, weights.dtype, weights.shape[1], weights.shape[2], bank.device)
    bank = torch.nn.Parameter(bank.clone(memory_format=torch.contiguous_format))
    params = CodeParams(comm.all_gather_rows(codes, n_all), temperature, cfg.sparsity.method,
                        learn_gain=phi != "identity")
    targets = _Targets(weights, norm, bank.device, whiten)
    bounds = [(lo, min(lo + cfg.train.chunk_size, n)) for lo in range(0, n, cfg.train.chunk_size)]
    total = float(n_all * weights.shape[1] * weights.shape[2])               # ||W||^2 in unit-RMS space
    if whiten is not None:
        total = sum(float(targets(lo, hi).square().sum()) for lo, hi in bounds)
    opt = torch.optim.LBFGS([bank, *params.parameters()], lr=1.0, max_iter=steps,
                            history_size=lbfgs_history(bank.numel() + params.logits.numel()),
                            tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    history: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.0
        for lo, hi in bounds:
            w = targets(lo, hi)                                                # [c, p, d] (whitened)
            mixed = _mix(params(offset + lo, offset + hi), bank, phi)          # [c, r, d]
            if whiten is not None:
                mixed = whiten(mixed, lo, hi)
            with torch.no_grad():
                adapters = refit_adapters(w, mixed, ridge, low).adapters      # envelope: A* held fixed
            part = (w - adapters @ mixed).square().sum() / total
            part.backward()
            loss += float(part.detach())
        loss = comm.all_reduce_float(loss)
        comm.all_reduce_grads([bank, *params.parameters()])
        if not math.isfinite(loss):
            raise NumericalError("NaN/Inf in variable-projection refinement (try a larger train.ridge)")
        history.append(loss ** 0.5)
        return torch.tensor(loss, device=bank.device)

    try:
        opt.step(closure)
    except NumericalError as exc:
        log.warning("%s: rolled back to the state before variable projection", exc)
        return start[0], start[1], history[:1]                    # the first evaluation is at the start point
    with torch.no_grad():
        out_codes = params(offset, offset + n)
        out_codes = torch.where(out_codes >= cfg.sparsity.eps * out_codes.amax(-1, keepdim=True), out_codes,
                                torch.zeros_like(out_codes))
    log.info("varpro: %d evaluations, rel_err %.5f -> %.5f", len(history), history[0], history[-1])
    return bank.detach(), out_codes.detach(), history


class DivergenceGuard:
    """Snapshots of the parameters at good points of an optimisation; on a NaN/Inf loss or a loss far above the
    best seen, restores the last snapshot with a warning, halves the learning rate and carries on (up to
    `max_rollbacks` times). Minibatch losses are noisy, so "far above" means `factor` x the best."""

    def __init__(self, tensors: list[torch.Tensor], opt: torch.optim.Optimizer, every: int = 20,
                 factor: float = 4.0, max_rollbacks: int = 3) -> None:
        self.tensors, self.opt, self.every, self.factor, self.max_rollbacks = tensors, opt, every, factor, max_rollbacks
        self.best, self.rollbacks, self.snapshot_loss = math.inf, 0, math.inf
        self.snapshot = [x.detach().clone() for x in tensors]

    @property
    def exhausted(self) -> bool:
        return self.rollbacks >= self.max_rollbacks

    def check(self, loss: float, step: int) -> bool:
        """True if the step may proceed; False after a rollback."""
        if math.isfinite(loss) and loss <= self.factor * self.best:
            if loss < self.best:
                self.best = loss
            if step % self.every == 0 and loss <= self.best * 1.5:
                self._take(loss)
            return True
        self.rollbacks += 1
        self._restore()
        for group in self.opt.param_groups:
            group["lr"] *= 0.5
        self.opt.state.clear()
        log.warning("refinement diverged at step %d (loss %s, best %.3g): rolled back to the last good state%s",
                    step, f"{loss:.3g}", self.best,
                    ", stopping" if self.exhausted else f", learning rate halved to {self.opt.param_groups[0]['lr']:.2g}")
        return False

    def restore_if_worse(self) -> None:
        """At the end: nothing to do unless the run ended on a rollback limit (then the snapshot is in place)."""
        if self.exhausted:
            self._restore()

    def _take(self, loss: float) -> None:
        with torch.no_grad():
            for snap, x in zip(self.snapshot, self.tensors):
                snap.copy_(x)
        self.snapshot_loss = loss

    def _restore(self) -> None:
        with torch.no_grad():
            for snap, x in zip(self.snapshot, self.tensors):
                x.copy_(snap)


def adam_refine(weights: torch.Tensor, norm: Normalizer, bank: torch.Tensor, codes: torch.Tensor,
                adapters: torch.Tensor, cfg: FitConfig, temperature: float, gen: torch.Generator,
                comm: Comm = LOCAL, whiten=None):
    """Adam on (bank, logits, adapters) with minibatches of experts; adapters in the normalised space.
    whiten (a globe.fit.activation.Whitener) weights the residuals on the right.

    Returns (bank, codes, adapters, loss history). AMP: bf16 autocast, or fp16 autocast with a GradScaler.
    Distributed: this rank's experts; the minibatch is drawn over all experts (gen identical on every rank), each
    rank computes its part of it and the bank's gradient is all-reduced (fp16 is refused by the caller: the
    GradScaler's skip decisions would differ between ranks).
    """
    t, phi, n = cfg.train, cfg.bank.phi, weights.shape[0]
    dev, n_all = bank.device, comm.total(n)
    offset = comm.shard(n_all)[0]
    bank = torch.nn.Parameter(bank.clone(memory_format=torch.contiguous_format))
    adapters = torch.nn.Parameter(adapters.clone(memory_format=torch.contiguous_format))
    params = CodeParams(codes, temperature, cfg.sparsity.method, learn_gain=phi != "identity")
    opt = torch.optim.Adam([bank, adapters, *params.parameters()], lr=t.refine_lr)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
    scaler = torch.amp.GradScaler(dev.type, enabled=t.amp == "fp16")
    numel = weights.shape[1] * weights.shape[2]
    history: list[float] = []
    guard = DivergenceGuard([bank, adapters, *params.parameters()], opt)
    for step in progress(range(t.refine_steps), "refine"):
        idx = torch.randperm(n_all, generator=gen)[: t.refine_batch].sort().values
        batch = idx.numel()
        if comm.world > 1:
            idx = idx[(idx >= offset) & (idx < offset + n)] - offset              # this rank's part of the batch
        idx = idx.to(dev)
        w = weights[idx.cpu()].to(dev, torch.float32) / norm.scales[idx.cpu()].to(dev)[:, None, None]
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            mix = (lambda c, b: _mix(c, b, phi))
            mixed = checkpoint(mix, params(index=idx), bank, use_reentrant=False) if t.grad_checkpoint \
                else mix(params(index=idx), bank)
            recon = adapters[idx] @ mixed
        resid = w - recon.float()
        if whiten is not None:
            resid = whiten.select(resid, idx.cpu())
        loss = resid.square().sum() / (batch * numel)
        total = comm.all_reduce_float(float(loss.detach()))                 # the same on every rank
        if not guard.check(total, step):
            if guard.exhausted:
                break
            continue
        opt.zero_grad()
        scaler.scale(loss).backward()
        if comm.world > 1:
            for param in (bank, adapters, *params.parameters()):           # as one process: zero grads, not None
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
            comm.all_reduce_grads([bank])
        scaler.step(opt)
        scaler.update()
        history.append(total ** 0.5)
    guard.restore_if_worse()
    with torch.no_grad():
        out_codes = params()
    return bank.detach(), out_codes, adapters.detach(), history
