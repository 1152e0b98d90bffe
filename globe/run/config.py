"""Configuration of a whole run beyond the fit itself: model, runtime cache, export, experiment tracking.

These dataclasses (with globe.fit.config's BankConfig, SparsityConfig, TrainConfig) are the single source of the
defaults: the `globe` CLI reads its defaults from them and the Hydra entry point (globe.hydra_app,
`python -m globe.fit_banks`) registers them as structured configs (groups model, bank, sparsity, train, cache,
export, wandb). Runtime modes are globe.runtime.MODES, devices globe.device.DEVICES.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from globe.assets import DEFAULT_MODEL_DIR
from globe.fit.config import ActivationConfig, BankConfig, FitConfig, NonlinearConfig, SparsityConfig, TrainConfig


@dataclass
class ModelConfig:
    """The checkpoint to compress: a local directory, or a hub id `org/name` (downloaded where a network exists)."""

    path: str = str(DEFAULT_MODEL_DIR)


@dataclass
class CacheConfig:
    """GloBE runtime used when the fitted model is evaluated or loaded."""

    mode: str = "cached"              # cached | factored | dense
    size: int | None = None           # experts per layer kept precomposed in cached mode (None: half)
    warmup_tokens: int = 1024         # calibration tokens for the cache warm-up


@dataclass
class ExportConfig:
    """Optional export after the fit: a compressed checkpoint, or a dense Hugging Face one."""

    dir: str | None = None            # None: no export
    dense: bool = False
    max_shard_size: str = "5GB"


@dataclass
class WandbConfig:
    """Weights & Biases logging; never required (disabled by default, wandb imported only when enabled)."""

    mode: str = "disabled"            # disabled | offline | online
    project: str = "globe"


@dataclass
class RunConfig:
    """Primary config of the Hydra entry point (`python -m globe.fit_banks`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    nonlinear: NonlinearConfig = field(default_factory=NonlinearConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    out: str = "runs/default"         # artifact directory
    resume: bool = False
    overwrite: bool = False
    log_level: str = "INFO"

    def fit_config(self) -> FitConfig:
        return FitConfig(bank=self.bank, sparsity=self.sparsity, train=self.train,
                         activation=self.activation, nonlinear=self.nonlinear).validate()
