"""What a fit minimises: the `Objective` base class every objective subclasses, registered by name.

An objective is sum_i ||(W_i - A_i M_i) R_i||_F^2 over the experts of a family, with mixed atoms
M_i = phi(sum_j alpha_ij B_j) and a right weighting R_i. The stages that solve for adapters or refine the bank
(globe.fit.solvers.adapters.finalize, globe.fit.solvers.varpro, globe.fit.solvers.adam) only ever call these
methods, and the engine asks the objective (never its type) what it supports, so a new objective is one module
in this folder: a subclass with a `name`, decorated with `@register`, whose `applies(cfg)` says when a fit uses
it (the registry imports every module of the folder, so nothing else needs to know about it):

- globe.fit.objectives.weights.WeightSpace (R_i = I): the default, ||W_i - W_hat_i||^2.
- globe.fit.objectives.activation.ActivationObjective (R_i = g_i L_i, L_i L_i^T the input second moment).

Spaces: an objective may fit a transformed copy of the weights (`spaces`): `target` is what the objective
compares against (Lambda W for channel weights, else W), `work` the space the warm start and alternating
minimisation run in (W L_g for a globally whitened start, else `target`).
Costs: `memory(shape)` / `seconds(shape, rates)` give the bytes and seconds of the objective's own stage
(`stage_name`) and the extra bytes it holds through the fit, for the dry run (globe.fit.planning).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from globe.fit.registry import Registry
from globe.fit.solvers.normalize import Normalizer

OBJECTIVES: Registry = Registry("globe.fit.objectives", "objective")
register = OBJECTIVES.register


def objective_class(cfg) -> type["Objective"]:
    """The objective a fit with config `cfg` minimises: the registered one whose applies(cfg) holds (the
    default, weight space, applies when no other does)."""
    kinds = OBJECTIVES.all().values()
    chosen = [c for c in kinds if not c.default and c.applies(cfg)]
    return chosen[0] if chosen else next(c for c in kinds if c.default)


@dataclass
class Spaces:
    """The weights a family fit sees: as given, as the objective compares them, as AM works on them."""

    original: torch.Tensor            # [N, p, d] as stored
    target: torch.Tensor              # [N, p, d] what the objective compares against
    work: torch.Tensor                # [N, p, d] the space of warm start + AM
    factor: torch.Tensor | None = None   # [d, d] right factor taking `target` to `work` (None: work is target)


@dataclass
class Solution:
    """(bank, codes) with the normaliser of the space they were fitted in and the losses so far."""

    bank: torch.Tensor                # [m, r, d]
    codes: torch.Tensor               # [N, m]
    norm: Normalizer
    temperature: float
    history: dict = field(default_factory=dict)


class Objective:
    """sum_i ||(W_i - A_i M_i) R_i||^2: the hooks every stage calls. Subclasses implement the spaces and R_i."""

    name: str = ""
    default = False                   # the objective of a fit that configures none (weight space)
    stage_name: str | None = None     # phase name of after_alternation (None: the objective has no stage)
    cache_targets = False             # whether refine keeps the (weighted) target chunks in memory
    plain_weights = False             # R_i = I: solvers may use their weight-space shortcuts (lean VarPro)
    nonlinear_ok = False              # the nonlinear stages (globe.fit.engine.nonlinear) support it

    # ---- selection and set-up ----
    @classmethod
    def applies(cls, cfg) -> bool:
        """Whether a fit with config cfg minimises this objective."""
        return False

    @classmethod
    def load(cls, cfg, inventory):
        """Data the objective reads once per fit (e.g. calibration statistics), checked against the checkpoint's
        inventory; handed to for_family. None by default."""
        return None

    @classmethod
    def for_family(cls, data, family: str, stack, cfg) -> "Objective":
        """The objective of one family (stack: its ExpertStack) from load's data."""
        raise NotImplementedError

    def check_world(self, world: int) -> None:
        """Raise ConfigError if a fit over `world` processes cannot minimise this objective."""

    # ---- the hooks of the stages ----
    def spaces(self, weights: torch.Tensor, chunk: int) -> Spaces:
        raise NotImplementedError

    def right(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """x [hi - lo, rows, d] of experts lo:hi times R_i."""
        raise NotImplementedError

    def select(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [c, rows, d] of the given experts [c] times R_i."""
        raise NotImplementedError

    def targets(self, weights: torch.Tensor, norm: Normalizer, lo: int, hi: int, device) -> torch.Tensor:
        """Normalised experts lo:hi in the objective's space: W_i R_i / s_i, [c, p, d] fp32."""
        return self.right(norm.chunk(weights, lo, hi, device), lo, hi)

    def total(self, targets, bounds: list[tuple[int, int]], n: int, p: int, d: int) -> float:
        """sum_i ||W_i R_i / s_i||^2 (the loss normaliser)."""
        return sum(float(targets(lo, hi).square().sum()) for lo, hi in bounds)

    def bank_hessian(self) -> torch.Tensor | None:
        """The [d, d] second moment the quantized bank's error is weighted by (the experts' mean C); None: I."""
        return None

    def expert_hessians(self, experts: torch.Tensor) -> torch.Tensor | None:
        """The given experts' [c, d, d] fp64 second moments a quantized residual's GPTQ is run under (undamped: GPTQ
        damps itself); None: R_i R_i^T (globe.fit.solvers.residual.expert_hessians)."""
        return None

    def unscale(self, adapters: torch.Tensor) -> torch.Tensor:
        """Adapters fitted in the target space -> adapters of the original weights."""
        return adapters

    def work_error(self, spaces: Spaces) -> str:
        """What the warm start, AM and the first variable projection minimise, in words (for logs and bars)."""
        return "weight error"

    def after_alternation(self, problem, solution: Solution) -> Solution:
        """The objective's own stage after [AM, VarPro] x cycles (default: none)."""
        return solution

    def metrics(self, problem, fam, sq_err: torch.Tensor) -> dict:
        """Extra metrics of the finished family (default: none)."""
        return {}

    # ---- costs, for the dry run ----
    def memory(self, shape, solvers) -> dict[str, int]:
        """Peak bytes of the objective's stage {stage_name: bytes} and, under "held", the bytes it keeps through
        the whole fit (its spaces); shape: a globe.fit.planning.estimate.FitShape, solvers: the solvers' costs
        (globe.fit.planning.plan.SOLVER_COSTS: varpro_bytes(shape), varpro_evaluation_seconds(shape, rates))."""
        return {}

    def seconds(self, shape, rates, solvers) -> dict[str, float]:
        """Seconds of the objective's stage {stage_name: seconds}."""
        return {}
