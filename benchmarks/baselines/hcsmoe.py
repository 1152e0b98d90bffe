"""HC-SMoE expert merging (wazenmai/HC-SMoE, `merging/clustering.py` + `merging/grouping_qwen.py`), per layer.

1. Features: each expert's output averaged over ALL calibration tokens of its layer (every expert applied to
   every token, not only the routed ones: the paper's "expert outputs" criterion, the default of its scripts).
2. Hierarchical clustering of the E feature vectors, Euclidean distance, average linkage
   (d(A, B) = mean over a in A, b in B of ||f_a - f_b||), merging the closest pair until k clusters remain.
3. Each cluster is merged by frequency-weighted averaging of its experts' gate, up and down weights (weights:
   tokens routed to each expert on the calibration text; a cluster whose experts were never routed to gets the
   plain mean).
4. Router: as HC-SMoE (and MC-SMoE before it) do, the router is kept unchanged, with all E rows; every expert of
   a cluster points at the cluster's one merged expert ("all experts in a group share the same parameters").
   So the routing decision is the original's and a token sent to two members of one cluster gets the merged
   expert with their summed weight.

Stored parameters: k merged experts (3 p d each) per layer plus the full router (E d); the dense checkpoint
written for scoring repeats each merged expert at every member's slot (that is how the stock architecture
expresses shared experts), but those copies are one stored tensor and are counted once.
What we changed: k is the largest cluster count whose total parameters do not exceed what the compressing
methods store at the same cut (`clusters_for_budget`), not a hand-given target; calibration text is the same as
every other peer's (the paper uses C4); features are computed on at most `max_tokens` calibration tokens.
"""
from __future__ import annotations

import math

import torch

from benchmarks.baselines.reap import expert_output


def clusters_for_budget(e: int, p: int, d: int, budget: float) -> int:
    """Largest k with k 3 p d <= E (2 budget + 1) p d (router kept in full by both sides)."""
    return max(1, min(e, math.floor(e * (2 * budget + 1) / 3 + 1e-9)))


@torch.no_grad()
def expert_features(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act, x: torch.Tensor,
                    chunk: int = 4096) -> torch.Tensor:
    """[E, d] mean output of every expert (gate/up [E, p, d], down [E, d, p]) over all tokens x [T, d]."""
    out = torch.zeros(gate.shape[0], down.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk].float()
        for e in range(gate.shape[0]):
            out[e] += expert_output(gate[e], up[e], down[e], act, xs).double().sum(0)
    return (out / max(1, x.shape[0])).float()


def average_linkage(features: torch.Tensor, k: int) -> torch.Tensor:
    """[E] cluster labels 0..k-1 (numbered by smallest member) from average-linkage agglomeration of [E, f]."""
    dist = torch.cdist(features.double(), features.double())                  # [E, E] Euclidean
    clusters = [[i] for i in range(features.shape[0])]
    while len(clusters) > k:
        best, pair = math.inf, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(dist[clusters[a]][:, clusters[b]].mean())
                if link < best:                                               # first pair wins ties
                    best, pair = link, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    labels = torch.empty(features.shape[0], dtype=torch.long)
    for c, members in enumerate(sorted(clusters)):
        labels[members] = c
    return labels


def merge_clusters(families: dict[str, torch.Tensor], labels: torch.Tensor, freq: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """One layer: {"gate", "up", "down": [E, ...]} with every expert replaced by its cluster's frequency-weighted
    mean (labels [E], freq [E] routed-token counts)."""
    out = {f: w.clone().float() for f, w in families.items()}
    for c in labels.unique().tolist():
        members = (labels == c).nonzero(as_tuple=True)[0]
        w = freq[members].double().clamp_min(0)
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / members.numel())
        for f, weights in families.items():
            merged = (weights[members].double() * w.view(-1, *[1] * (weights.dim() - 1))).sum(0).float()
            out[f][members] = merged
    return out


def hc_smoe(families: dict[str, torch.Tensor], act, calib_hidden: list[torch.Tensor], freq: torch.Tensor,
            clusters: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """HC-SMoE of every layer. families: {"gate", "up": [L, E, p, d], "down": [L, E, d, p]}; calib_hidden: per
    layer [T, d] MoE inputs; freq [L, E]. Returns (merged families, same shapes; [L, E] cluster labels)."""
    merged = {f: torch.empty_like(w, dtype=torch.float32) for f, w in families.items()}
    labels = []
    for layer, x in enumerate(calib_hidden):
        layer_w = {f: w[layer] for f, w in families.items()}
        feats = expert_features(layer_w["gate"], layer_w["up"], layer_w["down"], act, x)
        lab = average_linkage(feats, clusters)
        for f, w in merge_clusters(layer_w, lab, freq[layer]).items():
            merged[f][layer] = w
        labels.append(lab)
    return merged, torch.stack(labels)


def merged_params(layers: int, clusters: int, e: int, p: int, d: int) -> int:
    """Stored routed-expert + router parameters: k merged experts and the full router per layer."""
    return layers * (clusters * 3 * p * d + e * d)
