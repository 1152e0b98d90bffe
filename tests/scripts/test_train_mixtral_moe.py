"""scripts/train_mixtral_moe.py and the shared training code on a Mixtral model: the configuration has no shared
expert, the losses balance the routers, and the save / layout check / sharing statistics read Mixtral's hub keys
(block_sparse_moe.experts.{e}.w1/w2/w3) through globe's architecture registry."""
from __future__ import annotations

import pytest
import torch
from transformers import MixtralForCausalLM

from tests.helpers.scripts import load_script


def tiny_args(tmp_path, argv: tuple[str, ...] = ()):
    return load_script("train_mixtral_moe").parse_args(
        ["--out-dir", str(tmp_path), "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
         "--moe-intermediate", "24", "--context", "16", "--steps", "3", "--warmup", "1", "--log-every", "1", *argv])


def test_config_is_mixtral_without_a_shared_expert(tmp_path):
    mt = load_script("moe_training")
    args = tiny_args(tmp_path)
    cfg = mt.mixtral_config(args, vocab=64, eos_id=0)
    assert (cfg.model_type, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == \
        ("mixtral", 8, 2, 24)
    assert mt.num_experts(cfg) == 8
    model = MixtralForCausalLM(cfg)
    assert not any("shared" in name for name, _ in model.named_parameters())
    assert mt.has_experts(model)


def test_shared_expert_option_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        tiny_args(tmp_path, ("--shared-intermediate", "16"))


def test_train_save_check_and_sharing_on_mixtral(tmp_path):
    mt, ev = load_script("moe_training"), load_script("moe_evaluation")
    args = tiny_args(tmp_path)
    torch.manual_seed(0)
    model = MixtralForCausalLM(mt.mixtral_config(args, vocab=64, eos_id=0))
    data = torch.randint(1, 64, (400,), generator=torch.Generator().manual_seed(1))
    lm, aux, router_logits = mt.losses(model, data[:32].view(2, 16))
    assert len(router_logits) == 2 and router_logits[0].shape == (32, 8)
    assert torch.isfinite(lm) and 0 < aux.item() < 8                # top_k (2) for perfectly balanced routing
    stats = mt.train(model, data, args)
    assert len(stats["loss_every_50_steps"]) == 1
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ckpt = ev.check_checkpoint(tmp_path, model.config)
    assert ckpt["dtypes"] == ["BF16"]
    sharing = ev.expert_sharing(tmp_path, "up")
    assert len(sharing["per_layer"]) == 2 and sharing["independent_random_mean_expert_energy"] == 1 / 8
    model.config.num_local_experts = 9                                 # expert 8: 2 layers x 3 keys not in the file
    with pytest.raises(RuntimeError, match="6 missing expert keys"):
        ev.check_checkpoint(tmp_path, model.config)
