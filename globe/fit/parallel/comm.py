"""Communicators for an expert-sharded fit: `LocalComm` (one process, every call a no-op) and `DistComm`
(torch.distributed: gloo on CPU, NCCL on CUDA, started by torchrun).

Rank k owns the contiguous slice shard(N)[k] of a family's N experts. Sums over experts that feed a shared
quantity (MOD normal equations, CG operator products, errors, support histograms, the row-space covariance,
variable-projection gradients of the bank) are all-reduced; codes, adapters and scales stay on their rank until
the end, when rank 0 gathers them.

    comm = init_comm(device)           # DistComm under torchrun (WORLD_SIZE > 1), else LocalComm
    lo, hi = comm.shard(n)             # this rank's experts
    total = comm.all_reduce(partial)   # in place, summed over ranks; LocalComm returns `partial` untouched
    run_local(fn, 2, *args)            # fn(comm, *args) on 2 spawned gloo processes of this machine (tests, benchmarks)
"""
from __future__ import annotations

import logging
import os
import socket
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous, near-equal split of n items: rank k gets [k*n // world, (k+1)*n // world)."""
    return rank * n // world, (rank + 1) * n // world


class Comm:
    """The single-process communicator: every collective returns its input (so fits stay bit-identical)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """Global [lo, hi) of this rank's experts out of n."""
        return shard_bounds(n, self.world, self.rank)

    def counts(self, n: int) -> list[int]:
        return [hi - lo for lo, hi in (shard_bounds(n, self.world, k) for k in range(self.world))]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place reduction (sum | max) over ranks; returns `tensor`."""
        return tensor

    def all_reduce_float(self, value: float, op: str = "sum") -> float:
        return value

    def total(self, n: int) -> int:
        """Sum of a per-rank count (e.g. the global number of experts from the local one)."""
        return n

    def largest(self, n: int) -> int:
        """Largest per-rank count: loops over local chunks run this long so that collectives inside match."""
        return n

    def mean_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the global rows of x [n_local, ...]."""
        return x.mean(0)

    def support_stats(self, sizes: torch.Tensor, m: int) -> tuple[float, float, int]:
        """(median, mean, max) of the integer support sizes [n_local] in [0, m] over all ranks.

        The median is the lower median, as torch.median."""
        support = sizes.float()
        return float(support.median()), float(support.mean()), int(support.max())

    def median(self, sizes: torch.Tensor, m: int) -> float:
        return float(sizes.float().median())

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: every rank gets rank src's tensor (same shape and dtype allocated on every rank)."""
        return tensor

    def gather_rows(self, tensor: torch.Tensor, n: int) -> torch.Tensor | None:
        """Rank 0: the rows of every rank's shard [n_k, ...] concatenated in rank order [n, ...]; others None."""
        return tensor

    def all_gather_rows(self, tensor: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank: the concatenated rows [n, ...] of every rank's shard [n_k, ...]."""
        return tensor

    def all_reduce_grads(self, params) -> None:
        """Sum the .grad of the given parameters over ranks (one flat buffer)."""

    def all_reduce_shared_grads(self, shared, params) -> None:
        """Sum the .grad of the `shared` parameters over ranks after a backward pass over `params` (a rank whose
        part of a minibatch is empty leaves some .grad None: they become zeros, as in one process)."""

    def rows_of_shard(self, idx: torch.Tensor, lo: int, n_local: int) -> torch.Tensor:
        """Global expert indices idx [k] -> the local indices of those in this rank's shard [lo, lo + n_local)."""
        return idx

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class LocalComm(Comm):
    """One process owns every expert."""


LOCAL = LocalComm()

_OPS = {"sum": "SUM", "max": "MAX"}


class DistComm(Comm):
    """torch.distributed process group (already initialised); collectives run on `device` (cuda for NCCL)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
        self.traffic = {"calls": 0, "bytes": 0, "seconds": 0.0}                 # this rank's collectives

    def _run(self, call, tensor: torch.Tensor, **kwargs) -> None:
        t0 = time.perf_counter()
        call(tensor, **kwargs)
        self.traffic["calls"] += 1
        self.traffic["bytes"] += tensor.numel() * tensor.element_size()
        self.traffic["seconds"] += time.perf_counter() - t0

    def _op(self, op: str):
        return getattr(self.dist.ReduceOp, _OPS[op])

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        buf = tensor.detach().contiguous().to(self.device)
        self._run(self.dist.all_reduce, buf, op=self._op(op))
        if buf.data_ptr() != tensor.data_ptr():
            tensor.copy_(buf)
        return tensor

    def all_reduce_float(self, value: float, op: str = "sum") -> float:
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64), op)[0])

    def total(self, n: int) -> int:
        return int(self.all_reduce(torch.tensor([n], dtype=torch.int64))[0])

    def largest(self, n: int) -> int:
        return int(self.all_reduce(torch.tensor([n], dtype=torch.int64), "max")[0])

    def mean_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(x.sum(0)) / self.total(x.shape[0])

    def _histogram(self, sizes: torch.Tensor, m: int) -> torch.Tensor:
        hist = torch.bincount(sizes.reshape(-1).long().cpu(), minlength=m + 1)[: m + 1]
        return self.all_reduce(hist)                                          # [m + 1] counts over all ranks

    def support_stats(self, sizes: torch.Tensor, m: int) -> tuple[float, float, int]:
        hist = self._histogram(sizes, m)
        values = torch.arange(m + 1)
        count = int(hist.sum())
        median = int((hist.cumsum(0) > (count - 1) // 2).nonzero()[0])
        return float(median), float((hist * values).sum()) / count, int(values[hist > 0].max())

    def median(self, sizes: torch.Tensor, m: int) -> float:
        return self.support_stats(sizes, m)[0]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        buf = tensor.contiguous().to(self.device)
        self._run(self.dist.broadcast, buf, src=src)
        if buf.data_ptr() != tensor.data_ptr():
            tensor.copy_(buf)
        return tensor

    def gather_rows(self, tensor: torch.Tensor, n: int) -> torch.Tensor | None:
        counts = self.counts(n)
        if self.rank != 0:
            self._run(self.dist.send, tensor.contiguous().to(self.device), dst=0)
            return None
        out = torch.empty((n, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        out[: counts[0]] = tensor
        offset = counts[0]
        for k in range(1, self.world):
            buf = torch.empty((counts[k], *tensor.shape[1:]), dtype=tensor.dtype, device=self.device)
            self._run(self.dist.recv, buf, src=k)
            out[offset:offset + counts[k]] = buf
            offset += counts[k]
        return out

    def all_gather_rows(self, tensor: torch.Tensor, n: int) -> torch.Tensor:
        counts = self.counts(n)
        rows = max(counts)
        pad = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=self.device)
        pad[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        self._run(lambda t: self.dist.all_gather(parts, t), pad)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(tensor.device)

    def all_reduce_grads(self, params) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = self.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_reduce_shared_grads(self, shared, params) -> None:
        for param in params:
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
        self.all_reduce_grads(shared)

    def rows_of_shard(self, idx: torch.Tensor, lo: int, n_local: int) -> torch.Tensor:
        return idx[(idx >= lo) & (idx < lo + n_local)] - lo

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then destroy the process group."""
        self.dist.barrier()
        self.dist.destroy_process_group()


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_comm(device: torch.device | str = "cpu", force: bool = False, backend: str | None = None) -> Comm:
    """DistComm when started by torchrun with WORLD_SIZE > 1 (or `force`), else LOCAL.

    Initialises the default process group if needed: NCCL for a CUDA device (one GPU per rank, cuda:LOCAL_RANK),
    gloo otherwise, or the given backend (gloo with CUDA tensors works too: collectives then go through the CPU).
    MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE come from the environment (torchrun sets them).
    """
    if env_world_size() <= 1 and not force and not dist.is_initialized():
        return LOCAL
    device = torch.device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    comm = DistComm(device)
    log.debug("rank %d of %d (%s)", comm.rank, comm.world, dist.get_backend())
    return comm


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_rank(rank: int, world: int, port: int, threads: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    comm = init_comm("cpu", force=True, backend="gloo")
    try:
        fn(comm, *args)
    finally:
        dist.destroy_process_group()


def run_local(fn, world: int, *args, threads: int = 1) -> None:
    """fn(comm, *args) on `world` spawned processes of this machine joined by gloo (`threads` CPU threads each).

    fn must be importable (a module-level function). gloo also carries CUDA work (through the CPU), so the
    processes may share one GPU. Raises if any process fails."""
    torch.multiprocessing.spawn(_local_rank, args=(world, free_port(), threads, fn, args), nprocs=world, join=True)
