"""Bytes, not parameters: the byte model of a compressed model and the solver of `globe compress --size`.

Stored bytes of one fitted family (the artifact's layout, globe.formats.artifact; for a fitted family the same
count as globe.fit.engine.quantize.stored_bytes):
    bank       [m, r, d]   packed at `bits` (ceil(numel * bits / 8) bytes) + an fp16 scale and an fp16 zero per
                           group of `group` entries along d; unquantized: value bytes per entry
    adapters   [N, p, r]   the same, groups along r (a rank per layer: only each layer's real columns)
    codes      nnz values (value bytes) + nnz int32 atom indices + (N + 1) int64 row pointers
    scales     N fp32;  ids  N x 2 int32
    (codes, scales and ids: none for a family with no base, r = 0, globe.fit.engine.plain: its compressed
    checkpoint stores code width k = 0, and the artifact's bookkeeping of it is not counted)
    residual   [N, p, d]   optional (quant.residual_bits): each expert's W_i - W_hat_i packed at its bits + fp16
                           scale and zero per group of residual_group entries along d
Value bytes: the source checkpoint's floating dtype (2 for bf16). The whole checkpoint: every tensor of the source
that no fitted family replaces, at its stored dtype (from the safetensors headers), plus the fitted families.
Counted: tensor bytes only (file headers, config.json and tokenizer files are not).

Before a fit the code non-zeros are unknown (the controller holds their median near the target support); the size
solver counts every code as non-zero (N x m), so the bytes it plans are an upper bound of what the fit writes.

    plan = solve_size(inv, other_bytes, target_bytes, cfg)    # SizePlan: bits, budget, support, predicted bytes
    apply_size(cfg, "path/to/model", 0.02)                    # cfg set to meet 0.02 GiB (ConfigError if it cannot)
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields

import torch

from globe.core.params import dense_params
from globe.errors import ConfigError, GlobeError
from globe.fit.config import FitConfig, QuantSection
from globe.fit.engine.plain import PLAIN_ATOMS, PLAIN_RANK
from globe.fit.solvers.budget import SHARED_ATOMS_PER_SUPPORT, candidate_shapes, shared_shapes
from globe.quant import packed_bytes

log = logging.getLogger(__name__)

GIB = 2**30
SCALE_BYTES = 4                  # fp16 scale + fp16 zero per group (globe.quant.tensor)
INDEX_BYTES, INDPTR_BYTES, EXPERT_SCALE_BYTES, ID_BYTES = 4, 8, 4, 8
# The order in which the size solver tries the bits (None: unquantized factors). benchmarks/results/bytes.json
# (globe+refit rows): at every size measured, 4-bit factors at a larger budget beat 8-bit or 3-bit factors at the
# same bytes, and bf16 factors are never better per byte; the others only reach sizes 4 bits cannot.
BITS_PREFERENCE: tuple[int | None, ...] = (4, 3, 2, 8, None)
# At and above the bytes of 4-bit group-128 quantization of the routed experts (4.25 bits per weight), plain GPTQ
# is better than GloBE's factors on the measured models (benchmarks/results/bytes.json: 2.1-3.0x lower KL at
# 4.25-4.6 bits).
PLAIN_QUANT_BITS = 4 + 8 * SCALE_BYTES / 128
# The kind of family --size tries first, by the bits per routed weight a family may take (choose_kind): factors only
# below residual_from_bits, a small GloBE part (budget in [residual_min_budget, residual_max_budget], the factor
# bits) + quantized residuals from there, plain quantization of the experts from plain_from_bits. Since the kind is
# chosen by measured KL (globe.run.size_choice: every kind of CANDIDATE_KINDS that fits is fitted and the lowest KL
# on held-out calibration tokens kept), SIZE_RULE is only the order of trying (its kind first: kept on a tie) and
# the choice itself where nothing is calibrated (--no-calibration, or --bits / --no-quant: factors only). Measured
# on the TUNING model only (the embedded globe-tiny-moe: benchmarks/size_rule.py -> benchmarks/results/
# size_rule.json): factors only had the lowest KL at 3.0 and 4.0 bits, plain quantization at 4.5 (2.4x lower KL
# than factors), a small GloBE part + residuals at no size measured; so plain from 4.25 bits (where 4-bit plain
# quantization first fits) and the residual kind only where a caller asks for it (residual_from_bits =
# plain_from_bits).
SIZE_RULE: dict[str, float] = {"residual_from_bits": PLAIN_QUANT_BITS, "plain_from_bits": PLAIN_QUANT_BITS,
                               "residual_min_budget": 0.02, "residual_max_budget": 0.2}
# (bits, group) of residuals / plain quantization, most bytes first (2 + 4 * 8 / group extra bits per weight...)
RESIDUAL_OPTIONS: tuple[tuple[int, int], ...] = ((8, 64), (8, 128), (4, 32), (4, 64), (4, 128), (3, 32), (3, 64),
                                                 (3, 128), (2, 32), (2, 64), (2, 128))


def quantized_bytes(shape: tuple[int, ...], bits: int, group: int) -> int:
    """globe.quant.QuantizedTensor.nbytes of a tensor of `shape` quantized at `bits` with groups along its last axis."""
    rows = math.prod(shape[:-1])
    return packed_bytes(math.prod(shape), bits) + SCALE_BYTES * rows * -(-shape[-1] // group)


def factor_bytes(shape: tuple[int, ...], value_bytes: int, bits: int | None, group: int) -> int:
    return math.prod(shape) * value_bytes if bits is None else quantized_bytes(shape, bits, group)


def family_bytes(n: int, p: int, d: int, m: int, r: int, nnz: int, value_bytes: int, bits: int | None = None,
                 group: int = 64, layer_ranks: list[tuple[int, int]] | None = None,
                 residual: tuple[int, int] | None = None) -> dict[str, int]:
    """Stored bytes per part of one family (see the module docstring); layer_ranks: [(experts, r_l)] per layer for
    unquantized adapters stored per layer (None: every expert at r); residual: (bits, group) of the quantized
    residuals, None without."""
    if layer_ranks is not None and bits is None:
        adapters = sum(e * p * rl for e, rl in layer_ranks) * value_bytes
    else:
        adapters = factor_bytes((n, p, r), value_bytes, bits, group)
    out = {"bank": factor_bytes((m, r, d), value_bytes, bits, group), "adapters": adapters,
           "codes": nnz * (value_bytes + INDEX_BYTES) + (n + 1) * INDPTR_BYTES,
           "scales": n * EXPERT_SCALE_BYTES, "ids": n * ID_BYTES}
    if r == 0:                                   # no base (plain): the compressed checkpoint stores no code
        out.update(codes=0, scales=0, ids=0)     # (k = 0), no scale (folded) and no id (implicit)
    if residual is not None:
        out["residual"] = quantized_bytes((n, p, d), *residual)
    return out


def value_bytes_of(dtype: str | torch.dtype) -> int:
    """Bytes of one stored factor entry for a source stored in `dtype` (fp32 when it is not floating point)."""
    dt = getattr(torch, str(dtype).removeprefix("torch."), None) if not isinstance(dtype, torch.dtype) else dtype
    return min(dt.itemsize, 4) if isinstance(dt, torch.dtype) and dt.is_floating_point else 4


def source_bytes(reader, families: tuple[str, ...]) -> tuple[int, dict[str, int]]:
    """(bytes of every tensor of an open checkpoint (globe.io CheckpointReader) that the fitted `families` do not
    replace, {family: its dense bytes}) from the safetensors headers."""
    from globe.io.arch import FAMILIES
    inv = reader.inventory()
    width = value_bytes_of(inv.dtype)
    total = sum(reader.shards.numel(k) * getattr(torch, reader.shards.dtype(k)).itemsize for k in reader.keys())
    dense = {f: inv.params[f] * width for f in FAMILIES if f in families}
    return total - sum(dense.values()), dense


def family_shape_bytes(n: int, p: int, d: int, m: int, r: int, value_bytes: int, bits: int | None,
                       group: int) -> int:
    """The most bytes a family of shape (m, r) can store: every code non-zero."""
    return sum(family_bytes(n, p, d, m, r, n * m, value_bytes, bits, group).values())


@dataclass
class SizePlan:
    """What `--size` chose: the kind of family (KINDS), factor bits (None: unquantized), per-family budget (0: no
    low-rank part) and target support, the residuals' bits and group (None: none), and the bytes."""

    target_bytes: int
    bits: int | None
    budget: float
    support: int
    predicted_bytes: int          # upper bound: other tensors + every family at its largest candidate shape
    other_bytes: int              # tensors no family replaces
    family_limit: int             # bytes each fitted family may take
    bits_per_weight: float        # family_limit * 8 / dense weights of one family
    kind: str = "factors"         # factors | residual | plain (SIZE_RULE)
    residual_bits: int | None = None
    residual_group: int | None = None
    group: int | None = None      # the factors' quantization group where the plan sets it (finer_group), else None
    rank: int | None = None       # the factors' rank where the plan pins it (pinned_rank), else the fit's choice

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> SizePlan:
        """The plan of a to_dict() (other keys, e.g. a fit's source.size "choice", ignored)."""
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})

    def describe(self) -> str:
        """One line: what the family stores."""
        res = f"{self.residual_bits}-bit group-{self.residual_group} residuals"
        if self.kind == "plain":
            return f"plain quantization of the experts ({res}, no base)"
        factors = f"{self.bits}-bit factors" if self.bits else "unquantized factors"
        factors += f" group {self.group}" if self.group else ""
        factors += f" rank {self.rank}" if self.rank else ""
        return f"{factors} at budget {self.budget:.4f}" + (f" + {res}" if self.kind == "residual" else "")


# The largest per-family budget --size picks: above it a family keeps almost all its parameters (FitConfig warns
# above 0.95), and plain quantization is the kind for such sizes.
MAX_SIZE_BUDGET = 0.95
# Where quantized factors reach MAX_SIZE_BUDGET with bytes left (experts with few rows: upcycled-qwen2moe's 64-row
# experts cap 4-bit group-64 factors at 2.39 bits per routed weight), the bytes left buy a finer quantization group:
# halved while every family still fits, down to MIN_FACTOR_GROUP. Measured on upcycled-qwen2moe at a 3.0-bit size
# (no expert phase): group 32 at 2.65 bits had 0.80x the KL of group 64 at 2.39 bits.
MIN_FACTOR_GROUP = 16


def worst_bytes(n: int, p: int, d: int, budget: float, support: int, value_bytes: int, bits: int | None,
                group: int) -> int | None:
    """The most bytes any shape the budget solver may choose at `budget` stores (None: no shape fits): the
    sparsity-aware shapes of globe.fit.solvers.budget.choose_shape (at most 2 x support atoms), every code counted
    non-zero. Bounding by every candidate instead (tiny ranks with hundreds of atoms, which the fit never picks) left
    the factors 1.1-3.4 of the 2.5-4 bits per weight a size allowed (benchmarks/results/bytes_product.json)."""
    shapes = shared_shapes(candidate_shapes(n, p, d, budget, support), n, p, d, budget, support)
    if not shapes:
        return None
    return max(family_shape_bytes(n, p, d, m, r, value_bytes, bits, group) for m, r in shapes)


def largest_budget(n: int, p: int, d: int, limit: int, support: int, value_bytes: int, bits: int | None,
                   group: int, steps: int = 40) -> float | None:
    """The largest per-family parameter budget in (0, MAX_SIZE_BUDGET] whose every shape stores <= limit bytes
    (bisection; the worst bytes grow with the budget), or None when even the smallest fitting budget does not."""
    lo, hi = 0.0, MAX_SIZE_BUDGET
    for _ in range(steps):
        mid = (lo + hi) / 2
        worst = worst_bytes(n, p, d, mid, support, value_bytes, bits, group)
        if worst is None or worst <= limit:
            lo = mid
        else:
            hi = mid
    worst = worst_bytes(n, p, d, lo, support, value_bytes, bits, group) if lo > 0 else None
    return lo if worst is not None and worst <= limit else None


def finer_group(n: int, dims: list[tuple[int, int]], limit: int, support: int, value_bytes: int, bits: int,
                group: int) -> int:
    """The finest group (group halved, down to MIN_FACTOR_GROUP) at which factors at MAX_SIZE_BUDGET still store
    <= limit bytes per family; `group` itself when they do not fit at it or no finer one fits."""
    best = group
    while best // 2 >= MIN_FACTOR_GROUP:
        worst = [worst_bytes(n, p, d, MAX_SIZE_BUDGET, support, value_bytes, bits, best // 2) for p, d in dims]
        if None in worst or max(worst) > limit:
            break
        best //= 2
    return best


# The bisection of largest_budget stops where ANY shape the solver considers stops fitting; where that is a rank just
# past a quantization group's edge (mixtral-e8-top2 at 2.5 bits: 4-bit group-64 adapters at r = 72 cost a second
# column of scales, 49 KB per family), the shapes the fit really picks there (r = 64) leave bytes unused (the
# factors stored 2.37 of 2.5 bits). pinned_rank then fixes the rank (bank.r: the fit's solver takes that rank only)
# at the budget where its largest shape within the family limit (at most SHARED_ATOMS_PER_SUPPORT x support atoms,
# every code non-zero) is reached, when that stores at least PIN_MIN_GAIN of the limit more than the bisection's
# bound; below that gain the fit keeps choosing the rank on the data. On the embedded (tuning) model at 2.5 and 3.0
# bits the bisection's bound is already within 0.6 % of the limit: nothing is pinned there.
PIN_MIN_GAIN = 0.01


def pinned_rank(n: int, dims: list[tuple[int, int]], limit: int, support: int, value_bytes: int, bits: int | None,
                group: int, bound: int) -> tuple[float, int, int] | None:
    """(budget, rank, most bytes of a family) of the rank whose largest shape stores the most bytes within `limit`
    in every family (dims: each family's (p, d)), the shape the fit's solver takes at that budget with bank.r =
    rank (globe.fit.solvers.budget.choose_shape: the candidate of that rank, its atoms capped at
    SHARED_ATOMS_PER_SUPPORT x support); None unless it beats `bound` (the bisection's most bytes of a family) by
    PIN_MIN_GAIN of the limit."""
    cap, floor = SHARED_ATOMS_PER_SUPPORT * support, max(support, 2)
    best = None
    for rank in sorted({r for p, d in dims for _, r in candidate_shapes(n, p, d, MAX_SIZE_BUDGET, support)}):
        m = cap
        while m >= floor and any(family_shape_bytes(n, p, d, m, rank, value_bytes, bits, group) > limit
                                 for p, d in dims):
            m -= 1
        if m < floor:
            continue
        need = max((m * rank * d + n * p * rank + n * support + n + 0.5) / dense_params(n, p, d) for p, d in dims)
        if need > MAX_SIZE_BUDGET:
            continue
        shapes = [[(min(mm, cap), r) for mm, r in candidate_shapes(n, p, d, need, support) if r == rank]
                  for p, d in dims]                                   # what the fit's solver takes at bank.r = rank
        if not all(shapes):
            continue
        used = [family_shape_bytes(n, p, d, *sh[0], value_bytes, bits, group) for (p, d), sh in zip(dims, shapes)]
        if max(used) <= limit and (best is None or max(used) > best[2]):
            best = (need, rank, max(used))
    return best if best is not None and best[2] >= bound + PIN_MIN_GAIN * limit else None


def choose_kind(bits_per_weight: float) -> str:
    """The kind of family SIZE_RULE picks for a family limit of `bits_per_weight` bits per routed weight."""
    if bits_per_weight >= SIZE_RULE["plain_from_bits"]:
        return "plain"
    if bits_per_weight >= SIZE_RULE["residual_from_bits"]:
        return "residual"
    return "factors"


def plain_bytes(n: int, p: int, d: int, value_bytes: int, bits: int, group: int, rbits: int, rgroup: int) -> int:
    """A plain family's bytes (globe.fit.engine.plain): the experts' packed weights (the residuals over no base: one
    atom of rank 0, an empty bank and empty adapters, no code): exactly per-expert quantization's bytes. (The
    artifact of `globe fit` keeps 20 N + 8 bytes of bookkeeping beside them, expert scales, ids and code row
    pointers, which the compressed checkpoint, the size --size counts, does not store.)"""
    return sum(family_bytes(n, p, d, PLAIN_ATOMS, PLAIN_RANK, 0, value_bytes, bits, group,
                            residual=(rbits, rgroup)).values())


def solve_plain(n: int, dims: list[tuple[int, int]], other_bytes: int, target_bytes: int, value_bytes: int,
                cfg: FitConfig, limit: int, bpw: float) -> SizePlan | None:
    """Plain quantization at the largest (bits, group) of RESIDUAL_OPTIONS whose family fits `limit`."""
    bits = cfg.quant.bits or 4
    for rbits, rgroup in RESIDUAL_OPTIONS:
        used = [plain_bytes(n, p, d, value_bytes, bits, cfg.quant.group, rbits, rgroup) for p, d in dims]
        if max(used) <= limit:
            return SizePlan(target_bytes, bits, 0.0, 1, other_bytes + sum(used), other_bytes, limit, bpw,
                            "plain", rbits, rgroup)
    return None


def solve_residual(n: int, dims: list[tuple[int, int]], other_bytes: int, target_bytes: int, value_bytes: int,
                   cfg: FitConfig, limit: int, bpw: float) -> SizePlan | None:
    """A small GloBE part + residuals: the residuals at the largest (bits, group) of RESIDUAL_OPTIONS that leaves the
    low-rank part at least SIZE_RULE["residual_min_budget"], the low-rank part at the largest budget (at most
    SIZE_RULE["residual_max_budget"]) in the bytes that remain."""
    bits, group, support = cfg.quant.bits or 4, cfg.quant.group, cfg.sparsity.target_support
    for rbits, rgroup in RESIDUAL_OPTIONS:
        rest = min(limit - quantized_bytes((n, p, d), rbits, rgroup) for p, d in dims)
        budgets = [largest_budget(n, p, d, rest, support, value_bytes, bits, group) for p, d in dims]
        if None in budgets or min(budgets) < SIZE_RULE["residual_min_budget"]:
            continue
        budget = min(min(budgets), SIZE_RULE["residual_max_budget"])
        worst = sum(worst_bytes(n, p, d, budget, support, value_bytes, bits, group)
                    + quantized_bytes((n, p, d), rbits, rgroup) for p, d in dims)
        return SizePlan(target_bytes, bits, budget, support, other_bytes + worst, other_bytes, limit, bpw,
                        "residual", rbits, rgroup)
    return None


def solve_size(n: int, dims: list[tuple[int, int]], other_bytes: int, target_bytes: int, value_bytes: int,
               cfg: FitConfig, bits: int | None = None, fixed_bits: bool = False, kind: str | None = None) -> SizePlan:
    """Kind, bits, per-family budget, support and residuals that keep the whole checkpoint within target_bytes:
    every fitted family (dims: its (p, d)) gets the same share of the bytes the other tensors leave. The kind comes
    from SIZE_RULE (plain quantization, a small GloBE part + residuals, or factors only; a kind that does not fit
    falls back to the next smaller one). ConfigError, stating the smallest reachable size, when none fits.
    fixed_bits: factors only, at `bits` (--bits / --no-quant given; refused where plain quantization is the rule),
    else the factors try BITS_PREFERENCE in order and keep the first that fits. kind: that kind instead of the
    rule's (the tuning benchmark, benchmarks/size_rule.py)."""
    group, support, families = cfg.quant.group, cfg.sparsity.target_support, len(dims)
    limit = (target_bytes - other_bytes) // families
    dense = dense_params(n, *dims[0])
    bpw = round(8 * limit / dense, 4)
    kind = kind or choose_kind(8 * limit / dense)
    if fixed_bits and kind == "plain":
        plain = other_bytes + families * math.ceil(SIZE_RULE["plain_from_bits"] * dense / 8)
        raise ConfigError(
            f"--size {target_bytes / GIB:.6g} GiB leaves {8 * limit / dense:.2f} bits per routed weight: at that size "
            f"plain quantization of the experts is better than GloBE's factors (benchmarks/results/size_rule.json, "
            f"benchmarks/results/bytes.json); drop --bits / --no-quant to get it, or ask for less than "
            f"{plain / GIB:.6g} GiB")
    if not fixed_bits:
        order = {"plain": (solve_plain, solve_residual), "residual": (solve_residual,), "factors": ()}[kind]
        for solve in order:
            plan = solve(n, dims, other_bytes, target_bytes, value_bytes, cfg, limit, bpw)
            if plan is not None:
                return plan
    for b in [bits] if fixed_bits else list(BITS_PREFERENCE):
        for k in sorted({support, 8, 4, 2, 1}, reverse=True):
            if k > support:
                continue
            budgets = [largest_budget(n, p, d, limit, k, value_bytes, b, group) for p, d in dims]
            if None in budgets:
                continue
            budget, finer = min(budgets), None
            if b is not None and not fixed_bits and budget >= MAX_SIZE_BUDGET * (1 - 1e-6):
                finer = finer_group(n, dims, limit, k, value_bytes, b, group)     # capped: spend the rest on
                finer = finer if finer < group else None                          # a finer group
            worst = [worst_bytes(n, p, d, budget, k, value_bytes, b, finer or group) for p, d in dims]
            pinned = None if finer or cfg.ranks.allocation != "uniform" else \
                pinned_rank(n, dims, limit, k, value_bytes, b, group, max(worst))
            if pinned is not None:
                budget, rank, _ = pinned
                worst = [family_shape_bytes(n, p, d, min(mm, SHARED_ATOMS_PER_SUPPORT * k), r, value_bytes, b, group)
                         for p, d in dims for mm, r in candidate_shapes(n, p, d, budget, k) if r == rank]
            return SizePlan(target_bytes, b, budget, k, other_bytes + sum(worst), other_bytes, limit, bpw,
                            group=finer, rank=pinned and pinned[1])
    options = [bits] if fixed_bits else list(BITS_PREFERENCE)
    floor = min(sum(family_shape_bytes(n, p, d, 2, 1, value_bytes, b, group) for p, d in dims) for b in options)
    smallest = other_bytes + floor
    how = f" with --bits {bits}" if fixed_bits else ""
    raise ConfigError(f"--size {target_bytes / GIB:.6g} GiB is impossible{how}: the smallest reachable checkpoint is "
                      f"{smallest / GIB:.6g} GiB ({smallest:,} bytes: {other_bytes:,} of tensors GloBE does not "
                      f"compress + {floor:,} for the smallest banks)")


def _size_inputs(cfg: FitConfig, model_dir, size_gib: float) -> tuple[int, list[tuple[int, int]], int, int, int]:
    """(experts N, [(p, d)] per fitted family, bytes of the other tensors, target bytes, value bytes)."""
    from globe.io import open_checkpoint
    if not size_gib > 0:
        raise ConfigError(f"--size must be a positive number of GiB (got {size_gib})")
    if cfg.bank.m is not None or cfg.bank.r is not None:
        raise ConfigError("--size sets the budget: drop --m / --r")
    with open_checkpoint(model_dir) as reader:
        inv = reader.inventory()
        other, _ = source_bytes(reader, tuple(cfg.bank.families))
    n, width = len(inv.moe_layers) * inv.num_experts, value_bytes_of(inv.dtype)
    dims = [(inv.d, inv.p) if f == "down" else (inv.p, inv.d) for f in cfg.bank.families]
    return n, dims, other, int(size_gib * GIB), width


def apply_plan(cfg: FitConfig, plan: SizePlan) -> FitConfig:
    """cfg (changed in place) set to the plan: quant.bits, bank.budget, sparsity.target_support, residuals, the
    factors' group where the plan sets one."""
    cfg.quant.bits, cfg.bank.budget, cfg.sparsity.target_support = plan.bits, plan.budget, plan.support
    cfg.bank.r = plan.rank                        # None: the fit chooses the rank (every plan but a pinned one)
    if plan.group is not None:
        cfg.quant.group = plan.group
    cfg.quant.residual_bits = plan.residual_bits
    if plan.residual_group is not None:
        cfg.quant.residual_group = plan.residual_group
    elif plan.residual_bits is None:              # no residuals: the default group (not another candidate's)
        cfg.quant.residual_group = QuantSection.residual_group
    return cfg


def apply_size(cfg: FitConfig, model_dir, size_gib: float, bits_given: bool = False,
               kind: str | None = None) -> SizePlan:
    """cfg (changed in place: quant.bits, bank.budget, sparsity.target_support) so that the whole checkpoint of
    model_dir compressed with it takes at most size_gib GiB (2**30 bytes) of tensors; returns the SizePlan."""
    n, dims, other, target, width = _size_inputs(cfg, model_dir, size_gib)
    plan = solve_size(n, dims, other, target, width, cfg, cfg.quant.bits, bits_given, kind)
    apply_plan(cfg, plan)
    log.info("--size %.6g GiB: %s, support %d; at most %s bytes (%.2f bits per routed weight)", size_gib,
             plan.describe(), plan.support, f"{plan.predicted_bytes:,}", plan.bits_per_weight)
    return plan


# The kinds `globe compress --size` builds and compares by measured KL (globe.run.size_choice), after SIZE_RULE's.
CANDIDATE_KINDS: tuple[str, ...] = ("factors", "plain")


def size_plans(cfg: FitConfig, model_dir, size_gib: float, bits_given: bool = False) -> list[SizePlan]:
    """Every kind of family that fits size_gib: SIZE_RULE's plan first (what apply_size picks; ConfigError where it
    cannot), then each other kind of CANDIDATE_KINDS that fits. With bits_given (--bits / --no-quant): the rule's
    plan only. cfg is not changed."""
    n, dims, other, target, width = _size_inputs(cfg, model_dir, size_gib)
    plans = [solve_size(n, dims, other, target, width, cfg, cfg.quant.bits, bits_given)]
    if bits_given:
        return plans
    for kind in CANDIDATE_KINDS:
        if any(p.kind == kind for p in plans):
            continue
        try:
            plan = solve_size(n, dims, other, target, width, cfg, cfg.quant.bits, False, kind)
        except ConfigError:
            continue
        if plan.kind == kind:                       # (a kind that does not fit falls back to another: not this one)
            plans.append(plan)
    return plans


def result_bytes(result) -> dict | None:
    """A FitResult's bytes by the byte model: {"before": every tensor of the source, "after": the tensors no family
    replaces + every family as stored, "value_bytes", "families": {f: {"dense", "stored", "parts"}}}; the source's
    headers when its directory is readable, else its inventory (every tensor at the experts' dtype); None without
    either."""
    from globe.fit.engine.quantize import stored_bytes
    inv = result.source.get("inventory") or {}
    width = value_bytes_of(inv.get("dtype") or "float32")
    other = None
    src = result.source.get("model_dir")
    if src:
        try:
            from globe.io import open_checkpoint
            with open_checkpoint(src) as reader:
                other, _ = source_bytes(reader, tuple(result.families))
        except (GlobeError, OSError) as exc:            # a moved or remote source: fall back to the inventory
            log.debug("source %s not readable for the byte count (%s)", src, exc)
    if other is None:
        if not inv.get("total_params"):
            return None
        other = (inv["total_params"] - sum(result.params[f"dense_{f}"] for f in result.families)) * width
    families = {}
    for name, fam in result.families.items():
        parts = stored_bytes(fam, width)
        families[name] = {"dense": result.params[f"dense_{name}"] * width, "stored": sum(parts.values()),
                          "parts": parts}
    before = other + sum(f["dense"] for f in families.values())
    return {"before": before, "after": other + sum(f["stored"] for f in families.values()), "other": other,
            "value_bytes": width, "families": families}
