"""ExpertConfig: the whole-expert refinement of a fit (globe.fit.engine.expert), the `expert` section of FitConfig.

After gate and up are fitted (each on its own, per-matrix objective), the refinement fits their compressed
parameters together (banks, nonzero code values, adapters) to the routed expert's whole output
down_i(act(G_hat_i x) * (U_hat_i x)) on a capped sample of the tokens routed to expert i during calibration
(globe.calibration.routed), router-weighted. Off while steps is 0 (the default of a fit); `globe compress` runs COMPRESS_STEPS where it applies.
With quantized factors, quant_steps > 0 trains their float parts (scales, zeros, code values) on the same objective
after the quantize stage (globe.fit.engine.quant_expert); it rides on the expert phase (its samples).
"""
from __future__ import annotations

from dataclasses import dataclass

from globe.errors import refuse_first

EXPERT_FORMAT_VERSION = 1
COMPRESS_STEPS = 200               # `globe compress`'s default (benchmarks/results/whole_expert.json measures it)
COMPRESS_QUANT_STEPS = 60          # `globe compress`'s default of quant_steps (benchmarks/results/quant_expert.json)


@dataclass
class ExpertConfig:
    """Adam steps (0: off), step size relative to each factor's RMS, routed samples kept per expert, the share of
    them held out to pick the best step, samples per step, steps between checks, experts per gradient chunk, the
    samples file."""

    steps: int = 0                 # Adam steps; 0: off (benchmarks/whole_expert.py measures 200)
    lr: float = 0.002              # step size x each factor's RMS (nonzero entries); tuned on the embedded model
    samples: int = 1024            # routed tokens kept per expert at calibration (the first ones seen)
    batch: int = 256               # training samples per expert in one step (drawn, seeded); 0: all of them
    max_sample_mb: int = 512       # cap on the routed samples of all experts together (samples per expert lowered)
    validation: float = 0.25       # share of each expert's samples held out: the best step on them is kept
    eval_every: int = 10           # steps between validation checks
    chunk: int = 64                # experts per gradient chunk (memory: chunk x samples x (d + 3 p) floats)
    quant_steps: int = 0           # steps of the quantized expert phase (globe.fit.engine.quant_expert); 0: off
    quant_lr: float = 0.002        # its step size x each float part's RMS (tuned with 60 steps on the embedded model)
    samples_file: str | None = None   # routed samples (globe.calibration.routed); set by `globe compress`
    format_version: int = EXPERT_FORMAT_VERSION

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def check(self) -> ExpertConfig:
        problems = [(self.steps >= 0, f"--expert-steps must be >= 0 (got {self.steps})"),
                    (self.lr > 0, f"expert.lr must be > 0 (got {self.lr})"),
                    (self.quant_steps >= 0, f"--quant-steps must be >= 0 (got {self.quant_steps})"),
                    (self.quant_lr > 0, f"expert.quant_lr must be > 0 (got {self.quant_lr})"),
                    (self.samples >= 2, f"expert.samples must be >= 2 (got {self.samples})"),
                    (self.batch >= 0, f"expert.batch must be >= 0 (got {self.batch})"),
                    (self.max_sample_mb >= 1, f"expert.max_sample_mb must be >= 1 (got {self.max_sample_mb})"),
                    (0 <= self.validation < 1, f"expert.validation must be in [0, 1) (got {self.validation})"),
                    (self.eval_every >= 1, f"expert.eval_every must be >= 1 (got {self.eval_every})"),
                    (self.chunk >= 1, f"expert.chunk must be >= 1 (got {self.chunk})"),
                    (self.format_version == EXPERT_FORMAT_VERSION,
                     f"expert config format_version {self.format_version} is not {EXPERT_FORMAT_VERSION}")]
        refuse_first(problems)
        return self
