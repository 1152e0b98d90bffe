"""A tiny seeded Qwen2-MoE for the expert-pruning and expert-merging baselines' tests (built, never downloaded)."""
from __future__ import annotations

import torch


def tiny_moe(experts: int = 8, layers: int = 2, seed: int = 0):
    """Random Qwen2-MoE (hidden 16, expert width 8, top-2, no norm_topk_prob), float32, eval mode."""
    import transformers
    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                      shared_expert_intermediate_size=16, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=1, num_experts=experts,
                                      num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=64,
                                      decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def save(model, path):
    model.save_pretrained(str(path))
    return path
