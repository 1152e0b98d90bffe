"""Glue of the expert-sharded fit (see globe.fit.distributed): read this rank's experts, a warm start shared by
every rank, and the final gather of codes/adapters/scales/ids onto rank 0. With LocalComm each is a pass-through.
"""
from __future__ import annotations

import torch

from globe.errors import ConfigError
from globe.fit.config import FitConfig
from globe.fit.distributed import Comm
from globe.fit.normalize import Normalizer
from globe.fit.warm_start import warm_start


def check_sharded(cfg: FitConfig, comm: Comm, n_local: int) -> None:
    """Refuse what the sharded fit cannot do (the same answer on every rank, so all of them raise)."""
    if comm.world == 1:
        return
    n = comm.total(n_local)
    if n < comm.world:
        raise ConfigError(f"{n} experts cannot be shared by {comm.world} processes: start fewer processes")
    if cfg.train.refine_steps > 0 and cfg.train.amp == "fp16":
        raise ConfigError("train.amp fp16 with Adam refinement is not supported by the distributed fit "
                          "(the loss scaler would skip steps on some ranks only): use amp bf16 or none")


def read_shard(reader, family: str, comm: Comm):
    """ExpertStack of this rank's contiguous slice of the family (reads only the layers that hold it)."""
    if comm.world == 1:
        return reader.read_family(family, lazy=True)                        # experts read chunk by chunk, never all
    from globe.io.reader import ExpertStack
    inv = reader.inventory()
    e, layers = inv.num_experts, list(inv.moe_layers)
    lo, hi = comm.shard(len(layers) * e)
    first = lo // e
    stack = reader.read_family(family, layers[first:(hi - 1) // e + 1])
    start = lo - first * e
    weights = stack.weights[start:start + hi - lo].clone()                  # [n_k, p, d], the rest freed
    return ExpertStack(family=family, weights=weights, ids=stack.ids[start:start + hi - lo].clone())


def shared_warm_start(targets: torch.Tensor, m: int, cfg: FitConfig, gen: torch.Generator, comm: Comm):
    """warm_start on every expert's targets, computed on rank 0 and broadcast: (bank [m, r, d] on every rank,
    this rank's codes [n_k, m], temperature); gen ends in rank 0's state everywhere. Rank 0 holds all targets
    [N, r, d] meanwhile, as one process does."""
    if comm.world == 1:
        return warm_start(targets, m, cfg, gen)
    n_local, r, d = targets.shape
    n = comm.total(n_local)
    full = comm.gather_rows(targets, n)
    if comm.is_main:
        bank, codes, temp = warm_start(full, m, cfg, gen)
    else:
        bank = torch.empty(m, r, d, dtype=targets.dtype, device=targets.device)
        codes, temp = torch.empty(n, m, dtype=targets.dtype, device=targets.device), 0.0
    del full
    comm.broadcast(bank)
    comm.broadcast(codes)
    temp = float(comm.broadcast(torch.tensor([temp], dtype=torch.float64))[0])
    gen.set_state(comm.broadcast(gen.get_state()))                          # same draws later on every rank
    lo, hi = comm.shard(n)
    return bank, codes[lo:hi].clone(), temp


def gather_fit(comm: Comm, norm: Normalizer, adapters: torch.Tensor, codes: torch.Tensor, sq_err: torch.Tensor,
               ids: torch.Tensor):
    """Rank 0: (norm, adapters, codes, sq_err, ids) of all experts in expert order; other ranks: None.
    adapters [n_k, p, r] are folded (original space), codes [n_k, m], sq_err [n_k], ids [n_k, 2]."""
    if comm.world == 1:
        return norm, adapters, codes, sq_err, ids
    n = comm.total(codes.shape[0])
    stats = torch.stack([norm.means.double(), norm.stds.double(), norm.scales.double(), norm.sq_norms, sq_err.double()],
                        1)                                                  # [n_k, 5]
    parts = [comm.gather_rows(t, n) for t in (stats, adapters, codes, ids)]
    if not comm.is_main:
        return None
    stats, adapters, codes, ids = parts
    full = Normalizer(means=stats[:, 0].float(), stds=stats[:, 1].float(), scales=stats[:, 2].float(),
                      sq_norms=stats[:, 3])
    return full, adapters, codes, stats[:, 4], ids
