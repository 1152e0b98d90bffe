"""Refinement of (bank, codes) after alternating minimisation, under any globe.fit.objective.Objective.

varpro_refine: variable projection. The adapters are eliminated exactly (A_i = argmin, batched Cholesky) and
L-BFGS optimises the bank and the code logits on the reduced objective sum_i ||(W_i - A_i*(M) phi(M_i)) R_i||^2,
streamed over expert chunks. This converges where plain alternation stalls.
adam_refine: Adam on (bank, code logits, adapters) with the real phi, minibatches of experts, AMP and optional
gradient checkpointing of the mixer.

Both take the objective as one object (its `targets`, `right`, `select`, `total` hooks) and a Comm for the sums
over ranks (a no-op in one process); neither branches on the objective or on the number of processes.
A new refinement (e.g. a nonlinear-phi objective) is a new Objective whose `after_alternation` calls these, or a
function of the same shape: (weights, norm, bank, codes, ..., objective) -> (bank, codes, losses).
"""
from __future__ import annotations

import logging
import math

import torch
from torch.utils.checkpoint import checkpoint

from globe.errors import NumericalError
from globe.core.mixing import compose
from globe.fit.adapters import refit_adapters
from globe.fit.config import FitConfig
from globe.fit.constants import (DIVERGED_FACTOR, LBFGS_HISTORY_BYTES, LBFGS_MAX_HISTORY, LBFGS_TOLERANCE_CHANGE,
                                 LBFGS_TOLERANCE_GRAD, MAX_ROLLBACKS, SNAPSHOT_EVERY, SNAPSHOT_SLACK)
from globe.fit.distributed import LOCAL, Comm
from globe.fit.linalg import low_precision
from globe.fit.normalize import Normalizer
from globe.fit.objective import WEIGHTS, WeightSpace
from globe.fit.sparse_coding import codes_to_logits, mapping, prune_codes
from globe.progress import counter, progress

log = logging.getLogger(__name__)

__all__ = ["CodeParams", "DivergenceGuard", "LBFGS_HISTORY_BYTES", "adam_refine", "lbfgs_history", "varpro_refine"]


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


class _Targets:
    """The objective's normalised target chunks W_i R_i / s_i, cached in fp32 when the objective asks for it."""

    def __init__(self, weights: torch.Tensor, norm: Normalizer, device, objective: WeightSpace) -> None:
        self.weights, self.norm, self.device, self.objective = weights, norm, device, objective
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        if not self.objective.cache_targets:
            return self.objective.targets(self.weights, self.norm, lo, hi, self.device)
        if (lo, hi) not in self.cache:
            self.cache[lo, hi] = self.objective.targets(self.weights, self.norm, lo, hi, self.device)
        return self.cache[lo, hi]


def lbfgs_history(numel: int, most: int = LBFGS_MAX_HISTORY) -> int:
    """L-BFGS history length: `most`, fewer when the history would exceed LBFGS_HISTORY_BYTES (large banks)."""
    return int(max(3, min(most, LBFGS_HISTORY_BYTES // (8 * numel))))


def uses_lean_varpro(bank_numel: int, logits_numel: int, objective: WeightSpace = WEIGHTS) -> bool:
    """Whether varpro_refine runs globe.fit.lean_varpro: in weight space, for banks whose full L-BFGS history
    does not fit LBFGS_HISTORY_BYTES."""
    return type(objective) is WeightSpace and lbfgs_history(bank_numel + logits_numel) < LBFGS_MAX_HISTORY


def _reduced_loss(targets: _Targets, bounds, bank, params: CodeParams, offset: int, total: float, ridge: float,
                  phi: str, low, objective: WeightSpace, comm: Comm) -> float:
    """sum_i ||(W_i - A_i* M_i) R_i||^2 / total over this rank's chunks, gradients accumulated (A* held fixed:
    the envelope theorem makes its gradient zero), loss and gradients summed over ranks."""
    loss = 0.0
    for lo, hi in bounds:
        w = targets(lo, hi)                                                    # [c, p, d] (weighted)
        mixed = objective.right(compose(params(offset + lo, offset + hi), bank, phi), lo, hi)   # [c, r, d]
        with torch.no_grad():
            adapters = refit_adapters(w, mixed, ridge, low).adapters
        part = (w - adapters @ mixed).square().sum() / total
        part.backward()
        loss += float(part.detach())
    loss = comm.all_reduce_float(loss)
    comm.all_reduce_grads([bank, *params.parameters()])
    return loss


def varpro_refine(weights: torch.Tensor, norm: Normalizer, bank: torch.Tensor, codes: torch.Tensor,
                  cfg: FitConfig, steps: int, temperature: float, comm: Comm = LOCAL,
                  objective: WeightSpace = WEIGHTS,
                  label: str = "varpro") -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """L-BFGS on (bank, logits) with adapters projected out; returns (bank, codes, loss history).

    label names the run in its progress bar (one step per loss evaluation) and in its closing log line, e.g.
    "VarPro gate (activation-weighted error)": a fit can run it on more than one objective.

    Distributed: weights/norm/codes are this rank's experts. Every rank runs the same L-BFGS on the bank and on
    the logits of all experts (gathered: [N, m] is small); each rank evaluates its experts' loss terms, and the
    loss and gradients are summed over ranks, so the optimiser state stays identical everywhere. An objective
    with cache_targets keeps its weighted targets in fp32 for the run (N p d floats; single process only).
    Large banks in weight space (uses_lean_varpro) go to globe.fit.lean_varpro, which keeps a few flat vectors."""
    phi, ridge, n = cfg.bank.phi, cfg.train.ridge, weights.shape[0]
    start = (bank, codes)
    n_all = comm.total(n)
    if uses_lean_varpro(bank.numel(), n_all * bank.shape[0], objective):
        from globe.fit.lean_varpro import lean_varpro
        return lean_varpro(weights, norm, bank, codes, cfg, steps, temperature, comm, label)
    offset = comm.shard(n_all)[0]
    low = low_precision(cfg.train.precision, weights.dtype, weights.shape[1], weights.shape[2], bank.device)
    bank = torch.nn.Parameter(bank.clone(memory_format=torch.contiguous_format))
    params = CodeParams(comm.all_gather_rows(codes, n_all), temperature, cfg.sparsity.method,
                        learn_gain=phi != "identity")
    targets = _Targets(weights, norm, bank.device, objective)
    bounds = [(lo, min(lo + cfg.train.chunk_size, n)) for lo in range(0, n, cfg.train.chunk_size)]
    total = objective.total(targets, bounds, n_all, weights.shape[1], weights.shape[2])
    opt = torch.optim.LBFGS([bank, *params.parameters()], lr=1.0, max_iter=steps,
                            history_size=lbfgs_history(bank.numel() + params.logits.numel()),
                            tolerance_grad=LBFGS_TOLERANCE_GRAD, tolerance_change=LBFGS_TOLERANCE_CHANGE,
                            line_search_fn="strong_wolfe")
    history: list[float] = []
    bar = counter(label, total=opt.param_groups[0]["max_eval"])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _reduced_loss(targets, bounds, bank, params, offset, total, ridge, phi, low, objective, comm)
        if not math.isfinite(loss):
            raise NumericalError("NaN/Inf in variable-projection refinement (try a larger train.ridge)")
        history.append(loss ** 0.5)
        bar.update(1)
        bar.set_postfix(err=f"{history[-1]:.4f}")
        return torch.tensor(loss, device=bank.device)

    try:
        opt.step(closure)
    except NumericalError as exc:
        log.warning("%s: rolled back to the state before variable projection", exc)
        return start[0], start[1], history[:1]                    # the first evaluation is at the start point
    finally:
        bar.close()
    with torch.no_grad():
        out_codes = prune_codes(params(offset, offset + n), cfg.sparsity.eps)
    log.info("%s: %d evaluations, rel_err %.5f -> %.5f", label, len(history), history[0], history[-1])
    return bank.detach(), out_codes.detach(), history


class DivergenceGuard:
    """Snapshots of the parameters at good points of an optimisation; on a NaN/Inf loss or a loss far above the
    best seen, restores the last snapshot with a warning, halves the learning rate and carries on (up to
    `max_rollbacks` times). Minibatch losses are noisy, so "far above" means `factor` x the best."""

    def __init__(self, tensors: list[torch.Tensor], opt: torch.optim.Optimizer, every: int = SNAPSHOT_EVERY,
                 factor: float = DIVERGED_FACTOR, max_rollbacks: int = MAX_ROLLBACKS) -> None:
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
            if step % self.every == 0 and loss <= self.best * SNAPSHOT_SLACK:
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


def _minibatch_loss(weights, norm: Normalizer, bank, adapters, params: CodeParams, idx: torch.Tensor, batch: int,
                    cfg: FitConfig, objective: WeightSpace) -> torch.Tensor:
    """Mean squared (weighted) residual of this rank's experts `idx` of a minibatch of `batch` experts."""
    t, phi, dev = cfg.train, cfg.bank.phi, bank.device
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
    w = weights[idx.cpu()].to(dev, torch.float32) / norm.scales[idx.cpu()].to(dev)[:, None, None]
    with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        mix = (lambda c, b: compose(c, b, phi))
        mixed = checkpoint(mix, params(index=idx), bank, use_reentrant=False) if t.grad_checkpoint \
            else mix(params(index=idx), bank)
        recon = adapters[idx] @ mixed
    resid = objective.select(w - recon.float(), idx.cpu())
    return resid.square().sum() / (batch * weights.shape[1] * weights.shape[2])


def adam_refine(weights: torch.Tensor, norm: Normalizer, bank: torch.Tensor, codes: torch.Tensor,
                adapters: torch.Tensor, cfg: FitConfig, temperature: float, gen: torch.Generator,
                comm: Comm = LOCAL, objective: WeightSpace = WEIGHTS):
    """Adam on (bank, logits, adapters) with minibatches of experts; adapters in the normalised space, residuals
    weighted by the objective.

    Returns (bank, codes, adapters, loss history). AMP: bf16 autocast, or fp16 autocast with a GradScaler.
    Distributed: this rank's experts; the minibatch is drawn over all experts (gen identical on every rank), each
    rank computes its part of it and the bank's gradient is all-reduced (fp16 is refused by the caller: the
    GradScaler's skip decisions would differ between ranks).
    """
    t, n, dev = cfg.train, weights.shape[0], bank.device
    n_all = comm.total(n)
    offset = comm.shard(n_all)[0]
    bank = torch.nn.Parameter(bank.clone(memory_format=torch.contiguous_format))
    adapters = torch.nn.Parameter(adapters.clone(memory_format=torch.contiguous_format))
    params = CodeParams(codes, temperature, cfg.sparsity.method, learn_gain=cfg.bank.phi != "identity")
    opt = torch.optim.Adam([bank, adapters, *params.parameters()], lr=t.refine_lr)
    scaler = torch.amp.GradScaler(dev.type, enabled=t.amp == "fp16")
    history: list[float] = []
    guard = DivergenceGuard([bank, adapters, *params.parameters()], opt)
    for step in progress(range(t.refine_steps), "refine"):
        idx = torch.randperm(n_all, generator=gen)[: t.refine_batch].sort().values
        batch = idx.numel()
        idx = comm.rows_of_shard(idx, offset, n).to(dev)                     # this rank's part of the batch
        loss = _minibatch_loss(weights, norm, bank, adapters, params, idx, batch, cfg, objective)
        total = comm.all_reduce_float(float(loss.detach()))                 # the same on every rank
        if not guard.check(total, step):
            if guard.exhausted:
                break
            continue
        opt.zero_grad()
        scaler.scale(loss).backward()
        comm.all_reduce_shared_grads([bank], [bank, adapters, *params.parameters()])
        scaler.step(opt)
        scaler.update()
        history.append(total ** 0.5)
    guard.restore_if_worse()
    with torch.no_grad():
        out_codes = params()
    return bank.detach(), out_codes, adapters.detach(), history
