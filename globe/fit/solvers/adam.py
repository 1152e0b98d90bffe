"""Adam refinement of (bank, code logits, adapters) with the real phi: minibatches of experts, AMP and optional
gradient checkpointing of the mixer, residuals weighted by the objective; DivergenceGuard rolls back bad steps.

Takes the objective as one object (its `select` hook) and a Comm for the sums over ranks (a no-op in one process).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from globe.core.mixing import compose
from globe.fit.costs import F4, declare_cost
from globe.fit.solvers.adapters import finalize_seconds
from globe.fit.config import FitConfig
from globe.fit.constants import DIVERGED_FACTOR, MAX_ROLLBACKS, SNAPSHOT_EVERY, SNAPSHOT_SLACK
from globe.fit.solvers.codes import CodeParams
from globe.fit.solvers.problem import Factors, SolverProblem
from globe.progress import progress

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class AdamOptions:
    """What the minibatch Adam refinement reads of the FitConfig."""

    steps: int                    # train.refine_steps
    lr: float                     # train.refine_lr
    batch: int                    # train.refine_batch (experts per minibatch, over all ranks)
    amp: str                      # train.amp: "none", "bf16" or "fp16"
    grad_checkpoint: bool         # train.grad_checkpoint
    phi: str                      # bank.phi
    method: str                   # sparsity.method (code parametrisation)

    @classmethod
    def from_config(cls, cfg: FitConfig) -> AdamOptions:
        t = cfg.train
        return cls(steps=t.refine_steps, lr=t.refine_lr, batch=t.refine_batch, amp=t.amp,
                   grad_checkpoint=t.grad_checkpoint, phi=cfg.bank.phi, method=cfg.sparsity.method)


def _minibatch_loss(problem: SolverProblem, bank, adapters, params: CodeParams, idx: torch.Tensor, batch: int,
                    options: AdamOptions) -> torch.Tensor:
    """Mean squared (weighted) residual of this rank's experts `idx` of a minibatch of `batch` experts."""
    weights, norm, objective = problem.weights, problem.norm, problem.objective
    t, phi, dev = options, options.phi, bank.device
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.amp)
    w = weights[idx.cpu()].to(dev, torch.float32) / norm.scales[idx.cpu()].to(dev)[:, None, None]
    with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        mix = (lambda c, b: compose(c, b, phi))
        mixed = checkpoint(mix, params(index=idx), bank, use_reentrant=False) if t.grad_checkpoint \
            else mix(params(index=idx), bank)
        recon = adapters[idx] @ mixed
    resid = objective.select(w - recon.float(), idx.cpu())
    return resid.square().sum() / (batch * weights.shape[1] * weights.shape[2])


def adam_refine(problem: SolverProblem, state: Factors, options: AdamOptions, gen: torch.Generator):
    """Adam on (bank, logits, adapters) from state (bank, codes, temperature, adapters) with minibatches of
    experts; adapters in the normalised space, residuals weighted by problem.objective.

    Returns (bank, codes, adapters, loss history). AMP: bf16 autocast, or fp16 autocast with a GradScaler.
    Distributed: this rank's experts; the minibatch is drawn over all experts (gen identical on every rank), each
    rank computes its part of it and the bank's gradient is all-reduced (fp16 is refused by the caller: the
    GradScaler's skip decisions would differ between ranks).
    """
    t, comm, n, dev = options, problem.comm, problem.weights.shape[0], state.bank.device
    n_all = comm.total(n)
    offset = comm.shard(n_all)[0]
    bank = torch.nn.Parameter(state.bank.clone(memory_format=torch.contiguous_format))
    adapters = torch.nn.Parameter(state.adapters.clone(memory_format=torch.contiguous_format))
    params = CodeParams(state.codes, state.temperature, t.method, learn_gain=t.phi != "identity")
    opt = torch.optim.Adam([bank, adapters, *params.parameters()], lr=t.lr)
    scaler = torch.amp.GradScaler(dev.type, enabled=t.amp == "fp16")
    history: list[float] = []
    guard = DivergenceGuard([bank, adapters, *params.parameters()], opt)
    for step in progress(range(t.steps), "refine"):
        idx = torch.randperm(n_all, generator=gen)[: t.batch].sort().values
        batch = idx.numel()
        idx = comm.rows_of_shard(idx, offset, n).to(dev)                     # this rank's part of the batch
        loss = _minibatch_loss(problem, bank, adapters, params, idx, batch, options)
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


def refine_memory(s) -> int:
    """Adam refinement: fitted adapters kept, a clone as parameter, its gradient and two moments; a minibatch."""
    if s.refine_steps == 0:
        return 0
    b = min(s.refine_batch, s.n)
    params = 5 * (s.adapters + s.bank)                                       # fitted, param, grad, exp_avg, _sq
    batch = F4 * b * (4 * s.p * s.d + 2 * s.r * s.d + s.p * s.r)
    return params + batch + s.adapters + s.bank                               # + the refined fit's adapters


def refine_seconds(s, q) -> float:
    """train.refine_steps minibatch steps, then the exact adapters of the result."""
    if not s.refine_steps:
        return 0.0
    b, p, d, r, m = min(s.refine_batch, s.n), s.p, s.d, s.r, s.m
    step = b * (6 * p * d * r / q.wd32 + 6 * m * r * d / q.bank + 12 * p * d * 4 / q.stream
                + p * d * s.stored_bytes / q.read_bps) + 16 * (s.adapters + s.bank) / q.stream
    return s.refine_steps * step + finalize_seconds(s, q)


declare_cost("refine", refine_memory, refine_seconds)
