"""fit_model: a checkpoint streamed family by family through fit_family (globe.fit.engine.family), with the
resume store, the objective each family is fitted under and the spilling of large finished families."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from globe.core.result import FamilyFit, FitResult
from globe.fit.config import FitConfig
from globe.fit.constants import SPILL_FAMILY_BYTES
from globe.fit.engine.family import fit_family
from globe.fit.objectives.base import objective_class
from globe.fit.parallel.comm import LOCAL, Comm
from globe.fit.parallel.shard import read_shard
from globe.fit.resume import FitStore
from globe.io import open_checkpoint

log = logging.getLogger(__name__)


def result_bytes(fam: FamilyFit) -> int:
    """Bytes a finished family's tensors hold in memory."""
    return sum(t.numel() * t.element_size() for t in (fam.bank, fam.codes, fam.adapters, fam.scales))


def fit_model(model_dir: str | Path, cfg: FitConfig | None = None, store: FitStore | None = None,
              comm: Comm = LOCAL) -> FitResult | None:
    """Fit every configured family of the checkpoint in model_dir (see globe.io for supported layouts).

    Family k is seeded with cfg.train.seed + k. With a store (globe.run.resume_store.ResumeStore), finished
    families are taken from it, a family in progress continues from its last checkpoint, and new progress and
    families are saved to it: a resumed run's result equals an uninterrupted one's, bit for bit.
    Distributed (comm from globe.fit.parallel.comm.init_comm; no store): each rank reads and fits its slice of the
    experts; rank 0 returns the FitResult, the other ranks return None.
    """
    cfg = (cfg or FitConfig()).validate()
    families: dict[str, FamilyFit] = {}
    t0 = time.perf_counter()
    kind = objective_class(cfg)
    with open_checkpoint(model_dir) as reader:
        inventory = reader.inventory()
        cfg.check_dims(len(inventory.moe_layers) * inventory.num_experts, inventory.p, inventory.d)
        data = kind.load(cfg, inventory)                    # e.g. the calibration statistics, read once
        content = reader.content_hash()
        for k, family in enumerate(cfg.bank.families):
            fam = store.finished(family) if store is not None else None
            if fam is not None:
                log.info("%s: taken from checkpoint", family)
                families[family] = fam
                continue
            stack = read_shard(reader, family, comm)        # one process: lazy, experts read chunk by chunk
            gen = torch.Generator().manual_seed(cfg.train.seed + k)
            resume = store.progress(family) if store is not None else None
            save = (lambda prog, f=family: store.save_progress(f, prog)) if store is not None else None
            objective = kind.for_family(data, family, stack, cfg)
            families[family] = fit_family(stack.weights, stack.ids, cfg, family, gen, resume, save, comm, objective)
            del stack
            if store is not None and families[family] is not None:
                store.save_family(families[family])
                if k + 1 < len(cfg.bank.families) and result_bytes(families[family]) >= SPILL_FAMILY_BYTES:
                    log.info("%s: result kept on disk until the last family is fitted", family)
                    families[family] = None                 # spilled: read back below
    if not comm.is_main:
        return None
    families = {f: fam if fam is not None else store.reload(f) for f, fam in families.items()}
    source = {"model_dir": str(Path(model_dir).resolve()), "model_type": inventory.model_type,
              "content_hash": content, "inventory": inventory.to_dict()}
    return FitResult(families={f: families[f] for f in cfg.bank.families}, config=cfg, source=source,
                     timings={"total_seconds": round(time.perf_counter() - t0, 3)})
