"""Dataclass configuration of a fit (bank, sparsity, train), round-tripping to dict/JSON/YAML with a format version."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from globe.errors import ConfigError, refuse_first
from globe.fit.expert_config import ExpertConfig

log = logging.getLogger(__name__)
CONFIG_FORMAT_VERSION = 1
PHIS = ("identity", "silu", "tanh")
INITS = ("svd", "ts_pca", "kmeans", "greedy", "hybrid")
CODERS = ("entmax15", "sparsemax")
RANK_ALLOCATIONS = ("uniform", "sensitivity")   # globe.fit.engine.ranks.ALLOCATIONS implements each
MAX_SEED = 2 ** 63 - 1 - 8        # family k is seeded with seed + k; torch.Generator takes 64-bit seeds


@dataclass
class BankConfig:
    """Shape of each family's bank: m atoms of r x d; None lets the budget solver choose."""

    m: int | None = None          # number of atoms
    r: int | None = None          # adapter rank (rows of an atom)
    budget: float = 0.5           # stored params / dense params per family, used when m or r is None
    phi: str = "identity"         # nonlinearity applied to the mixed atoms
    init: str = "hybrid"          # warm start
    families: tuple[str, ...] = ("gate", "up")


@dataclass
class SparsityConfig:
    """Sparse codes alpha_i = entmax(logits_i / T) with T steered to a target median support."""

    method: str = "entmax15"
    target_support: int = 12
    eta: float = 0.5              # controller gain
    t_init: float = 0.5
    t_min: float = 1e-3
    t_max: float = 1e2
    eps: float = 1e-3             # prune codes below eps * max code of the expert


@dataclass
class TrainConfig:
    """Alternating minimisation, optional Adam refinement, numerics and resources."""

    am_iters: int = 30
    tol: float = 1e-5             # stop when relative error improves by less than this
    ridge: float = 1e-6           # relative ridge of every normal-equation system
    mod: str = "weighted"         # dictionary update: weighted (exact, A^T A-weighted CG) | normal (m x m MOD on Y)
    restarts: int = 1             # warm start + AM + VarPro from this many seeds; the best is kept
    cycles: int = 1               # rounds of (AM, VarPro); later rounds re-select supports after VarPro
    varpro_steps: int = 100       # L-BFGS evaluations of the variable-projection refinement (0: off)
    refine_steps: int = 0         # Adam steps with the real phi (0: off)
    refine_lr: float = 1e-3
    refine_batch: int = 32        # experts per refinement step
    amp: str = "none"             # none | bf16 | fp16
    grad_checkpoint: bool = False
    chunk_size: int = 64          # experts processed at once in fp32
    precision: str = "auto"       # products that tolerate rounding (W M^T, A^T W, support Grams): fp32 | bf16 |
                                  # auto (bf16 for large bf16 checkpoints where bf16 matmuls are fast, else fp32)
    checkpoint_every: int = 5     # AM iterations between in-progress checkpoints (0: only at phase ends)
    seed: int = 0
    device: str = "cpu"
    collect_stats: bool = True


@dataclass
class ActivationConfig:
    """Activation-aware fitting (globe.fit.objectives.activation) from `globe calibrate` statistics; off while stats is None.

    The warm start and alternating minimisation run on W_i L_g (one global whitening, folded back into the bank,
    which stays shared); then variable projection refines bank and codes under sum_i g_i^2 ||(W_i - W_hat_i) L_i||^2
    (C_i = L_i L_i^T of each layer or expert) and the adapters are refitted exactly for it."""

    stats: str | None = None       # statistics file written by `globe calibrate`
    per_expert: bool = True        # C from the tokens routed to each expert, blended with the layer's C
    prior_tokens: float = 64.0     # weight of the layer's C in that blend, in tokens
    routing_weights: bool = False  # weight each expert's error by its routing frequency
    routing_floor: float = 0.1     # weight = (1 - floor) * frequency / mean frequency + floor
    damp: float = 0.01             # ridge on C scaled to mean eigenvalue 1
    steps: int = 100               # L-BFGS evaluations of the activation-aware variable projection
    channel_weights: bool = False  # weight gate/up rows by their channel's first-order effect on the output
    global_init: bool = True       # run warm start + AM on W_i L_g (L_g: mean C over experts), unwhiten the bank
    sensitivity: bool = True       # weight each layer by the statistics' sensitivity probe, where they carry one
                                   # (globe.fit.objectives.sensitivity; `globe compress` runs the probe)
    sensitivity_power: float = 0.5  # the weights are c_l ** power (0: every layer alike, 1: KL per unit error);
                                    # 0.5: embedded model KL 0.98 / 0.91 / 0.91x off's at -25 / -35 / -40 %, 1:
                                    # 1.02 / 0.92 / 0.97x (benchmarks/results/sensitivity.json)


@dataclass
class NonlinearConfig:
    """End-to-end nonlinear bank fit (globe.fit.solvers.nonlinear): Adam on the bank and the codes of
    W_i = A_i phi(sum_j alpha_ij B_j), full batch, adapters solved exactly at every step, best state kept; from a
    block SVD start (start=groups, replacing warm start + AM + VarPro; the rank comes from bank.budget or bank.r,
    the atoms are `groups` per layer) or from the AM / VarPro solution (start=am). One process, weight space only.
    Off (enabled=False, the default for now) gives the linear AM fit of earlier versions."""

    enabled: bool = False
    start: str = "groups"          # groups: block SVD start per layer in one bank (replaces warm start + AM);
                                   # am: refine the AM / VarPro solution (its shape and supports)
    groups: int = 0                # atoms per layer for start=groups (0: experts per layer / 4)
    scope: str = "layer"           # start=groups: layer (codes stay in their layer's block) | global (any atom)
    signed_codes: bool = True      # real codes (may be negative) instead of gain * softmax
    phi: str = "tanh"              # phi of the refined bank (bank.phi is the phi of AM / VarPro)
    steps: int = 600               # full-batch Adam steps (parity with MoBE at 3000 epochs on the tuning set)
    lr: float = 0.03               # constant learning rate (atoms start with entries of RMS 1/sqrt(d))
    eval_every: int = 25           # steps between best-state checks
    off_logit: float = -10.0       # start logit of the atoms an expert's code does not use
    learn_gain: bool = True        # learn each expert's code sum (the scale entering phi)


QUANT_BITS = (2, 3, 4, 8)
QUANT_METHODS = ("gptq", "rtn", "hqq")


@dataclass
class QuantSection:
    """Quantized storage of the fitted factors (the fit's last stage, globe.fit.engine.quantize): the bank is
    quantized (GPTQ under the experts' mean input second moment, or I without calibration statistics), the adapters
    are refitted exactly against the quantized bank (activation-weighted with statistics, least squares otherwise)
    and quantized with GPTQ error feedback under H_i = M_i C_i M_i^T. Off while bits is None (the default), so a
    plain fit is unchanged; `globe compress` turns it on. Codes and expert scales stay floating point."""

    bits: int | None = None        # 2, 3, 4 or 8 bits per bank / adapter entry; None: factors stored unquantized
    group: int = 64                # entries per fp16 scale / zero pair, along each factor's input axis
    method: str = "gptq"           # gptq | rtn | hqq (rtn / hqq: no error feedback, no calibration needed)
    residual_bits: int | None = None   # also store each expert's residual W_i - W_hat_i at these bits (GPTQ under
                                       # its routed Hessian with statistics, RTN without); None: no residual
    residual_group: int = 128      # entries per fp16 scale / zero pair of the residual, along its input axis


@dataclass
class RankConfig:
    """How a family's rank is spread over its layers (globe.fit.engine.ranks). uniform: every layer at r (the
    budget solver's). sensitivity: fit at r_max = headroom * r, order the atoms' rows by energy, then give each
    layer the rank whose measured error drop per parameter is largest, spending the uniform fit's parameters."""

    allocation: str = "uniform"    # uniform | sensitivity (globe.fit.engine.ranks.ALLOCATIONS)
    headroom: float = 1.5          # r_max / r of the fit that the layers' ranks are cut from
    step: int = 0                  # rank grid of the allocation (0: r_max / 8)


@dataclass
class FitConfig:
    """Everything a fit needs; serialised into globe_config.json."""

    bank: BankConfig = field(default_factory=BankConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    nonlinear: NonlinearConfig = field(default_factory=NonlinearConfig)
    ranks: RankConfig = field(default_factory=RankConfig)
    quant: QuantSection = field(default_factory=QuantSection)
    expert: ExpertConfig = field(default_factory=ExpertConfig)   # whole-expert refinement (off)
    format_version: int = CONFIG_FORMAT_VERSION

    def validate(self) -> "FitConfig":
        b, s, t, a, nl = self.bank, self.sparsity, self.train, self.activation, self.nonlinear
        if self.ranks.allocation not in RANK_ALLOCATIONS:
            raise ConfigError(f"ranks.allocation must be one of {', '.join(RANK_ALLOCATIONS)}, not "
                              f"{self.ranks.allocation!r} (--rank-allocation)")
        if not self.ranks.headroom >= 1 or self.ranks.step < 0:
            raise ConfigError(f"ranks.headroom must be >= 1 and ranks.step >= 0 (got {self.ranks.headroom}, "
                              f"{self.ranks.step})")
        if b.m is not None and b.m > 0 and s.target_support == SparsityConfig.target_support and s.target_support > b.m:
            s.target_support = max(1, b.m // 2)                         # the default adapts to an explicit m
            log.warning("bank.m=%d is below the default target support %d: target support set to %d (pass "
                        "--target-support / sparsity.target_support to choose)", b.m, SparsityConfig.target_support,
                        s.target_support)
        if 0.95 < b.budget < 1.0 and (b.m is None or b.r is None):
            log.warning("bank.budget %.4g keeps %.1f %% of the dense parameters: it saves almost nothing", b.budget,
                        100 * b.budget)
        checks = [
            (b.m is None or b.m > 0, f"bank.m must be > 0 (got {b.m})"),
            (b.r is None or b.r > 0, f"bank.r must be > 0 (got {b.r})"),
            (0.0 < b.budget < 1.0 or (b.budget == 0 and self.quant.residual_bits is not None),
             f"bank.budget must be in (0, 1), or 0 with quantized residuals (plain quantization) (got {b.budget})"),
            (b.phi in PHIS, f"bank.phi must be one of {PHIS} (got {b.phi!r})"),
            (b.init in INITS, f"bank.init must be one of {INITS} (got {b.init!r})"),
            (set(b.families) <= {"gate", "up", "down"} and b.families, f"bank.families invalid: {b.families}"),
            (s.method in CODERS, f"sparsity.method must be one of {CODERS} (got {s.method!r})"),
            (s.target_support >= 1, f"sparsity.target_support must be >= 1 (got {s.target_support})"),
            (b.m is None or s.target_support <= b.m,
             f"sparsity.target_support ({s.target_support}) must be <= bank.m ({b.m})"),
            (0 < s.t_min <= s.t_init <= s.t_max, "need 0 < sparsity.t_min <= t_init <= t_max"),
            (min(t.am_iters, t.refine_steps, t.varpro_steps) >= 0, "iteration counts must be >= 0"),
            (t.restarts >= 1, f"train.restarts must be >= 1 (got {t.restarts})"),
            (t.cycles >= 1, f"train.cycles must be >= 1 (got {t.cycles})"),
            (t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (got {t.checkpoint_every})"),
            (0 <= t.seed <= MAX_SEED, f"train.seed must be in 0..{MAX_SEED} (got {t.seed})"),
            (t.chunk_size >= 1, f"train.chunk_size must be >= 1 (got {t.chunk_size})"),
            (t.amp in ("none", "bf16", "fp16"), f"train.amp must be none|bf16|fp16 (got {t.amp!r})"),
            (t.ridge >= 0, "train.ridge must be >= 0"),
            (t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto|fp32|bf16 (got {t.precision!r})"),
            (t.mod in ("weighted", "normal"), f"train.mod must be weighted|normal (got {t.mod!r})"),
            (a.damp > 0 and a.prior_tokens >= 0 and a.steps >= 0, "activation.damp must be > 0, prior_tokens "
             "and steps >= 0"),
            (0 < a.routing_floor <= 1, f"activation.routing_floor must be in (0, 1] (got {a.routing_floor})"),
            (a.sensitivity_power >= 0, f"activation.sensitivity_power must be >= 0 (got {a.sensitivity_power})"),
            (nl.phi in PHIS, f"nonlinear.phi must be one of {PHIS} (got {nl.phi!r})"),
            (nl.steps >= 0 and nl.eval_every >= 1, "nonlinear.steps must be >= 0 and nonlinear.eval_every >= 1"),
            (nl.lr > 0, f"nonlinear.lr must be > 0 (got {nl.lr})"),
            (nl.start in ("groups", "am"), f"nonlinear.start must be groups|am (got {nl.start!r})"),
            (nl.scope in ("layer", "global"), f"nonlinear.scope must be layer|global (got {nl.scope!r})"),
            (nl.groups >= 0, f"nonlinear.groups must be >= 0 (got {nl.groups})"),
            (self.quant.bits is None or self.quant.bits in QUANT_BITS,
             f"quant.bits must be one of {QUANT_BITS} or null (got {self.quant.bits})"),
            (self.quant.group >= 1, f"quant.group must be >= 1 (got {self.quant.group})"),
            (self.quant.residual_bits is None or self.quant.residual_bits in QUANT_BITS,
             f"quant.residual_bits must be one of {QUANT_BITS} or null (got {self.quant.residual_bits})"),
            (self.quant.residual_group >= 1, f"quant.residual_group must be >= 1 (got {self.quant.residual_group})"),
            (self.quant.residual_bits is None or self.quant.bits is not None,
             "--residual-bits (quant.residual_bits) needs quantized factors (--bits)"),
            (self.quant.method in QUANT_METHODS, f"quant.method must be one of {QUANT_METHODS} "
             f"(got {self.quant.method!r})"),
            (self.quant.bits is None or self.ranks.allocation == "uniform",
             "--bits (quant.bits) with --rank-allocation sensitivity is not supported yet: quantized adapters are "
             "stored with one rank per family; drop one of the two"),
        ]
        refuse_first(checks)
        refusal = self.expert_refusal() if self.expert.enabled else None
        if refusal is not None:
            raise ConfigError(refusal)
        self.expert.check()
        return self

    def expert_refusal(self) -> str | None:
        """Why the whole-expert phase (expert.steps > 0) cannot run with the rest of this config; None: it can.
        validate() refuses an enabled phase with this line; `globe compress` leaves its default phase off."""
        if self.quant.residual_bits is not None:
            return ("--expert-steps with --residual-bits (or a plain-quantization --size) is not supported yet: the "
                    "residual would be taken against the refined factors, not the original weights; drop one of "
                    "the two")
        return None

    def check_dims(self, n: int, p: int, d: int) -> "FitConfig":
        """Range checks that need the checkpoint's dimensions: N experts of p x d matrices."""
        b = self.bank
        if b.r is not None and b.r > min(p, d):
            raise ConfigError(f"bank.r ({b.r}) must be <= min(p, d) = {min(p, d)} for this checkpoint "
                              f"(p={p}, d={d})")
        rank = b.r if b.r is not None else min(p, d)
        if b.m is not None and b.m > n * rank:
            raise ConfigError(f"bank.m ({b.m}) must be <= N * r = {n} * {rank} = {n * rank} for this checkpoint "
                              f"(more atoms than the experts' adapter rows can use); lower --m")
        if b.m is not None and b.r is not None and b.m * b.r * d + n * p * b.r >= n * p * d:
            log.warning("bank.m=%d, bank.r=%d store at least as many parameters as the dense experts", b.m, b.r)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every section; `ranks`, `quant` and `expert` only when not at their defaults (so the config of a uniform,
        unquantized fit, and the artifact id hashed from it, are what they were before those sections existed)."""
        out = dataclasses.asdict(self)
        if self.ranks == RankConfig():
            del out["ranks"]
        if self.quant.bits is None and self.quant == QuantSection():
            del out["quant"]
        elif self.quant.residual_bits is None and self.quant.residual_group == QuantSection.residual_group:
            del out["quant"]["residual_bits"], out["quant"]["residual_group"]   # as before residuals existed
        if self.expert == ExpertConfig():
            del out["expert"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FitConfig":
        """FitConfig from a dict as to_dict() writes it; ConfigError naming the key of any unknown field or
        value of the wrong type (sections missing from `data` take their defaults)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a fit config must be a mapping of sections, not {type(data).__name__}")
        data = dict(data)
        version = data.pop("format_version", CONFIG_FORMAT_VERSION)
        if not _is_int(version) or version < 1:
            raise ConfigError(f"format_version must be a positive integer (got {version!r})")
        if version > CONFIG_FORMAT_VERSION:
            raise ConfigError(f"fit config format_version {version} is newer than supported "
                              f"({CONFIG_FORMAT_VERSION}); upgrade globe")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown fit config sections: {unknown}")
        sections = {name: _section(name, kind, data.get(name, {})) for name, kind in SECTIONS.items()}
        return cls(**sections)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        d = self.to_dict()
        d["bank"]["families"] = list(d["bank"]["families"])
        return yaml.safe_dump(d, sort_keys=False)

    @classmethod
    def from_file(cls, path: str | Path) -> "FitConfig":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"fit config file {path} not found; pass an existing --config file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
                              ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read fit config {path} ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML/JSON ({exc.__class__.__name__})") from None
        try:
            return cls.from_dict({} if data is None else data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


SECTIONS: dict[str, type] = {"bank": BankConfig, "sparsity": SparsityConfig, "train": TrainConfig,
                             "activation": ActivationConfig, "nonlinear": NonlinearConfig, "ranks": RankConfig,
                             "quant": QuantSection, "expert": ExpertConfig}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(where: str, annotation: str, value: Any) -> Any:
    """`value` checked against a dataclass field annotation (int, float, str, bool, tuple[str, ...], X | None);
    returns it (ints widened to float, lists to tuples); ConfigError naming `where` otherwise."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    kind = kinds[0]
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and _is_int(value):
        return value
    if kind == "float" and (_is_int(value) or isinstance(value, float)):
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number (got {value!r})")
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind.startswith("tuple") and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    want = {"tuple[str, ...]": "a list of strings", "int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string"}.get(kind, kind)
    raise ConfigError(f"{where} must be {want}{' or null' if 'None' in kinds else ''} (got {value!r})")


def _section(name: str, kind: type, data: Any) -> Any:
    """One config section (a dataclass) from a mapping, every value type-checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"fit config section {name!r} must be a mapping of fields (got {data!r})")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"invalid fit config: unknown field(s) {', '.join(f'{name}.{k}' for k in unknown)}")
    return kind(**{k: _typed(f"{name}.{k}", str(fields[k].type), v) for k, v in data.items()})
