"""DistillConfig: how the compressed parameters are distilled to the original model (globe.tune.distill).

Saved with the artifact's provenance (result.source["distill"]) as a plain dict with its format_version.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from globe.errors import ConfigError, refuse_first

DISTILL_FORMAT_VERSION = 1
DEFAULT_STEPS = 0                  # off: 100 steps helped the embedded (tuning) model only, not the evaluation
                                   # models (benchmarks/results/distill.json; README); --distill-steps 100 opts in
DEFAULT_LR = 1e-3


@dataclass
class DistillConfig:
    """Steps (0: off, the default), Adam learning rate, sequences per step, teacher log-probs kept per token,
    validation share."""

    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch: int = 4                 # calibration sequences per step
    top_k: int = 64                # teacher log-probs kept per token (+ the rest of the mass as one bucket); 0: all
    validation: float = 0.125      # share of calibration sequences held out to accept or reject the result
    seed: int = 0
    format_version: int = DISTILL_FORMAT_VERSION

    def check(self) -> DistillConfig:
        problems = [(self.steps >= 0, f"--distill-steps must be >= 0 (got {self.steps})"),
                    (self.lr > 0, f"--distill-lr must be > 0 (got {self.lr})"),
                    (self.batch >= 1, f"distill batch must be >= 1 (got {self.batch})"),
                    (self.top_k >= 0, f"distill top_k must be >= 0 (got {self.top_k})"),
                    (0 <= self.validation < 1, f"distill validation share must be in [0, 1) (got {self.validation})"),
                    (self.format_version == DISTILL_FORMAT_VERSION,
                     f"distill config format_version {self.format_version} is not {DISTILL_FORMAT_VERSION}")]
        refuse_first(problems)
        return self

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"distill config: unknown keys {unknown}")
        return cls(**data).check()
