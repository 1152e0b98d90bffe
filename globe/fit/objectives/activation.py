"""Activation-aware objective: sum_i g_i^2 ||(W_i - W_hat_i) L_i||_F^2 with C_i = L_i L_i^T the second moment of
expert i's input on calibration text (Cholesky factor, lower triangular) and g_i^2 an optional routing weight.

The bank stays in weight space (it is shared by layers whose C differ); only the objective is weighted on the
right. For fixed mixed atoms M_i the optimal adapter is A_i = W_i C M_i^T (M_i C M_i^T)^-1, i.e. the plain refit
applied to (W_i L_i, M_i L_i) (globe.fit.solvers.adapters.refit_adapters), so variable projection, the Adam refinement
and the final refit only need R_i = g_i L_i: `ActivationObjective` is that globe.fit.objectives.base.Objective.

C per family input: gate/up read the MoE layer input x (C_l over all tokens, or C_{l,e} over the tokens routed
to expert e blended with C_l: (S_e + k C_l) / (n_e + k), k = prior_tokens); down reads h = act(W_g x) * (W_u x)
(per expert; its layer-level C pools the layer's experts). Each C is scaled to mean eigenvalue 1 (so with C = I
the weighted fit is the weight-space fit), damped by `damp` * I, then factorised.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from globe.calibration.stats import ActivationStats, check_stats_fit, load_stats
from globe.errors import ConfigError, NumericalError
from globe.fit.config import ActivationConfig
from globe.fit.solvers.metrics import error_metrics
from globe.fit.solvers.mod import normalize_atoms
from globe.fit.solvers.normalize import Normalizer
from globe.fit.objectives.base import Objective, Solution, Spaces, register
from globe.fit.objectives.sensitivity import layer_gains, probe_of
from globe.fit.solvers.problem import Factors, SolverProblem, VarProOptions
from globe.fit.solvers.varpro import varpro_refine

log = logging.getLogger(__name__)


@dataclass
class Whitener:
    """Right factors of the weighted objective: expert i uses gains[i] * factors[index[i]] ([k, k], lower)."""

    factors: torch.Tensor   # [G, k, k] Cholesky factors (G = layers, or experts with per-expert statistics)
    index: torch.Tensor     # [N] row of `factors` for each expert (long)
    gains: torch.Tensor     # [N] sqrt of each expert's weight (1 without routing weights)
    rows: torch.Tensor | None = None   # [N, p] output-row weights Lambda_i (channel weights), or None
    unreached: torch.Tensor | None = None   # [N] bool: experts no calibration token reaches (fitted in weight space)
    ridge: float = 0.0      # the damp added to every normalised C before factoring (factors: chol(C + ridge I))

    def scale_rows(self, weights: torch.Tensor, chunk: int) -> torch.Tensor:
        """Lambda_i W_i for every expert: [N, p, k] fp32 (the objective ||Lambda (W - A M) L||: fit Lambda W, then
        divide the adapters' rows by Lambda; the bank is untouched)."""
        out = torch.empty(weights.shape, dtype=torch.float32)
        for lo in range(0, weights.shape[0], chunk):
            out[lo:lo + chunk] = weights[lo:lo + chunk].float() * self.rows[lo:lo + chunk, :, None]
        return out

    def unscale_rows(self, adapters: torch.Tensor) -> torch.Tensor:
        """Adapters [N, p, r] fitted to Lambda W -> adapters of W (identity without row weights)."""
        return adapters if self.rows is None else adapters / self.rows.to(adapters)[:, :, None]

    def select(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [c, rows, k] of the given experts [c] -> x_i L_i g_i."""
        experts = experts.to(self.index.device)
        factors = self.factors[self.index[experts]].to(x.device, x.dtype)             # [c, k, k]
        return (x @ factors) * self.gains[experts].to(x.device, x.dtype)[:, None, None]

    def hessians(self, experts: torch.Tensor) -> torch.Tensor:
        """The given experts' normalised second moments without the ridge, g_i^2 (L_i L_i^T - ridge I): [c, k, k]
        fp64 (GPTQ of a residual damps its Hessian itself: with the ridge too, upcycled-qwen2moe's 4-bit group-64
        plain quantization had 1.14x the KL of GPTQ under S_e + 64 C_l, benchmarks/diag_plain_gptq.py)."""
        experts = experts.to(self.index.device)
        f = self.factors[self.index[experts]].double()                                   # [c, k, k]
        eye = torch.eye(f.shape[-1], dtype=torch.float64)
        return (f @ f.transpose(1, 2) - self.ridge * eye) * self.gains[experts].double().square()[:, None, None]

    def __call__(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """x [hi - lo, rows, k] of experts lo:hi -> whitened."""
        return self.select(x, torch.arange(lo, hi))

    def global_factor(self) -> torch.Tensor:
        """Cholesky factor [k, k] of the experts' mean weighted C (sum_i g_i^2 L_i L_i^T / N): one right factor
        for every layer, so a bank fitted to W_i L_g stays shared once L_g^-1 is folded back into it."""
        counts = torch.bincount(self.index, weights=self.gains.double().square(), minlength=self.factors.shape[0])
        f = self.factors.double()
        mean = torch.einsum("g,gij,gkj->ik", counts, f, f) / counts.sum()
        return torch.linalg.cholesky(0.5 * (mean + mean.T)).float()


def _normalized_cholesky(c: torch.Tensor, damp: float, what: str) -> torch.Tensor:
    """Cholesky factors of C / mean eigenvalue + damp * I for c [..., k, k] (fp64 in, fp32 out)."""
    k = c.shape[-1]
    c = 0.5 * (c + c.transpose(-1, -2))
    scale = c.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    if bool((scale <= 0).any()) or not bool(torch.isfinite(c).all()):
        raise NumericalError(f"activation statistics of {what} are empty or not finite: calibrate on more text")
    chol, info = torch.linalg.cholesky_ex(c / scale + damp * torch.eye(k, dtype=c.dtype))
    if bool((info > 0).any()):
        raise NumericalError(f"activation second moment of {what} is not positive definite with damp {damp}: "
                             f"raise activation.damp")
    return chol.float()


def second_moments(stats: ActivationStats, family: str, per_expert: bool, prior_tokens: float) -> torch.Tensor:
    """Unnormalised C for every (layer, expert) of the statistics: [L, E, k, k] fp64 (or [L, 1, k, k])."""
    counts = stats.counts.double()                                                   # [L, E]
    if family == "down":
        sums = stats.intermediate_expert
        if sums is None:
            raise ConfigError("activation-aware down projections need per-expert statistics: run `globe calibrate` "
                              "without --layer-only")
        sums = sums.double()                                                         # [L, E, p, p]
        layer = sums.sum(1) / counts.sum(1).clamp_min(1)[:, None, None]             # [L, p, p] pooled
    else:
        sums = None if stats.hidden_expert is None else stats.hidden_expert.double()  # [L, E, d, d]
        layer = stats.hidden.double() / max(stats.tokens, 1)                        # [L, d, d]
    if not per_expert:
        return layer[:, None]
    if sums is None:
        raise ConfigError("activation.per_expert needs per-expert statistics: run `globe calibrate` without "
                          "--layer-only, or fit with --per-layer")
    return (sums + prior_tokens * layer[:, None]) / (counts + prior_tokens)[..., None, None]


def build_whitener(stats: ActivationStats, family: str, ids: torch.Tensor, k: int, per_expert: bool = False,
                   prior_tokens: float = 64.0, damp: float = 0.01, routing_weights: bool = False,
                   routing_floor: float = 0.1, channel_weights: bool = False,
                   unreached_weight_space: bool = False) -> Whitener:
    """Whitener for the experts `ids` [N, 2] (layer, expert) of one family whose input dimension is k. An expert
    no calibration token reaches gets its layer's C (per_expert: the prior alone), or with unreached_weight_space
    (what a fit does: family_whitener) the weight-space objective (weight_space_for_unreached)."""
    moments = second_moments(stats, family, per_expert, prior_tokens)               # [L, E or 1, k', k']
    if moments.shape[-1] != k:
        raise ConfigError(f"activation statistics have {family} input dimension {moments.shape[-1]}, the weights "
                          f"{k}: calibrate the model that is being fitted")
    missing = sorted({int(l) for l in ids[:, 0]} - set(stats.layers))
    if missing:
        raise ConfigError(f"activation statistics lack MoE layer(s) {missing}: calibrate the model being fitted")
    num_experts = stats.counts.shape[1]
    if int(ids[:, 1].max()) >= num_experts:
        raise ConfigError(f"activation statistics cover {num_experts} experts per layer, the weights more")
    layer_pos = torch.tensor([stats.layer_index(int(l)) for l in ids[:, 0]])
    expert = ids[:, 1].long()
    per = moments.shape[1] > 1
    factors = _normalized_cholesky(moments.flatten(0, 1), damp, f"the {family} inputs")  # [L * E', k, k]
    index = layer_pos * moments.shape[1] + (expert if per else 0)
    gains = torch.ones(ids.shape[0])
    if routing_weights:
        counts = stats.counts.double()
        freq = counts / counts.mean(1, keepdim=True).clamp_min(1e-12)                # mean 1 per layer
        weight = (1 - routing_floor) * freq[layer_pos, expert] + routing_floor
        gains = weight.sqrt().float()
    rows = channel_rows(stats, family, layer_pos, expert, prior_tokens) if channel_weights else None
    unreached = None
    if unreached_weight_space:
        factors, index, gains, unreached = weight_space_for_unreached(stats, family, ids, layer_pos, factors, index,
                                                                      gains, damp)
    return Whitener(factors=factors, index=index, gains=gains, rows=rows, unreached=unreached, ridge=damp)


def weight_space_for_unreached(stats: ActivationStats, family: str, ids: torch.Tensor, layer_pos: torch.Tensor,
                               factors: torch.Tensor, index: torch.Tensor, gains: torch.Tensor, damp: float):
    """Experts that no calibration token reaches (routed count 0) have no activation statistics of their own: they
    fall back to the weight-space objective (R_i = I, gain 1: one identity factor appended), with one INFO line.
    Returns (factors, index, gains, unreached [N] bool or None)."""
    unreached = stats.counts[layer_pos, ids[:, 1].long()] == 0                        # [N]
    if not bool(unreached.any()):
        return factors, index, gains, None
    eye = torch.eye(factors.shape[-1], dtype=torch.float64)
    factors = torch.cat([factors, _normalized_cholesky(eye, damp, "weight space")[None]])
    index = torch.where(unreached, factors.shape[0] - 1, index)
    gains = torch.where(unreached, torch.ones_like(gains), gains)
    where = [f"L{int(l)}E{int(e)}" for l, e in ids[unreached].tolist()]
    log.info("%s: %d expert(s) that no calibration token reaches (%s%s) are fitted in weight space", family,
             len(where), ", ".join(where[:5]), " ..." if len(where) > 5 else "")
    return factors, index, gains, unreached


def channel_rows(stats: ActivationStats, family: str, layer_pos: torch.Tensor, expert: torch.Tensor,
                 prior_tokens: float) -> torch.Tensor | None:
    """Row weights Lambda_i [N, p] of gate/up from the first-order output sensitivity of each intermediate channel
    (mean 1 per expert, blended towards 1 with prior_tokens); None for down (its rows are the residual stream)."""
    if family == "down":
        return None
    sums = getattr(stats, f"{family}_channels")
    if sums is None:
        raise ConfigError("activation.channel_weights needs per-expert statistics with channel sums: re-run "
                          "`globe calibrate` (without --layer-only)")
    energy = sums.double()[layer_pos, expert]                                        # [N, p]
    energy = energy / energy.mean(1, keepdim=True).clamp_min(1e-30)
    n = stats.counts.double()[layer_pos, expert][:, None]
    return ((n * energy + prior_tokens) / (n + prior_tokens)).sqrt().float()


def weighted_sq_norms(weights: torch.Tensor, whiten: Whitener, chunk: int) -> torch.Tensor:
    """||W_i L_i g_i||_F^2 in the original space: [N] fp64."""
    out = torch.empty(weights.shape[0], dtype=torch.float64)
    for lo in range(0, weights.shape[0], chunk):
        hi = min(lo + chunk, weights.shape[0])
        out[lo:hi] = whiten(weights[lo:hi].float(), lo, hi).square().sum((1, 2)).double()
    return out


def family_whitener(stats: ActivationStats, family: str, stack, cfg: ActivationConfig) -> Whitener:
    """Whitener of an ExpertStack (weights [N, rows, k], ids [N, 2]) from `cfg`."""
    return build_whitener(stats, family, stack.ids, stack.weights.shape[2], per_expert=cfg.per_expert,
                          prior_tokens=cfg.prior_tokens, damp=cfg.damp, routing_weights=cfg.routing_weights,
                          routing_floor=cfg.routing_floor, channel_weights=cfg.channel_weights,
                          unreached_weight_space=True)


def sensitivity_whitener(stats: ActivationStats, family: str, stack, whiten: Whitener, chunk: int = 64,
                         power: float = 1.0) -> tuple[Whitener, dict]:
    """The whitener with each expert's gain^2 multiplied by its layer's sensitivity weight (globe.fit.objectives.
    sensitivity.layer_gains: the probe's KL per unit of THIS objective's normalised error of the probe's
    perturbation), and the record of it. gate / up only (the probe perturbs those)."""
    weights = stack.weights
    sq_norms = torch.empty(weights.shape[0], dtype=torch.float64)                    # ||W_i||^2 / numel = s_i^2
    for lo in range(0, weights.shape[0], chunk):
        sq_norms[lo:lo + chunk] = weights[lo:lo + chunk].double().square().mean((1, 2))

    def error(delta: torch.Tensor) -> torch.Tensor:
        return weighted_sq_norms(delta, whiten, chunk) / sq_norms.clamp_min(1e-300)
    w, record = layer_gains(stats, family, weights, stack.ids, error, power)
    return dataclasses.replace(whiten, gains=whiten.gains * w.sqrt()), record


def whiten_globally(weights: torch.Tensor, factor: torch.Tensor, chunk: int) -> torch.Tensor:
    """W_i L_g for every expert: [N, rows, k] fp32 (a new tensor; the fit's working copy)."""
    out = torch.empty(weights.shape, dtype=torch.float32)
    for lo in range(0, weights.shape[0], chunk):
        out[lo:lo + chunk] = weights[lo:lo + chunk].float() @ factor
    return out


def unwhiten_bank(bank: torch.Tensor, codes: torch.Tensor, factor: torch.Tensor):
    """Bank fitted to W L_g -> bank of W (B L_g^-1), unit atoms with codes rescaled: (bank, codes)."""
    m, r, k = bank.shape
    flat = torch.linalg.solve_triangular(factor.to(bank), bank.reshape(m * r, k), upper=False, left=False)
    return normalize_atoms(flat.view(m, r, k), codes)


@register
@dataclass
class ActivationObjective(Objective):
    """sum_i g_i^2 ||(W_i - A_i M_i) L_i||^2 (optionally Lambda_i on the left: channel weights).

    Spaces: target = Lambda W (or W); work = target L_g with cfg.global_init (AM then runs on one global whitening
    that is folded back into the bank afterwards), else target. `after_alternation` folds L_g^-1 back and runs
    variable projection under this objective."""

    whiten: Whitener
    config: ActivationConfig = field(default_factory=ActivationConfig)
    sensitivity: dict | None = None       # the per-layer sensitivity weights applied to whiten.gains (record)
    name = "activation"
    stage_name = "activation"
    cache_targets = True

    @classmethod
    def applies(cls, cfg) -> bool:
        return cfg.activation.stats is not None

    @classmethod
    def load(cls, cfg, inventory) -> ActivationStats:
        stats = load_stats(cfg.activation.stats)
        check_stats_fit(stats, inventory, cfg.activation.stats)
        return stats

    @classmethod
    def for_family(cls, data: ActivationStats, family: str, stack, cfg) -> "ActivationObjective":
        whiten = family_whitener(data, family, stack, cfg.activation)
        if not (cfg.activation.sensitivity and family in ("gate", "up") and probe_of(data)):
            return cls(whiten, cfg.activation)
        whiten, record = sensitivity_whitener(data, family, stack, whiten, cfg.train.chunk_size,
                                              cfg.activation.sensitivity_power)
        return cls(whiten, cfg.activation, record)

    def check_world(self, world: int) -> None:
        if world > 1:
            raise ConfigError("activation-aware fitting (activation.stats) is not supported in a distributed fit yet")

    def spaces(self, weights: torch.Tensor, chunk: int) -> Spaces:
        target = weights if self.whiten.rows is None else self.whiten.scale_rows(weights, chunk)
        if not self.config.global_init:
            return Spaces(original=weights, target=target, work=target)
        factor = self.whiten.global_factor()
        return Spaces(original=weights, target=target, work=whiten_globally(target, factor, chunk), factor=factor)

    def work_error(self, spaces: Spaces) -> str:
        """AM's space: one global whitening (W L_g), channel-weighted rows, or the plain weights."""
        if spaces.factor is not None:
            return "globally whitened error, AM space"
        return "channel-weighted weight error" if self.whiten.rows is not None else "weight error"

    def right(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return self.whiten(x, lo, hi)

    def select(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return self.whiten.select(x, experts)

    def unscale(self, adapters: torch.Tensor) -> torch.Tensor:
        return self.whiten.unscale_rows(adapters)

    def expert_hessians(self, experts: torch.Tensor) -> torch.Tensor:
        return self.whiten.hessians(experts)

    def bank_hessian(self) -> torch.Tensor:
        """L_g L_g^T: the experts' mean (routing-weighted) normalised C."""
        factor = self.whiten.global_factor().double()
        return factor @ factor.T

    def after_alternation(self, problem, solution: Solution) -> Solution:
        """From the AM's (bank, codes) in the work space: fold L_g^-1 back into the bank, then variable projection
        of (bank, codes) under this objective on the target weights (loss history: weighted relative error)."""
        bank, codes, spaces, cfg = solution.bank, solution.codes, problem.spaces, problem.cfg
        if spaces.factor is not None:
            bank, codes = unwhiten_bank(bank, codes, spaces.factor.to(bank.device))
        norm = Normalizer.fit(spaces.target, cfg.train.chunk_size, problem.names)
        losses: list[float] = []
        if self.config.steps > 0:
            options = VarProOptions.from_config(cfg, self.config.steps,
                                                label=f"VarPro {problem.family} (activation-weighted error)")
            bank, codes, losses = varpro_refine(SolverProblem(spaces.target, norm, self),
                                                Factors(bank, codes, solution.temperature), options)
            bank, codes = normalize_atoms(bank, codes)
        history = {**solution.history, "activation": losses}
        return Solution(bank=bank, codes=codes, norm=norm, temperature=solution.temperature, history=history)

    def memory(self, shape, solvers) -> dict[str, int]:
        """held: the fp32 work copy W L_g (global_init) and the row-weighted target (channel weights) (the
        whitener's factors are an input of the family fit, like its weights); the stage: variable projection (torch L-BFGS: the lean
        form needs plain weights) with every weighted target chunk cached in fp32 ([N, p, d])."""
        config = self.config
        s, npd = shape, shape.n * shape.p * shape.d * 4
        held = (npd if config.global_init else 0) + (npd if config.channel_weights else 0)
        stage = solvers.varpro_bytes(s.with_(varpro_steps=config.steps, lean=False)) + npd if config.steps else 0
        return {"held": held, self.stage_name: stage}

    def seconds(self, shape, rates, solvers) -> dict[str, float]:
        """The stage's variable projection: config.steps + 1 evaluations, each whitening every mixed atom set
        (x L_i: 2 r d^2 flops per expert) besides the weight-space evaluation; the targets whitened once."""
        config = self.config
        s, q = shape, rates
        if not config.steps:
            return {self.stage_name: 0.0}
        whiten = s.n * 2 * 2 * s.r * s.d * s.d / q.wd32
        once = s.n * 2 * s.p * s.d * s.d / q.wd32
        lean = s.with_(varpro_steps=config.steps, lean=False)
        return {self.stage_name: once + (config.steps + 1) * (solvers.varpro_evaluation_seconds(lean, q) + whiten)}

    def metrics(self, problem, fam, sq_err: torch.Tensor) -> dict:
        out = activation_metrics(fam, problem.spaces.original, problem.spaces.target, sq_err, self.whiten,
                                 problem.cfg.train.chunk_size)
        if self.whiten.unreached is not None:           # for the model card: fitted in weight space
            out["unreached"] = [f"L{int(l)}E{int(e)}" for l, e in fam.ids[self.whiten.unreached].tolist()]
        if self.sensitivity is not None:                # the per-layer weights the probe gave this objective
            out["sensitivity"] = self.sensitivity
        return out


def activation_metrics(fam, weights: torch.Tensor, fitted: torch.Tensor, weighted_sq_err: torch.Tensor,
                       whiten: Whitener, chunk: int) -> dict:
    """Weight-space error metrics of the final fit (rel_err, ...) on `weights`, plus its activation-weighted error
    act_rel_err; fitted: the weights the objective saw (Lambda W with row weights, else weights)."""
    n = weights.shape[0]
    sq_err, sq_norms = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        w = weights[lo:hi].float()
        sq_err[lo:hi] = (w - fam.reconstruct(slice(lo, hi))).square().sum((1, 2)).double()
        sq_norms[lo:hi] = w.double().square().sum((1, 2))
    act = float((weighted_sq_err.sum() / weighted_sq_norms(fitted, whiten, chunk).sum()).sqrt())
    return {**error_metrics(sq_err, sq_norms, fam.ids), "act_rel_err": act, "act_energy_captured": 1 - act ** 2}
