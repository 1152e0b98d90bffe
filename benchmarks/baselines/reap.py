"""REAP expert pruning (CerebrasResearch/reap, `observer.py` + `prune.py`): drop the least salient experts per layer.

Saliency of expert e in a layer, as REAP's observer computes it (its default, router weights not renormalised):
    S_e = mean over the calibration tokens t routed to e (e in top-k(t)) of  g_te * ||E_e(x_t)||_2
with g_te the router's softmax probability of e for token t and E_e(x_t) = D_e (act(G_e x_t) * U_e x_t) the
expert's output. Per layer the experts of lowest saliency are dropped (the same number in every layer, REAP's
uniform per-layer ratio); an expert never routed to gets saliency 0 and goes first.

The pruned model is a valid, smaller checkpoint: the dropped experts' gate/up/down AND their router rows are
removed and the config's expert count is reduced (`write_pruned`), so the router cannot select them; stock
`AutoModelForCausalLM.from_pretrained` loads it. Stored parameters are counted honestly: every kept expert's
3 p d weights plus its d router row (the shared expert and the rest of the model are untouched by every method).

What we changed: the number of experts kept is not a ratio given by hand; it is the largest k whose total
parameters do not exceed what the compressing methods store at the same cut (`kept_for_budget`). Calibration:
the same calibration text as every other peer (REAP's recipe samples domain data, e.g. evol-codealpaca); the
router probabilities come from the captured routing (for a model with norm_topk_prob the captured top-k
weights are renormalised, as REAP's `renormalize_router_weights` option would do).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmarks.baselines.routed import Routed


def kept_for_budget(e: int, p: int, d: int, budget: float, router_row: int) -> int:
    """Largest number of experts k per layer with k (3 p d + router_row) <= E ((2 budget + 1) p d + router_row):
    the layer's gate/up at `budget` per family, down and the router dense, as the compressing peers store it."""
    allowance = e * ((2 * budget + 1) * p * d + router_row)
    return max(1, min(e, math.floor(allowance / (3 * p * d + router_row) + 1e-9)))


def expert_output(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act, x: torch.Tensor) -> torch.Tensor:
    """[T, d] output of one expert (gate/up [p, d], down [d, p]) on tokens x [T, d], float32."""
    return (act(x @ gate.float().T) * (x @ up.float().T)) @ down.float().T


@torch.no_grad()
def reap_saliency(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act, tokens: Routed) -> torch.Tensor:
    """[E] REAP saliency of one layer's experts (gate/up [E, p, d], down [E, d, p]) on its captured tokens."""
    sal = torch.zeros(gate.shape[0], dtype=torch.float64)
    for e in range(gate.shape[0]):
        rows, slot = (tokens.index == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        norms = expert_output(gate[e], up[e], down[e], act, tokens.hidden[rows].float()).norm(dim=-1)   # [n_e]
        sal[e] = (norms.double() * tokens.weight[rows, slot].double()).mean()
    return sal


def reap_keep(families: dict[str, torch.Tensor], act, captured: list[Routed], keep: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """([L, keep] kept expert ids, sorted ascending; [L, E] saliencies) dropping the lowest per layer."""
    sal = torch.stack([reap_saliency(families["gate"][i], families["up"][i], families["down"][i], act, tokens)
                       for i, tokens in enumerate(captured)])                  # [L, E]
    order = torch.argsort(sal, dim=1, descending=True, stable=True)
    return order[:, :keep].sort(dim=1).values, sal


def pruned_params(layers: int, keep: int, p: int, d: int, router_row: int) -> int:
    """Stored routed-expert + router parameters of the pruned model."""
    return layers * keep * (3 * p * d + router_row)


@torch.no_grad()
def write_pruned(model_dir: str | Path, keep: torch.Tensor, out_dir: str | Path) -> Path:
    """Checkpoint of model_dir with only the experts keep[l] ([L, k]) in MoE layer l: fused experts and router
    rows sliced, the config's expert count set to k; saved with save_pretrained; returns out_dir."""
    import transformers
    from benchmarks.baselines.checkpoint import load_causal_lm
    from benchmarks.baselines.fisher import fused_experts
    model = load_causal_lm(model_dir)
    names = {module: name for name, module in model.named_modules()}
    state = model.state_dict()
    e = next(iter(fused_experts(model).values())).gate_up_proj.shape[0]
    for i, module in enumerate(fused_experts(model).values()):
        idx = keep[i]
        prefix = names[module]
        for tensor in ("gate_up_proj", "down_proj"):
            state[f"{prefix}.{tensor}"] = state[f"{prefix}.{tensor}"][idx].clone()
        block = prefix.rsplit(".", 1)[0] + "."
        routers = [k for k, v in state.items() if k.startswith(block) and not k.startswith(prefix + ".")
                   and v.dim() == 2 and v.shape[0] == e and "shared" not in k]
        if len(routers) != 1:
            raise ValueError(f"{block}: expected one router weight [E, d], found {routers}")
        state[routers[0]] = state[routers[0]][idx].clone()
    config = model.config
    keys = [k for k in ("num_experts", "num_local_experts", "n_routed_experts") if hasattr(config, k)]
    if not keys:
        raise ValueError(f"{type(config).__name__} has no expert-count field to shrink")
    for k in keys:
        setattr(config, k, int(keep.shape[1]))
    config.num_experts_per_tok = min(config.num_experts_per_tok, int(keep.shape[1]))
    pruned = transformers.AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.save_pretrained(str(out_dir))
    return Path(out_dir)
