"""GlobeExperts: drop-in replacement of a transformers 5.x fused routed-experts module.

Same call as the original: forward(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k]) -> [T, d].
Per projection (gate, up: W [p, d]; down: W [d, p]) the module holds either GloBE factors (the family bank,
shared with every layer, plus this layer's sparse codes and adapters) or the untouched dense weights [E, out, in].

Modes:
  factored  mix tilde_B_e = phi(sum_j alpha_ej B_j) for the experts routed in this batch, then x -> A_e (tilde_B_e x);
            with phi = identity and few tokens (decode), project the tokens on the whole bank instead (z = B x, one
            GEMM) and sum each expert's atoms of z with its codes, when that is fewer atoms than mixing
  cached    the same, with tilde_B_e served by a per-layer LRU (`MixedCache`) of precomposed experts; a batch whose
            cache misses cost more atoms to mix than projecting its tokens is projected (counted, not inserted)
  dense     W_e = A_e tilde_B_e reconstructed once, run like the original module
A family may also store each expert's quantized residual R_e (packed, `residual.<family>.*`): every mode adds it,
factored and cached as R_e x with R_e dequantized on use for the experts a batch routes to, dense inside W_e.
Training: the factors (bank, code values, adapters) and the untouched projections are ordinary trainable
parameters, except quantized ones: a bank, adapters or residuals R_e (W_e = A_e tilde_B_e + R_e) stored packed
(PackedTensor: integer codes + scales + zeros,
dequantized on use; the cached mode keeps the dequantized adapters of its experts in its cache) are frozen buffers,
while the code values and untouched projections still train. Both caches (cached mode's LRU, dense mode's
reconstruction) are stamped with the identity and the `_version` counter of every tensor they were computed from
(an optimizer step or any in-place change bumps it) and recomputed when the stamp changes; with gradients enabled
and a factor requiring them, neither cache is used: the factors are mixed (or W_e reconstructed) in the autograd
graph, so every backward reaches them (the LRU still records the access, so its order and counts do not depend on
the grad mode).
(token, expert) pairs are sorted by expert once. Small batches (decode) run every pair at once with batched
matmuls over gathered weights; larger ones use grouped GEMMs (torch.nn.functional.grouped_mm, as transformers'
own grouped_mm experts) with one group per expert, or a loop over the routed experts where that is unavailable.
Either way there is no Python loop over tokens, and only routed experts are mixed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from globe.core.mixing import SparseCodes, compose
from globe.errors import ConfigError
from globe.formats.checkpoint import MODES, dense_key
from globe.io.layout import FAMILIES
from globe.runtime.cache import MixedCache
from globe.runtime.packed import FactorParts, PackedTensor

PROJECTIONS: tuple[str, ...] = FAMILIES          # gate, up, down; state keys: globe.formats.checkpoint


def _use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """grouped_mm exists in this torch, runs on this device (CPU, or CUDA from compute capability 8.0) and accepts
    these operands (row-major, rows and base pointers aligned to 16 bytes). Not while recording gradients: its
    backward needs the transposed operands aligned too, which batch sizes do not guarantee."""
    if not hasattr(F, "grouped_mm") or x.stride(-1) != 1 or weight.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if weight.device.type == "cuda" and torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False
    aligned = all(t.stride(-2) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0 for t in (x, weight))
    return aligned and weight.device.type in ("cpu", "cuda")


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x [S, in] grouped by `offsets` [G] (cumulative ends, int32) through weight [G, out, in] -> [S, out]."""
    x = x.to(weight.dtype)
    if _use_grouped_mm(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    # fallback: loop over groups. x may come from grouped_mm with rows padded to 16 bytes (r = 49 in bf16: a row
    # stride of 56); the CPU bf16 GEMM of torch 2.13 reads that padding (NaN logits), so its rows are made dense
    x = x.contiguous()
    out, start = x.new_empty(x.shape[0], weight.shape[1]), 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], weight[group])
        start = end
    return out


@dataclass
class _Projection:
    """One projection of the experts hit by a batch: dense W [E, out, in] (indexed by expert id), or mixed atoms
    [U, r, in] (indexed by position among the hit experts) followed by adapters [E, out, r] (by expert id) or,
    dequantized for this batch only, [U, out, r] (`hit`: by position among the hit experts)."""

    weight: torch.Tensor
    adapters: torch.Tensor | None = None
    hit: bool = False
    residual: torch.Tensor | None = None     # [U, out, in] dequantized residuals of the hit experts, or None

    def grouped(self, x: torch.Tensor, route: _Route) -> torch.Tensor:
        """x [S, in], pairs sorted by expert -> [S, out] with grouped GEMMs."""
        if self.adapters is None:
            return grouped_linear(x, self.weight, route.expert_offsets)
        low = grouped_linear(x, self.weight, route.hit_offsets)
        out = grouped_linear(low, self.adapters, route.hit_offsets if self.hit else route.expert_offsets)
        return out if self.residual is None else out + grouped_linear(x, self.residual, route.hit_offsets)

    def pairs(self, x: torch.Tensor, route: _Route) -> torch.Tensor:
        """x [S, in] -> [S, out] with one row-vector bmm per projection over weights gathered per pair."""
        rows = x.to(self.weight.dtype).unsqueeze(1)                                  # [S, 1, in]
        if self.adapters is None:
            return torch.bmm(rows, self.weight.index_select(0, route.experts).transpose(1, 2)).squeeze(1)
        mixed = self.weight if route.positions is None else self.weight.index_select(0, route.positions)
        low = torch.bmm(rows, mixed.transpose(1, 2))                                 # [S, 1, r]
        out = torch.bmm(low, route.per_pair(self.adapters, self.hit).transpose(1, 2)).squeeze(1)
        return out if self.residual is None else out + residual_pairs(rows, self.residual, route)


def residual_pairs(rows: torch.Tensor, residual: torch.Tensor, route: _Route) -> torch.Tensor:
    """R_e x of every sorted pair: rows [S, 1, in], residual [U, out, in] by hit position -> [S, out]."""
    return torch.bmm(rows.to(residual.dtype), route.per_pair(residual, True).transpose(1, 2)).squeeze(1)


@dataclass
class _Projected:
    """A factored projection (phi = identity) applied without mixing atoms: the input rows are projected on the
    whole bank once, z = B x [n, m, r], and each pair takes its expert's code-weighted sum of its row's atoms
    (sum_j alpha_ej z[row, j] = tilde_B_e x), then the adapters. Cheaper than mixing when n * m < U * k
    (decode: one token, few experts routed)."""

    bank: torch.Tensor          # [m, r, in]
    indices: torch.Tensor       # [E, k]
    values: torch.Tensor        # [E, k]
    adapters: torch.Tensor      # [E, out, r], or [U, out, r] when `hit` (see _Projection)
    hit: bool = False
    residual: torch.Tensor | None = None     # [U, out, in] (see _Projection)

    def rows(self, x: torch.Tensor, row_of_pair: torch.Tensor | None, route: _Route) -> torch.Tensor:
        """Input rows x [n, in] (per token, or per pair when row_of_pair is None) -> [S, out], pairs by expert."""
        m, r, d = self.bank.shape                                                             # r = r_l
        z = F.linear(x.to(self.bank.dtype), self.bank.reshape(m * r, d)).view(-1, m, r)       # [n, m, r]
        rows = torch.arange(route.experts.numel(), device=x.device) if row_of_pair is None else row_of_pair
        atoms = z[rows.unsqueeze(1), self.indices.index_select(0, route.experts)]             # [S, k, r]
        weights = self.values.index_select(0, route.experts).to(z.dtype).unsqueeze(1)         # [S, 1, k]
        low = torch.bmm(weights, atoms)                                                       # [S, 1, r]
        out = torch.bmm(low, route.per_pair(self.adapters, self.hit).transpose(1, 2)).squeeze(1)
        if self.residual is None:
            return out
        return out + residual_pairs(x.index_select(0, rows).unsqueeze(1), self.residual, route)


class _Route:
    """Where the (token, expert) pairs of a batch go, sorted by expert; each path computes only what it uses."""

    def __init__(self, experts: torch.Tensor, counts: torch.Tensor, num_experts: int, distinct: bool) -> None:
        self.experts = experts                        # [S] expert id of each sorted pair
        self.counts = counts                          # [U] pairs per hit expert
        self.num_experts = num_experts
        self.distinct = distinct                      # every hit expert has exactly one pair

    @cached_property
    def positions(self) -> torch.Tensor | None:
        """[S] index of each pair's expert among the hit experts; None when it is simply 0..S-1."""
        if self.distinct:
            return None
        return torch.repeat_interleave(torch.arange(self.counts.numel(), device=self.counts.device), self.counts)

    def per_pair(self, tensor: torch.Tensor, hit: bool) -> torch.Tensor:
        """Rows of `tensor` for each sorted pair: tensor [E, ...] by expert id, or [U, ...] by hit position."""
        if not hit:
            return tensor.index_select(0, self.experts)
        return tensor if self.positions is None else tensor.index_select(0, self.positions)

    @cached_property
    def hit_offsets(self) -> torch.Tensor:
        """[U] int32 cumulative pair counts per hit expert (groups of the mixed atoms)."""
        return self.counts.cumsum(0).to(torch.int32)

    @cached_property
    def expert_offsets(self) -> torch.Tensor:
        """[E] int32 cumulative pair counts per expert id (groups of adapters and dense weights)."""
        return torch.bincount(self.experts, minlength=self.num_experts).cumsum(0).to(torch.int32)


class _Buffers(nn.Module):
    """Named buffers (a BufferDict), so that state keys read `code_indices.gate`."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, name)


class GlobeExperts(nn.Module):
    """Routed experts of one MoE layer with GloBE-factored projections; see the module docstring."""

    def __init__(self, layer: int, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module,
                 banks: dict[str, nn.Parameter | PackedTensor], phis: dict[str, str],
                 codes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 adapters: dict[str, torch.Tensor | PackedTensor], dense: dict[str, nn.Parameter],
                 max_gathered_pairs: int = 16, source_dtype: torch.dtype | None = None,
                 shared_banks: frozenset[str] = frozenset(),
                 residuals: dict[str, PackedTensor] | None = None) -> None:
        super().__init__()
        if set(banks) | set(dense) != set(PROJECTIONS) or set(banks) & set(dense):
            raise ConfigError(f"layer {layer}: each of {PROJECTIONS} must be either factored or dense "
                              f"(factored {sorted(banks)}, dense {sorted(dense)})")
        self.layer, self.num_experts = layer, num_experts
        self.hidden_dim, self.intermediate_dim = hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.factored = tuple(f for f in PROJECTIONS if f in banks)
        self.phis = dict(phis)
        self.bank = FactorParts(banks, shared_banks)                                      # shared: [m, r_max, in]
        self.adapters = FactorParts({f: a if isinstance(a, PackedTensor) else _trainable(a)
                                for f, a in adapters.items()})                        # [E, out, r_l]
        for f, a in adapters.items():
            if a.shape[-1] > banks[f].shape[1]:
                raise ConfigError(f"layer {layer}: {f} adapters have rank {a.shape[-1]} but the bank only "
                                  f"{banks[f].shape[1]} rows per atom")
        self.residual = FactorParts(dict(residuals or {}))                            # packed [E, out, in]
        self.code_values = nn.ParameterDict({f: _trainable(v) for f, (_, v) in codes.items()})  # [E, k]
        self.code_indices = _Buffers({f: i for f, (i, _) in codes.items()})           # [E, k] int64
        for family, weight in dense.items():                                          # [E, out, in]
            self.register_parameter(dense_key(family), weight)
        self.max_gathered_pairs = max_gathered_pairs
        floats = [t for t in [*banks.values(), *dense.values(), *(v for _, v in codes.values())]
                  if isinstance(t, torch.Tensor)]
        self.source_dtype = source_dtype or floats[0].dtype
        self.mode = "factored"
        self.cache: MixedCache | None = None
        self._stamp: tuple | None = None          # inputs of the cache / dense reconstruction it was built from

    # ---- shapes and factors ----
    def rank(self, family: str) -> int:
        """This layer's rank r_l of a factored family (its adapters' width)."""
        return int(self.adapters[family].shape[-1])

    def is_packed(self, part: str, family: str) -> bool:
        """Whether `part` ("bank" or "adapters") of a factored family is stored packed (quantized)."""
        return isinstance(getattr(self, part)[family], PackedTensor)

    def factor_dtype(self, family: str) -> torch.dtype:
        """The dtype a factored family computes in: its code values' (packed parts are dequantized to it)."""
        return self.code_values[family].dtype

    def layer_bank(self, family: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The rows of the shared bank this layer uses: [m, r_l, in] (a view, bank[:, :r_l]; a packed bank is
        dequantized, to `dtype` or the family's factor dtype)."""
        bank, rank = self.bank[family], self.rank(family)
        if isinstance(bank, PackedTensor):
            bank = bank.dequantize(dtype or self.factor_dtype(family))
        return bank if rank == bank.shape[1] else bank[:, :rank]

    def layer_adapters(self, family: str, experts: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """Adapters [E, out, r_l] (or of `experts` only: [U, out, r_l]); packed ones dequantized to `dtype` or the
        family's factor dtype."""
        adapters = self.adapters[family]
        if isinstance(adapters, PackedTensor):
            dtype = dtype or self.factor_dtype(family)
            return adapters.dequantize(dtype) if experts is None else adapters.rows(experts, dtype)
        return adapters if experts is None else adapters.index_select(0, experts.to(adapters.device))

    def _tensors(self, family: str) -> list[torch.Tensor]:
        """Every stored tensor of a factored family (packed parts as their buffers)."""
        out = [self.code_values[family], self.code_indices[family]]
        for part in (self.bank[family], self.adapters[family]):
            out += list(part.buffers()) if isinstance(part, PackedTensor) else [part]
        if family in self.residual:
            out += list(self.residual[family].buffers())
        return out

    def layer_residual(self, family: str, experts: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The dequantized residuals R_e [E, out, in] (or of `experts` only: [U, out, in]) in `dtype` or the family's
        factor dtype; None when the family stores none."""
        if family not in self.residual:
            return None
        part, dtype = self.residual[family], dtype or self.factor_dtype(family)
        return part.dequantize(dtype) if experts is None else part.rows(experts, dtype)

    # ---- modes ----
    def set_mode(self, mode: str, cache_size: int | None = None) -> None:
        """Switch to `factored`, `cached` (LRU of `cache_size` experts, default half; packed adapters are
        dequantized into it beside the mixed atoms) or `dense` (W_e = A_e tilde_B_e reconstructed once from the
        stored factors, in fp32, kept in the factor dtype)."""
        if mode not in MODES:
            raise ConfigError(f"runtime mode must be one of {', '.join(MODES)}, not {mode!r}")
        for family in self.factored:
            if hasattr(self, f"dense_{family}"):
                delattr(self, f"dense_{family}")
        self.cache = None
        for family in self.factored:                  # the cached mode keeps a packed bank dequantized (shared)
            if self.is_packed("bank", family):
                self.bank[family].keep_dequantized(mode == "cached")
        if mode == "cached":
            size = self.num_experts // 2 if cache_size is None else int(cache_size)
            if size < 0:
                raise ConfigError(f"cache_size must be >= 0, not {size}")
            self.cache = MixedCache(min(size, self.num_experts), self.cache_shapes(), *self._cache_where())
        elif mode == "dense":
            self._rebuild_dense()
        self._stamp = self._inputs_stamp()
        self.mode = mode

    def cache_shapes(self) -> dict[str, tuple[int, int]]:
        """What one cached expert holds: {family: (r_l, in)} mixed atoms, plus {family_adapters: (out, r_l)} for
        families whose adapters are packed."""
        shapes = {}
        for f in self.factored:
            bank = self.bank[f]
            shapes[f] = (self.rank(f), int(bank.shape[-1]))
            if self.is_packed("adapters", f):
                shapes[f"{f}_adapters"] = tuple(self.adapters[f].shape[1:])
        return shapes

    def _cache_where(self) -> tuple[torch.dtype, torch.device]:
        ref = self.code_values[self.factored[0]] if self.factored else self.dense_weight("down")
        return ref.dtype, ref.device

    def _inputs_stamp(self) -> tuple:
        """Identity and in-place version of every tensor the caches are computed from."""
        tensors = [t for f in self.factored for t in self._tensors(f)]
        return tuple((id(t), t._version, t.device) for t in tensors)

    def _rebuild_dense(self) -> None:
        with torch.no_grad():
            for family in self.factored:
                self.register_buffer(f"dense_{family}", self.reconstruct(family).to(
                    dtype=self.factor_dtype(family), device=self.code_values[family].device), persistent=False)

    def _refresh(self) -> None:
        """Drop what the caches hold when a factor changed since they were filled (optimizer step, load, edit)."""
        stamp = self._inputs_stamp()
        if stamp == self._stamp:
            return
        if self.cache is not None:
            self.cache.order.clear()
        if self.mode == "dense":
            self._rebuild_dense()
        self._stamp = stamp

    def _differentiable(self) -> bool:
        """Gradients are being recorded for some factor: caches are bypassed (they hold no graph)."""
        return torch.is_grad_enabled() and any(t.requires_grad for f in self.factored for t in self._tensors(f))

    def mixed_atoms(self, experts: torch.Tensor, families: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Mixed atoms tilde_B_e of the given experts: {family: [U, r, in]} in the factor dtype."""
        out = {}
        for f in self.factored if families is None else families:
            idx = experts.to(self.code_indices[f].device)
            codes = SparseCodes(self.code_indices[f][idx], self.code_values[f][idx])
            out[f] = compose(codes, self.layer_bank(f), self.phis[f])
        return out

    def cached_parts(self, experts: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the cache holds for the given experts (see cache_shapes): mixed atoms and dequantized adapters."""
        out = self.mixed_atoms(experts)
        for f in self.factored:
            if self.is_packed("adapters", f):
                out[f"{f}_adapters"] = self.layer_adapters(f, experts)
        return out

    def reconstruct(self, family: str) -> torch.Tensor:
        """W_e = A_e tilde_B_e (+ R_e, the dequantized residual, when stored) of every expert of this layer, computed
        in fp32: [E, out, in]."""
        idx, values = self.code_indices[family], self.code_values[family].float()
        mixed = compose(SparseCodes(idx, values), self.layer_bank(family, torch.float32).float(), self.phis[family])
        out = self.layer_adapters(family, dtype=torch.float32).float() @ mixed
        residual = self.layer_residual(family, dtype=torch.float32)
        return out if residual is None else out + residual

    def dense_weight(self, family: str) -> torch.Tensor:
        """The dense [E, out, in] weight a projection runs with in `dense` mode (or an untouched projection)."""
        return getattr(self, f"dense_{family}" if family in self.factored else dense_key(family))

    def warm_up(self, counts: torch.Tensor) -> list[int]:
        """Preload the cache with the experts most routed in `counts` [E] (cached mode only; else a no-op)."""
        if self.cache is None:
            return []
        self._refresh()
        with torch.no_grad():
            return self.cache.warm_up(counts, self.cached_parts)

    # ---- forward ----
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        top_k = top_k_index.shape[-1]
        flat, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)          # [S] per (token, expert) pair
        out = torch.zeros_like(hidden_states)
        experts, counts = torch.unique(flat, return_counts=True)                   # sorted
        expert_list = experts.tolist()                                              # the one host sync
        pair_ids = None
        if expert_list and expert_list[-1] >= self.num_experts:                     # expert-parallel sentinels
            keep = sum(e < self.num_experts for e in expert_list)
            experts, counts, expert_list = experts[:keep], counts[:keep], expert_list[:keep]
            pair_ids = (flat < self.num_experts).nonzero().squeeze(1)
            flat, weights = flat[pair_ids], weights[pair_ids]
        if not expert_list:
            return out
        differentiable = self._differentiable()
        if not (differentiable and self.mode == "dense"):     # dense under grad reconstructs in the graph anyway
            self._refresh()
        projected = self._projected_families(hidden_states.shape[0], flat.numel(), expert_list)
        projections = self._projections(experts, expert_list, projected, differentiable)
        order = torch.argsort(flat, stable=True)                                    # pairs sorted by expert
        tokens = (order if pair_ids is None else pair_ids[order]) // top_k
        route = _Route(flat.index_select(0, order), counts, self.num_experts, len(expert_list) == flat.numel())
        run = _Projection.pairs if flat.numel() <= self.max_gathered_pairs else _Projection.grouped
        gate, up, down = (projections[f] for f in PROJECTIONS)
        x = hidden_states.index_select(0, tokens)                                   # [S, d]

        def apply(proj, rows: torch.Tensor, row_of_pair: torch.Tensor | None, pairs: torch.Tensor) -> torch.Tensor:
            return proj.rows(rows, row_of_pair, route) if isinstance(proj, _Projected) else run(proj, pairs, route)

        h = self.act_fn(apply(gate, hidden_states, tokens, x)) * apply(up, hidden_states, tokens, x)   # [S, p]
        y = apply(down, h, None, h)                                                 # [S, d]
        return out.index_add_(0, tokens, (y * weights.index_select(0, order)[:, None]).to(out.dtype))

    def _projected_families(self, num_tokens: int, num_pairs: int, expert_list: list[int]) -> set[str]:
        """Factored families (phi = identity) cheaper to project than to mix for this batch: rows projected x atoms
        (tokens for gate/up, pairs for down) < experts to mix x code width. In factored mode every hit expert is
        mixed; in cached mode only the misses are, and all families go one way (the cache holds them together):
        a projected batch is counted as a lookup but inserts nothing."""
        if self.mode == "dense" or any(self.phis[f] != "identity" for f in self.factored):
            return set()
        cache = self.cache
        rows = {f: (num_pairs if f == "down" else num_tokens) * self.bank[f].shape[0] for f in self.factored}
        width = {f: self.code_indices[f].shape[1] for f in self.factored}
        if cache is None:
            return {f for f in self.factored if rows[f] < len(expert_list) * width[f]}
        misses = sum(e not in cache.order for e in expert_list)
        return set(self.factored) if sum(rows.values()) < misses * sum(width.values()) else set()

    def _projections(self, experts: torch.Tensor, expert_list: list[int],
                     projected: set[str], differentiable: bool) -> dict[str, _Projection | _Projected]:
        if self.mode == "dense":
            if differentiable:                                   # W_e = A_e tilde_B_e inside the graph
                return {f: _Projection(self.reconstruct(f).to(self.factor_dtype(f)) if f in self.factored
                                       else self.dense_weight(f)) for f in PROJECTIONS}
            return {f: _Projection(self.dense_weight(f)) for f in PROJECTIONS}
        out: dict[str, _Projection | _Projected] = {
            f: _Projected(self.layer_bank(f), self.code_indices[f], self.code_values[f], *self._adapters(f, experts),
                          self.layer_residual(f, experts)) for f in projected}
        mixing = tuple(f for f in self.factored if f not in projected)
        cache = self.cache
        if not mixing and cache is not None:
            cache.count(expert_list)                           # projected: looked up, not inserted
        parts: dict[str, torch.Tensor] = {}
        if mixing and differentiable:                          # the cache holds no graph: mix in it
            if cache is not None:
                with torch.no_grad():                          # same LRU order and counts as without grad
                    cache.fetch(expert_list, self.cached_parts)
            parts = self.mixed_atoms(experts, mixing)
        elif mixing and cache is not None:
            parts = cache.fetch(expert_list, self.cached_parts)
        elif mixing:
            parts = self.mixed_atoms(experts, mixing)
        for f in mixing:
            residual = self.layer_residual(f, experts)       # dequantized on use, for the hit experts only
            if f"{f}_adapters" in parts:                       # packed adapters, dequantized into the cache
                out[f] = _Projection(parts[f], parts[f"{f}_adapters"], hit=True, residual=residual)
            else:
                out[f] = _Projection(parts[f], *self._adapters(f, experts), residual=residual)
        out.update({f: _Projection(self.dense_weight(f)) for f in PROJECTIONS if f not in self.factored})
        return out

    def _adapters(self, family: str, experts: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(adapters, hit) for a batch: stored ones [E, out, r] by expert id, packed ones dequantized for the hit
        experts only [U, out, r]."""
        if self.is_packed("adapters", family):
            return self.layer_adapters(family, experts), True
        return self.adapters[family], False

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, experts={self.num_experts}, factored={list(self.factored)}, "
                f"mode={self.mode!r}")


def _trainable(tensor: torch.Tensor) -> nn.Parameter:
    """A factor as a parameter: trainable like any model parameter (floating point)."""
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor,
                                                                        requires_grad=tensor.is_floating_point())
