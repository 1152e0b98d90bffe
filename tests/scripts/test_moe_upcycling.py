"""scripts/moe_upcycling.py: right after upcycling, the routed experts are the shuffled dense FFN's shards except
the re-initialised entries, the shared expert is the dense FFN, and everything outside the FFNs is copied."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from tests.helpers.scripts import load_script

E, P, I, D = 6, 4, 8, 16        # experts, expert width, dense width (2 shards), hidden


def _moe_config() -> Qwen2MoeConfig:
    return Qwen2MoeConfig(vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=P,
                          shared_expert_intermediate_size=I, intermediate_size=I, max_position_embeddings=32,
                          tie_word_embeddings=True, norm_topk_prob=False)


def _upcycled(fraction: float, seed: int = 0):
    up = load_script("moe_upcycling")
    torch.manual_seed(0)
    dense = Qwen2MoeForCausalLM(up.dense_config(_moe_config(), I))
    moe, record = up.upcycle(dense, _moe_config(), fraction, torch.Generator().manual_seed(seed))
    return dense, moe, record


def _expected_shard(dense_w: torch.Tensor, perm: torch.Tensor, expert: int, dim: int) -> torch.Tensor:
    shard = expert % (I // P)
    return dense_w.index_select(dim, perm[shard * P:(shard + 1) * P])


def test_dense_twin_has_no_experts():
    dense = _upcycled(0.5)[0]
    assert all(type(layer.mlp).__name__ == "Qwen2MoeMLP" for layer in dense.model.layers)
    assert dense.model.layers[0].mlp.gate_proj.weight.shape == (I, D)


def test_experts_are_dense_shards_except_the_reinitialised_entries():
    dense, moe, record = _upcycled(0.4)
    for layer, (dl, ml) in enumerate(zip(dense.model.layers, moe.model.layers)):
        perm = record.perms[layer]
        assert torch.equal(perm.sort().values, torch.arange(I))
        gate_up, down = ml.mlp.experts.gate_up_proj, ml.mlp.experts.down_proj        # [E, 2P, D], [E, D, P]
        for e in range(E):
            pairs = [(gate_up[e, :P], _expected_shard(dl.mlp.gate_proj.weight, perm, e, 0), record.gate_masks[layer][e]),
                     (gate_up[e, P:], _expected_shard(dl.mlp.up_proj.weight, perm, e, 0), record.up_masks[layer][e]),
                     (down[e], _expected_shard(dl.mlp.down_proj.weight, perm, e, 1), record.down_masks[layer][e])]
            for got, want, mask in pairs:
                assert torch.equal(got[~mask], want[~mask])
                assert (got[mask] != want[mask]).all()
    masks = torch.cat([m.flatten() for m in record.gate_masks + record.up_masks + record.down_masks]).float()
    assert masks.mean().item() == pytest.approx(0.4, abs=0.05)


def test_shared_expert_is_the_dense_ffn_and_the_rest_is_copied():
    dense, moe, _ = _upcycled(0.5)
    for dl, ml in zip(dense.model.layers, moe.model.layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(ml.mlp.shared_expert, name).weight, getattr(dl.mlp, name).weight)
    moe_state = moe.state_dict()
    for key, value in dense.state_dict().items():
        if ".mlp." not in key:
            assert torch.equal(moe_state[key], value), key


def test_copies_of_a_shard_differ_only_by_reinitialisation_and_the_draw_is_seeded():
    _, moe0, _ = _upcycled(0.0)
    gate_up = moe0.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[0], gate_up[I // P]) and not torch.equal(gate_up[0], gate_up[1])
    _, moe_a, _ = _upcycled(0.5, seed=3)
    _, moe_b, _ = _upcycled(0.5, seed=3)
    a, b = (m.model.layers[0].mlp.experts.gate_up_proj for m in (moe_a, moe_b))
    assert torch.equal(a, b) and not torch.equal(a[0], a[I // P])
    logits = moe_a(input_ids=torch.arange(10).unsqueeze(0)).logits
    assert logits.shape == (1, 10, 64) and torch.isfinite(logits).all()


def test_shared_expert_width_must_match_the_dense_ffn():
    up = load_script("moe_upcycling")
    dense = Qwen2MoeForCausalLM(up.dense_config(_moe_config(), 2 * I))
    with pytest.raises(ValueError, match="shared expert"):
        up.upcycle(dense, _moe_config(), 0.5, torch.Generator().manual_seed(0))
