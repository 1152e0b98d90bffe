"""The whole-expert objective: what a routed expert computes, not one matrix at a time.

    sum_l (1 / L) sum_{i in l} sum_t w_t ||D_i (act(G_hat_i x_t) * (U_hat_i x_t)) - y_t||^2 / Y_l
    y_t = D_i (act(G_i x_t) * (U_i x_t))   (the original expert's output),   Y_l = sum_{i in l} sum_t w_t ||y_t||^2

over a capped sample of the tokens x_t routed to expert i (globe.calibration.routed) with their routing weights
w_t: the router-weighted relative output error of each MoE layer, averaged over layers. Gate and up enter together
through the activation, so the fit can trade one's error against the other's where the output feels it.
`ExpertData` holds the samples, the targets and the per-layer normalisers; `output_loss` is the loss of a chunk
of experts for given G_hat, U_hat (differentiable).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from globe.calibration.routed import RoutedSamples
from globe.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ExpertData:
    """Per expert i (the fit's order): samples x [N, S, d], weights [N, S] (0 on padding), train / validation
    masks [N, S] (bool), targets y [N, S, h], down [N, h, p] fp32, inverse normaliser [N] (1 / (L Y_l))."""

    x: torch.Tensor
    weights: torch.Tensor
    train: torch.Tensor
    valid: torch.Tensor
    y: torch.Tensor
    down: torch.Tensor
    inv_norm: torch.Tensor
    inv_norm_valid: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def weighted(self, gains: torch.Tensor | None) -> ExpertData:
        """This objective with expert i's term multiplied by gains[i] ([N]; None: unchanged), e.g. its layer's
        sensitivity weight (globe.fit.objectives.sensitivity.output_gains)."""
        if gains is None:
            return self
        return dataclasses.replace(self, inv_norm=self.inv_norm * gains, inv_norm_valid=self.inv_norm_valid * gains)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"the whole-expert refinement does not know the activation {name!r} (known: "
                          f"{', '.join(ACTIVATIONS)}); run without --expert-steps")
    return ACTIVATIONS[name]


def expert_outputs(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [c, S, d], gate / up [c, p, d], down [c, h, p] -> [c, S, h]."""
    return (act(x @ gate.transpose(1, 2)) * (x @ up.transpose(1, 2))) @ down.transpose(1, 2)


def expert_data(samples: RoutedSamples, ids: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor, validation: float, down_hat: torch.Tensor | None = None) -> ExpertData:
    """ExpertData of the experts ids [N, 2] (layer, expert) with original weights gate / up [N, p, d] and down
    [N, h, p] (any float dtype); the last `validation` share of each expert's samples is held out. down_hat: the
    down projections the prediction goes through (a compressed down family's reconstruction; default: down)."""
    missing = sorted({int(l) for l in ids[:, 0]} - set(samples.layers))
    if missing:
        raise ConfigError(f"routed samples lack MoE layer(s) {missing}: calibrate the model being fitted")
    rows = torch.tensor([samples.layer_index(int(l)) for l in ids[:, 0]])
    expert = ids[:, 1].long()
    x = samples.inputs[rows, expert].float()                                         # [N, S, d]
    w = samples.weights[rows, expert].float()                                        # [N, S]
    counts = samples.counts[rows, expert]                                            # [N]
    pos = torch.arange(x.shape[1])[None]                                             # [1, S]
    held = (counts.double() * validation).floor().long()                             # [N]
    train = pos < (counts - held)[:, None]
    valid = (pos >= (counts - held)[:, None]) & (pos < counts[:, None])
    act = activation(str(samples.info.get("activation", "silu")))
    down = down.float()
    with torch.no_grad():
        y = expert_outputs(x, gate.float(), up.float(), down, act)                    # [N, S, h]
    energy = y.square().sum(-1) * w                                                   # [N, S]
    layer_pos = torch.unique(rows, return_inverse=True)[1]                            # [N] in 0..L-1
    layers = int(layer_pos.max()) + 1

    def inverse(mask: torch.Tensor) -> torch.Tensor:
        per_layer = torch.zeros(layers, dtype=torch.float64).index_add_(0, layer_pos, (energy * mask).sum(1).double())
        return (1.0 / (layers * per_layer.clamp_min(1e-30))).float()[layer_pos]      # [N]
    down = down if down_hat is None else down_hat.float()
    return ExpertData(x=x, weights=w, train=train, valid=valid, y=y, down=down, inv_norm=inverse(train),
                      inv_norm_valid=inverse(valid), act=act)


def output_loss(data: ExpertData, lo: int, hi: int, gate: torch.Tensor, up: torch.Tensor,
                validation: bool = False, index: torch.Tensor | None = None) -> torch.Tensor:
    """The objective's share of experts lo:hi for G_hat / U_hat [hi - lo, p, d] (fp32): a scalar; on the held-out
    samples with validation; index [hi - lo, B]: only these sample positions of each expert (a minibatch: the
    loss is scaled by S / B so that it estimates the full one)."""
    x, y, w = data.x[lo:hi], data.y[lo:hi], data.weights[lo:hi]
    mask = (data.valid if validation else data.train)[lo:hi]
    scale = 1.0
    if index is not None:
        x, y = (t.gather(1, index[..., None].expand(-1, -1, t.shape[-1])) for t in (x, y))    # [c, B, .]
        w, mask = w.gather(1, index), mask.gather(1, index)
        scale = data.x.shape[1] / index.shape[1]
    pred = expert_outputs(x, gate, up, data.down[lo:hi], data.act)                   # [c, S or B, h]
    err = (pred - y).square().sum(-1) * w * mask                                      # [c, S or B]
    inv = (data.inv_norm_valid if validation else data.inv_norm)[lo:hi]
    return (err.sum(1) * inv).sum() * scale


@torch.no_grad()
def expert_losses(data: ExpertData, gate: torch.Tensor, up: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Each expert's term of the objective (training samples) for G_hat / U_hat [N, p, d]: [N] fp64."""
    out = torch.empty(data.n, dtype=torch.float64)
    for lo in range(0, data.n, chunk):
        hi = min(lo + chunk, data.n)
        pred = expert_outputs(data.x[lo:hi], gate[lo:hi].float(), up[lo:hi].float(), data.down[lo:hi], data.act)
        err = (pred - data.y[lo:hi]).square().sum(-1) * data.weights[lo:hi] * data.train[lo:hi]
        out[lo:hi] = (err.sum(1) * data.inv_norm[lo:hi]).double()
    return out
