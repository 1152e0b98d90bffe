"""`FamilyProblem`: everything about one family's fit that does not change while it runs, built once.

The stages of globe.fit.engine take the problem plus the previous stage's result; none of them re-derives the
spaces, the normaliser, the device or the generator, and none of them sees the raw FitConfig branches
(objective, distribution) again: those are the `objective` and `shard` objects.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from globe.device import resolve_device
from globe.fit.config import FitConfig
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.engine.phases import phase
from globe.fit.solvers.normalize import Normalizer
from globe.fit.objectives.base import Objective, Spaces
from globe.fit.objectives.weights import WEIGHTS
from globe.fit.resume import FitProgress
from globe.fit.parallel.shard import ExpertShard
from globe.fit.solvers.adam import AdamOptions
from globe.fit.solvers.adapters import FinalizeOptions
from globe.fit.solvers.am import AMOptions
from globe.fit.solvers.nonlinear import NonlinearOptions
from globe.fit.solvers.problem import SolverProblem, VarProOptions


@dataclass(frozen=True)
class SolverOptions:
    """Every solver's options, built once from the FitConfig (the stages pass these, never the config)."""

    am: AMOptions
    varpro: VarProOptions
    finalize: FinalizeOptions
    adam: AdamOptions
    nonlinear: NonlinearOptions

    @classmethod
    def from_config(cls, cfg: FitConfig) -> SolverOptions:
        return cls(am=AMOptions.from_config(cfg), varpro=VarProOptions.from_config(cfg),
                   finalize=FinalizeOptions.from_config(cfg), adam=AdamOptions.from_config(cfg),
                   nonlinear=NonlinearOptions.from_config(cfg))


@dataclass
class FamilyProblem:
    """One family's fit: the weights in the objective's spaces, who they are, and how to fit them."""

    family: str
    cfg: FitConfig
    ids: torch.Tensor                 # [n_k, 2] (layer, expert) of this rank's experts
    names: list[str]                  # "gate of layer 3 expert 7", for error messages
    spaces: Spaces                    # original / target / work weights [n_k, p, d]
    objective: Objective            # what is minimised (globe.fit.objectives.base)
    shard: ExpertShard                # this rank's experts and the communicator
    device: torch.device
    gen: torch.Generator              # every random draw of the family
    norm: Normalizer | None = None    # of spaces.work (set by the normalise stage)
    on_progress: Callable[[FitProgress], None] | None = None
    timings: dict = field(default_factory=dict)
    options: SolverOptions | None = None   # built from cfg when not given

    def __post_init__(self) -> None:
        if self.options is None:
            self.options = SolverOptions.from_config(self.cfg)

    @classmethod
    def build(cls, weights: torch.Tensor, ids: torch.Tensor, cfg: FitConfig, family: str = "gate",
              generator: torch.Generator | None = None, comm: Comm = LOCAL, objective: Objective = WEIGHTS,
              on_progress: Callable[[FitProgress], None] | None = None, resumable: bool = False) -> FamilyProblem:
        """Validate the config against weights [n_k, p, d] and this rank's shard, then set the problem up."""
        cfg.validate().check_dims(*weights.shape)
        shard = ExpertShard.of(weights.shape[0], comm)
        shard.check(cfg, resumable or on_progress is not None)
        objective.check_world(shard.comm.world)
        gen = generator if generator is not None else torch.Generator().manual_seed(cfg.train.seed)
        names = [f"{family} of layer {int(l)} expert {int(e)}" for l, e in ids.tolist()]
        return cls(family=family, cfg=cfg, ids=ids, names=names,
                   spaces=objective.spaces(weights, cfg.train.chunk_size), objective=objective, shard=shard,
                   device=resolve_device(cfg.train.device), gen=gen, on_progress=on_progress)

    @property
    def comm(self) -> Comm:
        return self.shard.comm

    @property
    def work(self) -> SolverProblem:
        """The AM / VarPro problem: the work weights in weight space (phi = identity inside the loop)."""
        return SolverProblem(self.spaces.work, self.norm, WEIGHTS, self.comm)

    def phase(self, name: str):
        """Context manager timing phase `name` (globe.fit.engine.phases) into timings."""
        return phase(self.timings, name, self.device, self.family)

    def checkpoint(self, progress: FitProgress) -> None:
        """Hand the progress (with the generator's state) to the store, if there is one."""
        if self.on_progress is not None:
            progress.gen_state = self.gen.get_state()
            self.on_progress(progress)
