"""The restart runner: stages follow the documented cursor table and checkpoints land between them."""
from __future__ import annotations

import torch

from globe.fit.engine import fit_family
from tests.fit.engine.test_family import planted_config
from tests.helpers.planted import make_planted


def test_cursor_walks_the_stage_table():
    planted = make_planted(n=24, seed=1)
    cfg = planted_config(support=2, restarts=2, cycles=2, checkpoint_every=0)
    cfg.train.am_iters, cfg.train.varpro_steps = 2, 2
    seen = []
    fit_family(planted.weights, planted.ids, cfg, "gate", torch.Generator().manual_seed(0),
               on_progress=lambda prog: seen.append((prog.cursor.restart, prog.cursor.cycle, prog.cursor.stage)))
    per_restart = [[(k, 0, "varpro"), (k, 1, "cycle_start"), (k, 1, "varpro"), (k, 2, "cycle_start")] for k in (0, 1)]
    assert seen == per_restart[0] + [(1, 0, "warm_start")] + per_restart[1] + [(2, 0, "done")]
