"""REAP: saliency by hand, the lowest-saliency experts dropped on a planted model, a smaller valid checkpoint whose
parameter count equals a hand count."""
from __future__ import annotations

import torch

from benchmarks.baselines.checkpoint import load_causal_lm, read_families
from benchmarks.baselines.fisher import fused_experts
from benchmarks.baselines.reap import kept_for_budget, pruned_params, reap_keep, reap_saliency, write_pruned
from benchmarks.baselines.routed import capture_routed
from tests.benchmarks.baselines.planted import save, tiny_moe

IDS = torch.randint(0, 64, (512,), generator=torch.Generator().manual_seed(3))


def planted(scales: torch.Tensor):
    """Tiny model whose expert e's down projection is scaled by scales[e] in every layer (routing unchanged)."""
    model = tiny_moe()
    with torch.no_grad():
        for module in fused_experts(model).values():
            module.down_proj.mul_(scales.view(-1, 1, 1))
    return model


def test_kept_count_and_params_equal_a_hand_count():
    # E=8, p=4, d=6, budget 0.25: allowance 8 (1.5 * 24 + 6) = 336; per expert 3 * 24 + 6 = 78 -> k = 4
    assert kept_for_budget(8, 4, 6, 0.25, router_row=6) == 4
    assert pruned_params(2, 4, 4, 6, 6) == 2 * 4 * 78 == 624
    assert kept_for_budget(8, 4, 6, 1.0, router_row=6) == 8                   # nothing to drop at full budget


def test_saliency_is_the_mean_router_weighted_output_norm_over_routed_tokens():
    model = tiny_moe()
    captured, act = capture_routed(model, IDS[:64], window=32)
    fam = read_families(model)
    tokens = captured[1]
    sal = reap_saliency(fam["gate"][1], fam["up"][1], fam["down"][1], act, tokens)
    e = int(tokens.index[0, 0])
    total, n = 0.0, 0
    for t in range(tokens.hidden.shape[0]):                               # by hand, token by token
        for slot in range(tokens.index.shape[1]):
            if int(tokens.index[t, slot]) == e:
                x = tokens.hidden[t]
                y = fam["down"][1][e] @ (act(fam["gate"][1][e] @ x) * (fam["up"][1][e] @ x))
                total, n = total + float(tokens.weight[t, slot]) * float(y.norm()), n + 1
    assert n > 0 and abs(float(sal[e]) - total / n) < 1e-5 * max(1.0, total / n)
    assert (sal >= 0).all()


def test_reap_drops_exactly_the_lowest_saliency_experts_of_a_planted_model(tmp_path):
    scales = torch.tensor([1.0, 1e-3, 30.0, 1e-2, 3.0, 1e-4, 10.0, 0.1])     # experts 1, 3, 5, 7 are planted weak
    model = planted(scales)
    captured, act = capture_routed(model, IDS, window=64)
    fam = read_families(model)
    keep, sal = reap_keep(fam, act, captured, 4)
    assert keep.tolist() == [[0, 2, 4, 6], [0, 2, 4, 6]]
    for layer in range(2):                                                 # and they are the lowest saliencies
        assert sal[layer, [1, 3, 5, 7]].max() < sal[layer, [0, 2, 4, 6]].min()
    src = save(model, tmp_path / "src")
    write_pruned(src, keep, tmp_path / "pruned")
    import transformers
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    assert back.config.num_experts == 4
    got = read_families(back)
    for f in ("gate", "up", "down"):
        assert torch.equal(got[f], fam[f][:, [0, 2, 4, 6]])
    assert torch.equal(back.model.layers[1].mlp.gate.weight, model.model.layers[1].mlp.gate.weight[[0, 2, 4, 6]])
    count = lambda m: sum(p.numel() for p in m.parameters())
    p, d = fam["gate"].shape[2:]
    assert count(model) - count(back) == 2 * 4 * (3 * p * d + d)         # experts and router rows, nothing else
    logits = back(input_ids=IDS[:32].view(1, -1)).logits                 # it runs, routing only over kept experts
    assert torch.isfinite(logits).all()
