"""`ExpertShard`: this process's slice of a family's experts, and the one place where ranks meet.

It owns the communicator (globe.fit.parallel.comm: LocalComm in one process, where every collective is a no-op,
or DistComm under torchrun) and the sizes: rank k holds the contiguous global experts [lo, hi) of n. The engine's
stages call it for everything that involves other ranks: reading the shard, the global error, the shape chosen
on rank 0, the shared warm start, the final gather onto rank 0. The leaf kernels (AM, MOD, VarPro, Adam) receive
`shard.comm` only for their sums over experts, which are plain method calls, never `world > 1` branches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from globe.errors import ConfigError
from globe.fit.config import FitConfig
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.solvers.normalize import Normalizer
from globe.io.reader import ExpertStack


@dataclass(frozen=True)
class ExpertShard:
    """Experts [lo, hi) of a family of n, held by rank comm.rank of comm.world."""

    comm: Comm
    n: int                        # experts of the family, over every rank
    lo: int
    hi: int

    @classmethod
    def of(cls, n_local: int, comm: Comm = LOCAL) -> ExpertShard:
        """The shard of a process holding n_local experts (a collective: every rank calls it)."""
        n = comm.total(n_local)
        lo, hi = comm.shard(n)
        return cls(comm=comm, n=n, lo=lo, hi=hi)

    @property
    def distributed(self) -> bool:
        return self.comm.world > 1

    @property
    def is_main(self) -> bool:
        return self.comm.is_main

    def check(self, cfg: FitConfig, resumable: bool) -> None:
        """Refuse what the sharded fit cannot do (the same answer on every rank, so all of them raise)."""
        if not self.distributed:
            return
        if self.n < self.comm.world:
            raise ConfigError(f"{self.n} experts cannot be shared by {self.comm.world} processes: start fewer "
                              "processes")
        if cfg.train.refine_steps > 0 and cfg.train.amp == "fp16":
            raise ConfigError("train.amp fp16 with Adam refinement is not supported by the distributed fit "
                              "(the loss scaler would skip steps on some ranks only): use amp bf16 or none")
        if resumable:
            raise ConfigError("checkpoints within a family are not supported in a distributed fit")

    def rel_err(self, sq_err: torch.Tensor, norm: Normalizer) -> float:
        """sqrt(sum_i err_i / sum_i ||W_i||^2) over every rank's experts."""
        return float((self.comm.all_reduce(sq_err.sum()) / self.comm.all_reduce(norm.sq_norms.sum())).sqrt())

    def from_main(self, values: tuple[int, ...]) -> tuple[int, ...]:
        """Rank 0's integers on every rank."""
        if not self.distributed:
            return values
        return tuple(self.comm.broadcast(torch.tensor(values)).tolist())

    def warm_start(self, make, targets: torch.Tensor, m: int, cfg: FitConfig, gen: torch.Generator):
        """make(targets, m, cfg, gen) (globe.fit.warm_starts.base.warm_start) on every expert's targets, computed on rank 0 and broadcast: (bank [m, r, d] on every rank,
        this rank's codes [n_k, m], temperature); gen ends in rank 0's state everywhere. Rank 0 holds all targets
        [N, r, d] meanwhile, as one process does."""
        if not self.distributed:
            return make(targets, m, cfg, gen)
        comm, (_, r, d) = self.comm, targets.shape
        full = comm.gather_rows(targets, self.n)
        if comm.is_main:
            bank, codes, temp = make(full, m, cfg, gen)
        else:
            bank = torch.empty(m, r, d, dtype=targets.dtype, device=targets.device)
            codes, temp = torch.empty(self.n, m, dtype=targets.dtype, device=targets.device), 0.0
        del full
        comm.broadcast(bank)
        comm.broadcast(codes)
        temp = float(comm.broadcast(torch.tensor([temp], dtype=torch.float64))[0])
        gen.set_state(comm.broadcast(gen.get_state()))                      # same draws later on every rank
        return bank, codes[self.lo:self.hi].clone(), temp

    def gather(self, norm: Normalizer, adapters: torch.Tensor, codes: torch.Tensor, sq_err: torch.Tensor,
               ids: torch.Tensor):
        """Rank 0: (norm, adapters, codes, sq_err, ids) of all experts in expert order; other ranks: None.
        adapters [n_k, p, r] are folded (original space), codes [n_k, m], sq_err [n_k], ids [n_k, 2]."""
        if not self.distributed:
            return norm, adapters, codes, sq_err, ids
        stats = torch.stack([norm.means.double(), norm.stds.double(), norm.scales.double(), norm.sq_norms,
                             sq_err.double()], 1)                           # [n_k, 5]
        parts = [self.comm.gather_rows(t, self.n) for t in (stats, adapters, codes, ids)]
        if not self.comm.is_main:
            return None
        stats, adapters, codes, ids = parts
        full = Normalizer(means=stats[:, 0].float(), stds=stats[:, 1].float(), scales=stats[:, 2].float(),
                          sq_norms=stats[:, 3])
        return full, adapters, codes, stats[:, 4], ids


def read_shard(reader, family: str, comm: Comm) -> ExpertStack:
    """ExpertStack of this rank's contiguous slice of the family (reads only the layers that hold it)."""
    if comm.world == 1:
        return reader.read_family(family, lazy=True)                        # experts read chunk by chunk, never all
    inv = reader.inventory()
    e, layers = inv.num_experts, list(inv.moe_layers)
    lo, hi = comm.shard(len(layers) * e)
    first = lo // e
    stack = reader.read_family(family, layers[first:(hi - 1) // e + 1])
    start = lo - first * e
    weights = stack.weights[start:start + hi - lo].clone()                  # [n_k, p, d], the rest freed
    return ExpertStack(family=family, weights=weights, ids=stack.ids[start:start + hi - lo].clone())
