"""The sensitivity probe: an exact, deterministic perturbation; the model restored; more KL where the model feels
the layer more (a planted model whose later layer's experts are amplified)."""
from __future__ import annotations

import copy

import torch

from globe.calibration import collect_stats
from globe.calibration.sensitivity import layer_factor, layer_sensitivity, perturbation, probe_ids
from globe.io import experts_modules


def ids(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def test_perturbation_has_the_relative_whitened_error_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, 12, generator=gen)
    x = torch.randn(40, 12, generator=gen) * torch.linspace(0.1, 3, 12)
    c = x.T.double() @ x.double()
    factor = torch.linalg.cholesky(c / c.diagonal().mean() + 0.01 * torch.eye(12, dtype=torch.float64))
    d = perturbation(w, factor, keep=0.5, error=0.3)
    wl, dl = w.double() @ factor, d.double() @ factor
    ratio = dl.square().sum((1, 2)).sqrt() / wl.square().sum((1, 2)).sqrt()
    assert torch.allclose(ratio, torch.full((5,), 0.3, dtype=torch.float64), atol=1e-5)
    # the tail only: D L is orthogonal to the leading half of W L's singular directions
    u, _, _ = torch.linalg.svd(wl, full_matrices=False)
    assert float((u[..., :4].transpose(1, 2) @ dl).abs().max()) < 1e-4
    assert torch.equal(d, perturbation(w, factor, keep=0.5, error=0.3))


def test_probe_ids_split_a_text_into_windows_and_cap_tokens():
    assert probe_ids(torch.arange(100)[None], window=16, tokens=48).shape == (3, 16)
    assert probe_ids(ids(8, 16), window=16, tokens=40).shape == (2, 16)


def test_probe_restores_the_model_and_finds_the_amplified_layer(tiny_model):
    base = copy.deepcopy(tiny_model("qwen2_moe"))
    tokens = ids()
    stats = collect_stats(base, tokens, window=16)
    before = base(input_ids=tokens).logits
    plain = layer_sensitivity(base, tokens, stats, window=16)
    assert torch.equal(before, base(input_ids=tokens).logits)              # every weight put back
    layers = plain["layers"]
    assert layers == stats.layers and len(layers) == 2
    assert all(v > 0 for f in ("gate", "up") for v in plain["kl"][f])
    # plant: the last MoE layer's expert outputs x 8 (down_proj), so the model feels its gate / up errors ~64x more
    planted = copy.deepcopy(base)
    with torch.no_grad():
        experts_modules(planted)[layers[-1]].down_proj.mul_(8)
    stats2 = collect_stats(planted, tokens, window=16)
    probe = layer_sensitivity(planted, tokens, stats2, window=16)
    for f in ("gate", "up"):
        ratio_plain = plain["kl"][f][1] / plain["kl"][f][0]
        ratio_planted = probe["kl"][f][1] / probe["kl"][f][0]
        assert ratio_planted > 8 * ratio_plain, (f, ratio_plain, ratio_planted)
    assert probe["tokens"] == tokens.numel() and probe["seconds"] >= 0
    # the factors: each expert's C blended with its layer's ((S_e + 64 C_l) / (n_e + 64)), mean eigenvalue 1
    f = layer_factor(stats, layers[0])
    c_l = stats.hidden[0].double() / stats.tokens
    c = (stats.hidden_expert[0, 1].double() + 64 * c_l) / (float(stats.counts[0, 1]) + 64)
    d = c.shape[-1]
    assert torch.allclose(f[1] @ f[1].T, c / c.diagonal().mean() + 0.01 * torch.eye(d, dtype=torch.float64))
