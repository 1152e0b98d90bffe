"""Resuming a family fit from any checkpoint it reported gives the uninterrupted result, bit for bit."""
from __future__ import annotations

import pytest
import torch

from globe.fit.engine import fit_family
from globe.fit.resume import FitProgress
from tests.fit.engine.test_family import planted_config
from tests.helpers.planted import make_planted


def _config():
    cfg = planted_config(init="hybrid", support=2, restarts=2, cycles=2, checkpoint_every=2, refine_steps=4)
    cfg.train.am_iters, cfg.train.varpro_steps, cfg.train.tol = 5, 6, 2e-2
    return cfg


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("bank", "codes", "adapters", "scales"))


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted fit and every progress it reported, each through a serialisation round trip."""
    planted = make_planted(n=40, seed=5)
    snapshots: list[FitProgress] = []
    save = (lambda prog: snapshots.append(FitProgress.from_tensors(*prog.to_tensors())))
    fam = fit_family(planted.weights, planted.ids, _config(), "gate", torch.Generator().manual_seed(7),
                     on_progress=save)
    return planted, fam, snapshots


def test_checkpoints_cover_every_phase_of_every_restart(reference):
    _, _, snapshots = reference
    seen = {(s.attempt, s.cycle, s.phase) for s in snapshots}
    for attempt in range(2):
        assert (attempt, 0, "varpro") in seen and (attempt, 1, "cycle_start") in seen
    assert (2, 0, "done") in seen
    mid_am = [s for s in snapshots if s.phase == "am"]
    assert mid_am and all(s.state.iteration % 2 == 0 for s in mid_am)


def test_resume_from_every_checkpoint_is_bit_identical(reference):
    planted, fam, snapshots = reference
    for snap in snapshots:
        resumed = fit_family(planted.weights, planted.ids, _config(), "gate", torch.Generator().manual_seed(7),
                             resume=FitProgress.from_tensors(*snap.to_tensors()))
        assert _same(resumed, fam), (snap.attempt, snap.cycle, snap.phase)
        assert resumed.metrics["rel_err"] == fam.metrics["rel_err"]
        untimed = (lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist])
        assert untimed(resumed.history["am"]) == untimed(fam.history["am"])
        assert resumed.history["refine"] == fam.history["refine"]          # same minibatches: generator restored


def test_a_wrong_generator_state_changes_the_result(reference):
    """The generator state is part of the checkpoint: in the last restart the warm starts are not redrawn, and
    the Adam refinement that follows draws its minibatches from the stored state."""
    planted, fam, snapshots = reference
    last = next(s for s in snapshots if s.attempt == 1 and s.phase == "varpro")
    prog = FitProgress.from_tensors(*last.to_tensors())
    prog.gen_state = torch.Generator().manual_seed(123).get_state()
    resumed = fit_family(planted.weights, planted.ids, _config(), "gate", torch.Generator().manual_seed(7),
                         resume=prog)
    assert resumed.history["refine"] != fam.history["refine"]            # other minibatches were drawn


def test_a_checkpoint_of_another_format_is_reported_and_ignored(reference, tmp_path, caplog):
    """An older on-disk resume format (phase strings, no format tag) is refused by from_tensors and skipped, with a
    warning, by the store: the family is refitted instead of crashing."""
    import json
    import logging

    from safetensors.torch import save_file

    from globe.run.resume_store import RESUME_DIR as CHECKPOINT_DIR, ResumeStore as CheckpointStore  # noqa: E501
    from globe.fit.config import FitConfig
    _, _, snapshots = reference
    tensors, meta = snapshots[-1].to_tensors()
    info = json.loads(meta["progress"])
    old = {"attempt": info["cursor"][0], "cycle": info["cursor"][1], "phase": info["cursor"][2],
           **{k: v for k, v in info.items() if k not in ("format", "cursor")}}
    with pytest.raises(ValueError, match="resume format"):
        FitProgress.from_tensors(tensors, {"progress": json.dumps(old)})
    store = CheckpointStore(tmp_path, FitConfig(), "model")
    (tmp_path / CHECKPOINT_DIR).mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / CHECKPOINT_DIR / "gate.progress.safetensors"),
              metadata={"progress": json.dumps(old), "fingerprint": store.fingerprint})
    with caplog.at_level(logging.WARNING):
        assert store.progress("gate") is None
    assert "ignoring inconsistent resume file" in caplog.text
