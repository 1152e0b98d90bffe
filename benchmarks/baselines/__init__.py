"""Peer baselines for the comparison benchmarks, each reimplemented from its authors' code and recipe.

Every baseline takes one family's routed-expert weights as a [L, E, p, d] float tensor (L MoE layers, E experts
per layer, expert matrices p x d) and returns a `PeerFit`: the reconstructed weights (same shape) and the exact
number of stored parameters. They live here, outside the `globe` package, because they are measuring sticks,
not part of the library.

    svd.per_expert_svd        truncated SVD of every expert
    svd.whitened_svd          SVD-LLM: truncation under each expert's routed-token Gram
    d2moe.d2moe               D2-MoE (lliai/D2MoE): Fisher-merged base + per-expert (or share_V) SVD deltas
    mobe.fit_mobe             MoBE (inclusionAI/MoBE): A_e act(sum_i softmax(w_e)_i B_i), Adam from an SVD start
    fisher.expert_fisher      the squared-gradient Fisher information of the routed experts, for D2-MoE
    reap.reap_keep            REAP (CerebrasResearch/reap): drop the experts of lowest router-weighted output norm;
                              reap.write_pruned writes the smaller checkpoint (experts and router rows removed)
    hcsmoe.hc_smoe            HC-SMoE (wazenmai/HC-SMoE): average-linkage clusters of expert outputs, each merged by
                              routing frequency; the router is kept and a cluster's experts share the merged one
REAP and HC-SMoE act on whole experts (gate, up and down) and are not PeerFits; benchmarks/peers.py gives them
the expert count whose total parameters match the compressing methods' at the same cut.
"""
from __future__ import annotations

from benchmarks.baselines.common import PeerFit, rel_err

__all__ = ["PeerFit", "rel_err"]
