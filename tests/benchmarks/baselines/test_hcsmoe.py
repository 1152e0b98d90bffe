"""HC-SMoE: average linkage on planted points, frequency-weighted merging, two identical experts merged into one
with zero output change, parameter count by hand."""
from __future__ import annotations

import torch

from benchmarks.baselines.checkpoint import read_families, write_dense
from benchmarks.baselines.fisher import fused_experts
from benchmarks.baselines.hcsmoe import average_linkage, clusters_for_budget, hc_smoe, merge_clusters, merged_params
from benchmarks.baselines.routed import capture_routed
from tests.benchmarks.baselines.planted import save, tiny_moe

IDS = torch.randint(0, 64, (256,), generator=torch.Generator().manual_seed(4))


def test_count_equals_a_hand_count():
    # E=8, budget 0.25: k = floor(8 * 1.5 / 3) = 4; stored per layer 4 * 3 * 24 + 8 * 6 = 336
    assert clusters_for_budget(8, 4, 6, 0.25) == 4
    assert merged_params(2, 4, 8, 4, 6) == 2 * (4 * 72 + 48) == 672


def test_average_linkage_on_planted_points():
    pts = torch.tensor([[0.0], [1.0], [10.0], [11.0], [30.0]])
    assert average_linkage(pts, 3).tolist() == [0, 0, 1, 1, 2]
    assert average_linkage(pts, 2).tolist() == [0, 0, 0, 0, 1]            # avg 10 < avg 19.5 to the outlier
    assert average_linkage(pts, 5).tolist() == [0, 1, 2, 3, 4]


def test_merge_is_frequency_weighted():
    a, b, c = torch.ones(1, 2, 3), 5 * torch.ones(1, 2, 3), -torch.ones(1, 2, 3)
    out = merge_clusters({"gate": torch.cat([a, b, c])}, torch.tensor([0, 0, 1]), torch.tensor([3.0, 1.0, 7.0]))
    assert torch.allclose(out["gate"][0], torch.full((2, 3), 0.75 * 1 + 0.25 * 5))
    assert torch.equal(out["gate"][0], out["gate"][1]) and torch.equal(out["gate"][2], c[0])


def test_two_identical_experts_merge_into_one_with_zero_output_change(tmp_path):
    model = tiny_moe()
    with torch.no_grad():                                                  # plant: expert 5 = expert 2, all layers
        for module in fused_experts(model).values():
            module.gate_up_proj[5] = module.gate_up_proj[2]
            module.down_proj[5] = module.down_proj[2]
    captured, act = capture_routed(model, IDS, window=64)
    fam = read_families(model)
    freq = torch.stack([torch.bincount(r.index.reshape(-1), minlength=8) for r in captured]).double()
    merged, labels = hc_smoe(fam, act, [r.hidden for r in captured], freq, 7)
    for lab in labels:
        assert lab[2] == lab[5] and lab.unique().numel() == 7             # only the identical pair is merged
    for f in ("gate", "up", "down"):
        assert torch.allclose(merged[f], fam[f], atol=1e-6)
    out = write_dense(save(model, tmp_path / "src"), merged, tmp_path / "merged")
    import transformers
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = IDS[:48].view(1, -1)
    with torch.no_grad():
        assert torch.allclose(back(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    assert back.config.num_experts == 8                                     # the router is kept, all rows


def test_merging_distinct_experts_changes_the_output(tmp_path):
    model = tiny_moe()
    captured, act = capture_routed(model, IDS, window=64)
    fam = read_families(model)
    freq = torch.stack([torch.bincount(r.index.reshape(-1), minlength=8) for r in captured]).double()
    merged, labels = hc_smoe(fam, act, [r.hidden for r in captured], freq, 4)
    assert all(lab.unique().numel() == 4 for lab in labels)
    assert not torch.allclose(merged["gate"], fam["gate"])
