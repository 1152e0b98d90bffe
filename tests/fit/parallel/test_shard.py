"""ExpertShard in one process: the whole family, pass-through collectives, the global relative error."""
from __future__ import annotations

import pytest
import torch

from globe.errors import ConfigError
from globe.fit.config import FitConfig
from globe.fit.parallel.comm import LOCAL
from globe.fit.solvers.normalize import Normalizer
from globe.fit.objectives.activation import ActivationObjective, Whitener
from globe.fit.parallel.shard import ExpertShard


def test_a_single_process_shard_holds_every_expert():
    shard = ExpertShard.of(10)
    assert (shard.n, shard.lo, shard.hi, shard.distributed, shard.is_main) == (10, 0, 10, False, True)
    assert shard.from_main((3, 4)) == (3, 4)
    idx = torch.tensor([1, 5, 9])
    assert torch.equal(LOCAL.rows_of_shard(idx, 0, 10), idx)
    shard.check(FitConfig(), resumable=True)                                  # all allowed in one process
    ActivationObjective(Whitener(torch.eye(2)[None], torch.zeros(1, dtype=torch.long), torch.ones(1))).check_world(1)


def test_rel_err_is_the_global_relative_error():
    w = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(0))
    norm = Normalizer.fit(w)
    sq_err = 0.25 * norm.sq_norms
    assert ExpertShard.of(6).rel_err(sq_err, norm) == pytest.approx(0.5)


class _TwoRanks(type(LOCAL)):
    rank, world = 0, 2


def test_distributed_refusals_name_what_is_not_supported():
    with pytest.raises(ConfigError, match="checkpoints within a family"):
        ExpertShard(_TwoRanks(), 8, 0, 4).check(FitConfig(), resumable=True)
    with pytest.raises(ConfigError, match="activation-aware"):
        ActivationObjective(Whitener(torch.eye(2)[None], torch.zeros(1, dtype=torch.long), torch.ones(1))).check_world(2)
    with pytest.raises(ConfigError, match="cannot be shared"):
        ExpertShard(_TwoRanks(), 1, 0, 1).check(FitConfig(), resumable=False)
