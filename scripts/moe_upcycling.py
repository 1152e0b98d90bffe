"""Upcycle a dense Qwen2-MoE-family model into a fine-grained MoE, the way Qwen1.5-MoE was made.

Qwen1.5-MoE-A2.7B was initialised from the dense Qwen-1.8B: each dense FFN was shuffled along its intermediate
dimension and partitioned into fine-grained shards; the routed experts were copied from those shards with part of
their parameters re-initialised (so copies of one shard differ), and a shared expert runs next to them.
``upcycle`` does this for a dense model that is a ``Qwen2MoeForCausalLM`` whose layers are all dense
(``mlp_only_layers`` = every layer, FFN width ``intermediate_size`` = I):

    per layer   perm = a random permutation of the I dense neurons (the shuffle)
                shard c (c < P = I / p) = dense neurons perm[c*p:(c+1)*p]
    expert e    copy of shard e % P (gate/up rows, down columns); then each entry independently, with probability
                ``reinit_fraction``, is replaced by N(0, std of that dense matrix)
    shared      the dense FFN itself (gate/up/down), with a fresh shared-expert gate; router freshly initialised
    the rest    embeddings, attention, norms copied unchanged

Not a script: ``scripts/train_upcycled_moe.py`` uses it; ``tests/scripts/test_moe_upcycling.py`` checks it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM


@dataclass
class UpcycleRecord:
    """What ``upcycle`` drew: per layer the neuron permutation [I] and, per expert, which entries were
    re-initialised (bool masks: gate [E, p, d], up [E, p, d], down [E, d, p])."""
    perms: list[torch.Tensor]
    gate_masks: list[torch.Tensor]
    up_masks: list[torch.Tensor]
    down_masks: list[torch.Tensor]


def dense_config(moe_cfg: Qwen2MoeConfig, intermediate: int) -> Qwen2MoeConfig:
    """The dense twin of ``moe_cfg``: same model, every layer a plain FFN of width ``intermediate``."""
    fields = moe_cfg.to_dict()
    fields.update(mlp_only_layers=list(range(moe_cfg.num_hidden_layers)), intermediate_size=intermediate,
                  output_router_logits=False)
    for key in ("architectures", "transformers_version", "model_type"):
        fields.pop(key, None)
    return Qwen2MoeConfig(**fields)


def shards(dense: torch.Tensor, perm: torch.Tensor, p: int, experts: int, dim: int) -> torch.Tensor:
    """Stack of the experts' copies of the shuffled dense matrix: expert e gets shard e % (I / p).

    dense [I, d] (gate/up, dim=0) or [d, I] (down, dim=1) -> [E, p, d] or [E, d, p]."""
    n_shards = perm.numel() // p
    idx = torch.stack([perm[(e % n_shards) * p:(e % n_shards + 1) * p] for e in range(experts)])  # [E, p]
    return torch.stack([dense.index_select(dim, i) for i in idx])


def reinit(copies: torch.Tensor, std: float, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each entry of ``copies`` with N(0, std^2) with probability ``fraction``; return (new, mask)."""
    mask = torch.rand(copies.shape, generator=gen) < fraction
    fresh = torch.randn(copies.shape, generator=gen) * std
    return torch.where(mask, fresh.to(copies.dtype), copies), mask


@torch.no_grad()
def upcycle_layer(dense_mlp: torch.nn.Module, moe_block: torch.nn.Module, fraction: float,
                  gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fill one ``Qwen2MoeSparseMoeBlock`` from one dense ``Qwen2MoeMLP``; return (perm, [gate, up, down masks])."""
    experts = moe_block.experts
    e, p = experts.num_experts, experts.intermediate_dim
    wg, wu, wd = (getattr(dense_mlp, f"{n}_proj").weight for n in ("gate", "up", "down"))   # [I,d] [I,d] [d,I]
    if wg.shape[0] % p:
        raise ValueError(f"dense intermediate size {wg.shape[0]} is not a multiple of the expert size {p}")
    perm = torch.randperm(wg.shape[0], generator=gen)
    gate, gate_mask = reinit(shards(wg, perm, p, e, 0), wg.std().item(), fraction, gen)     # [E, p, d]
    up, up_mask = reinit(shards(wu, perm, p, e, 0), wu.std().item(), fraction, gen)         # [E, p, d]
    down, down_mask = reinit(shards(wd, perm, p, e, 1), wd.std().item(), fraction, gen)     # [E, d, p]
    experts.gate_up_proj.copy_(torch.cat([gate, up], dim=1))                                 # [E, 2p, d]
    experts.down_proj.copy_(down)
    for n in ("gate", "up", "down"):
        getattr(moe_block.shared_expert, f"{n}_proj").weight.copy_(getattr(dense_mlp, f"{n}_proj").weight)
    return perm, [gate_mask, up_mask, down_mask]


@torch.no_grad()
def upcycle(dense: Qwen2MoeForCausalLM, moe_cfg: Qwen2MoeConfig, fraction: float,
            gen: torch.Generator) -> tuple[Qwen2MoeForCausalLM, UpcycleRecord]:
    """A new MoE model with config ``moe_cfg`` initialised from the trained ``dense`` model (see module doc).

    The MoE model's fresh parameters (routers, shared-expert gates) come from its own initialisation, drawn from
    torch's global generator; everything the upcycling draws comes from ``gen``."""
    if moe_cfg.shared_expert_intermediate_size != dense.config.intermediate_size:
        raise ValueError("the shared expert must have the dense FFN's width to hold it")
    moe = Qwen2MoeForCausalLM(moe_cfg)
    moe_state = moe.state_dict()
    copied = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = [k for k in copied if k not in moe_state]
    if missing:
        raise ValueError(f"dense and MoE models differ outside the FFNs: {missing[:3]}")
    moe.load_state_dict(copied, strict=False)
    record = UpcycleRecord([], [], [], [])
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers):
        perm, (g, u, d) = upcycle_layer(dense_layer.mlp, moe_layer.mlp, fraction, gen)
        record.perms.append(perm)
        record.gate_masks.append(g)
        record.up_masks.append(u)
        record.down_masks.append(d)
    if moe_cfg.tie_word_embeddings:
        moe.tie_weights()
    return moe, record
