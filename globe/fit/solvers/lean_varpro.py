"""Variable projection for large banks (used by globe.fit.solvers.varpro.varpro_refine when 20 fp32 L-BFGS pairs of the
bank would exceed its history budget): the same reduced objective sum_i ||W_i - A_i*(M) M_i||^2, M_i =
phi(alpha_i B), optimised by a limited-memory quasi-Newton method whose state is a handful of flat vectors.

Memory (V = one fp32 vector of bank + logits + gains): parameters, gradient and direction (3 V; the autograd
leaves are views into the first two, so there is no separate flat copy of either), and PAIRS curvature pairs
stored in bf16 (1 V per pair). The line search steps in place (x + t d, undone on rejection), so it keeps no
start point. torch.optim.LBFGS holds about 9 V plus 2 fp32 V per pair.
The loss of a chunk is ||W||^2 - 2 <A^T W, M> + <A^T A, M M^T> with A = A*(M) held fixed (envelope theorem), so
its gradient in M is 2 (A^T A M - A^T W): no [c, p, d] residual is formed. The bank's gradient is accumulated in
place (codes^T dM), autograd runs only through phi and the codes' mapping. A^T W is an fp32 product; W M^T of
the adapter refit follows train.precision.
"""
from __future__ import annotations

import logging
import math

import torch

from globe.errors import NumericalError
from globe.core.mixing import PHI
from globe.fit.solvers.adapters import refit_adapters
from globe.fit.constants import LBFGS_TOLERANCE_CHANGE, LBFGS_TOLERANCE_GRAD
from globe.fit.solvers.linalg import low_precision
from globe.fit.solvers.problem import Factors, SolverProblem, VarProOptions
from globe.fit.solvers.codes import code_values
from globe.fit.solvers.sparse_coding import codes_to_logits, prune_codes
from globe.progress import counter

log = logging.getLogger(__name__)

PAIRS = 3                     # curvature pairs kept (bf16)
ARMIJO, BACKTRACK = 1e-4, 0.5


class FlatParams:
    """Bank [m, r, d], logits [N, m] and log gains [N] in one fp32 vector x, their gradients in one vector g:
    autograd leaves that are views into x, with .grad views into g (backward accumulates in place)."""

    def __init__(self, bank: torch.Tensor, codes: torch.Tensor, temperature: float, method: str,
                 learn_gain: bool) -> None:
        m, r, d = bank.shape
        n = codes.shape[0]
        logits, sums = codes_to_logits(codes, temperature, method)
        sizes = [m * r * d, n * m, n]
        self.x = torch.cat([bank.reshape(-1).float(), logits.reshape(-1).float(), sums.log().float()])
        self.g = torch.zeros_like(self.x)
        xs, gs = self.x.split(sizes), self.g.split(sizes)
        shapes = [(m, r, d), (n, m), (n,)]
        wants = (True, True, learn_gain)
        self.leaves = [x.view(s).detach().requires_grad_(grad) for x, s, grad in zip(xs, shapes, wants)]
        for leaf, grad, shape in zip(self.leaves, gs, shapes):
            if leaf.requires_grad:
                leaf.grad = grad.view(shape)
        self.bank, self.logits, self.log_gain = self.leaves
        self.temperature, self.method = temperature, method

    def codes(self, lo: int, hi: int) -> torch.Tensor:
        return code_values(self.logits[lo:hi], self.log_gain[lo:hi], self.temperature, self.method)


def chunk_loss(w: torch.Tensor, wsq: float, mixed: torch.Tensor, ridge: float, low,
               total: float) -> tuple[float, torch.Tensor]:
    """(loss of the chunk / total, d loss / d mixed) for w [c, p, d] with ||w||^2 = wsq, mixed [c, r, d], the
    adapters refitted and held fixed: ||W||^2 - 2 <A^T W, M> + <A^T A, M M^T>."""
    fit = refit_adapters(w, mixed, ridge, low)
    atw = fit.adapters.transpose(1, 2) @ w                                   # [c, r, d] fp32
    grad = fit.gram @ mixed                                                  # [c, r, d] A^T A M
    loss = wsq - 2 * _dot(atw, mixed) + _dot(grad, mixed)
    return loss / total, grad.sub_(atw).mul_(2.0 / total)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> for [c, r, d] tensors: fp32 sums over rows of d, then an fp64 sum of the c r row sums."""
    return float((a * b).view(-1, a.shape[-1]).sum(1).double().sum())


class ReducedLoss:
    """Loss and gradient of the reduced objective at the current x, streamed over expert chunks into g."""

    def __init__(self, problem: SolverProblem, params: FlatParams, options: VarProOptions, offset: int,
                 n_all: int) -> None:
        weights, norm = problem.weights, problem.norm
        self.weights, self.norm, self.params, self.comm = weights, norm, params, problem.comm
        self.phi, self.ridge, self.offset = options.phi, options.ridge, offset
        n, chunk = weights.shape[0], options.chunk_size
        dev = params.x.device
        self.low = low_precision(options.precision, weights.dtype, weights.shape[1], weights.shape[2], dev)
        self.bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
        self.total = float(n_all * weights.shape[1] * weights.shape[2])      # ||W||^2 in unit-RMS space
        self.wsq = (norm.sq_norms.double() / norm.scales.double().square()).tolist()   # ||W_i / s_i||^2
        self.history: list[float] = []
        self.bar = None                               # a globe.progress.counter advanced once per evaluation

    def __call__(self) -> float:
        p = self.params
        m, shape = p.bank.shape[0], p.bank.shape[1:]
        flat, gbank = p.bank.detach().reshape(m, -1), p.g[:p.bank.numel()].view(m, -1)
        p.g.zero_()
        loss = 0.0
        for lo, hi in self.bounds:
            w = self.norm.chunk(self.weights, lo, hi, p.x.device)             # [c, p, d]
            codes = p.codes(self.offset + lo, self.offset + hi)               # autograd: logits, gains only
            with torch.no_grad():
                pre = (codes.detach() @ flat).view(-1, *shape)                # [c, r, d]
            mixed = pre.requires_grad_() if self.phi != "identity" else pre
            out = PHI[self.phi](mixed)
            with torch.no_grad():
                part, grad = chunk_loss(w, sum(self.wsq[lo:hi]), out.detach(), self.ridge, self.low, self.total)
            if self.phi != "identity":
                out.backward(grad)
                grad = mixed.grad                                             # through phi
            del w, out, mixed, pre
            grad = grad.reshape(grad.shape[0], -1)
            gbank.addmm_(codes.detach().T, grad)                              # d/dB, accumulated in place
            codes.backward(grad @ flat.T)                                     # d/d(logits, gains)
            loss += part
            del grad, codes
        loss = self.comm.all_reduce_float(loss)
        self.comm.all_reduce(p.g)
        if not math.isfinite(loss) or not bool(torch.isfinite(p.g).all()):
            raise NumericalError("NaN/Inf in variable-projection refinement (try a larger train.ridge)")
        self.history.append(max(loss, 0.0) ** 0.5)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(err=f"{self.history[-1]:.4f}")
        return loss


def direction(g: torch.Tensor, d: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """d = -H g by the two-loop recursion over the stored (s, y, 1 / y.s) pairs (bf16), in place in d."""
    d.copy_(g).neg_()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(torch.dot(s.float(), d))
        d.add_(y.float(), alpha=-a)
        alphas.append(a)
    if pairs:
        s, y, _ = pairs[-1]
        yf = y.float()
        d.mul_(float(torch.dot(s.float(), yf)) / max(float(torch.dot(yf, yf)), 1e-30))
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        b = rho * float(torch.dot(y.float(), d))
        d.add_(s.float(), alpha=a - b)


def minimise(objective: ReducedLoss, params: FlatParams, steps: int, tol_grad: float = LBFGS_TOLERANCE_GRAD,
             tol_change: float = LBFGS_TOLERANCE_CHANGE) -> None:
    """Limited-memory BFGS with an Armijo backtracking line search, in place on params.x, for `steps`
    iterations or 1.25 * steps evaluations (as torch.optim.LBFGS counts them)."""
    x, g = params.x, params.g
    d = torch.empty_like(x)
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    loss, evals, max_eval = objective(), 1, steps * 5 // 4
    for it in range(steps):
        if float(g.abs().max()) <= tol_grad:
            break
        direction(g, d, pairs)
        slope = float(torch.dot(g, d))
        if slope >= 0:                                       # not a descent direction: restart from -g
            pairs.clear()
            d.copy_(g).neg_()
            slope = float(torch.dot(g, d))
        t = min(1.0, 1.0 / float(g.abs().sum())) if it == 0 else 1.0
        y_new = g.to(torch.bfloat16)                          # the old gradient, becomes y = g_new - g_old
        done, moved = False, 0.0
        while evals < max(max_eval, 2):
            x.add_(d, alpha=t - moved)
            moved = t
            new = objective()
            evals += 1
            if new <= loss + ARMIJO * t * slope:
                done = True
                break
            t *= BACKTRACK
        if not done:                                          # no decrease: back to the last accepted point
            x.add_(d, alpha=-moved)
            g.copy_(y_new.float())
            objective.history.append(loss ** 0.5)
            break
        y_new = (g - y_new.float()).to(torch.bfloat16)
        s_new = (d * t).to(torch.bfloat16)
        ys = float(torch.dot(y_new.float(), s_new.float()))
        if ys > 1e-10:
            pairs = (pairs + [(s_new, y_new, 1.0 / ys)])[-PAIRS:]
        del y_new, s_new
        change, loss = abs(new - loss), new
        if change < tol_change or float(d.abs().max()) * t <= tol_change or evals >= max_eval:
            break


def lean_varpro(problem: SolverProblem, state: Factors,
                options: VarProOptions) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """varpro_refine's contract: (bank, codes, loss history); rolls back to the start on NaN/Inf."""
    comm, bank, codes, steps, label = problem.comm, state.bank, state.codes, options.steps, options.label
    n = problem.weights.shape[0]
    n_all = comm.total(n)
    offset = comm.shard(n_all)[0]
    params = FlatParams(bank, comm.all_gather_rows(codes, n_all), state.temperature, options.method,
                        learn_gain=options.phi != "identity")
    objective = ReducedLoss(problem, params, options, offset, n_all)
    objective.bar = counter(label, total=max(steps * 5 // 4, 2))      # minimise's evaluation budget
    try:
        minimise(objective, params, steps)
    except NumericalError as exc:
        log.warning("%s: rolled back to the state before variable projection", exc)
        return bank, codes, objective.history[:1]
    finally:
        objective.bar.close()
    with torch.no_grad():
        out = prune_codes(params.codes(offset, offset + n), options.eps)
    history = objective.history
    log.info("%s (lean): %d evaluations, rel_err %.5f -> %.5f", label, len(history), history[0], history[-1])
    return params.bank.detach(), out.detach(), history
