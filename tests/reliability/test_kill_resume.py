"""kill -9 during `globe fit` at random moments, then `--resume`: the artifact equals an uninterrupted run's.

Each interrupted run is killed at a random delay (0-0.8 s) after it writes its first checkpoint (so kills land in AM
iterations, in variable projection, between families and during checkpoint writes); after every kill the
checkpoint directory must hold only complete, readable files, and an artifact on disk either loads or is refused.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

import globe
from globe.errors import ArtifactError
from globe.run.resume_store import RESUME_DIR as CHECKPOINT_DIR

ARGS = ["--m", "16", "--r", "16", "--target-support", "4", "--am-iters", "8", "--varpro-steps", "15",
        "--checkpoint-every", "1", "--families", "gate,up"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _fit(out: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "globe.cli.main", "--log-level", "INFO", "fit", "-o", str(out), *ARGS, *extra]
    with open(log, "a") as fh:                           # a file, not a pipe: a full pipe would block the fit
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=fh)


def _kill_after_a_new_checkpoint(proc: subprocess.Popen, ckpt: Path, delay: float, since: float) -> bool:
    """SIGKILL proc `delay` s after it wrote a checkpoint (a file newer than `since`, so a resumed run is not
    killed while it is still starting up); False if it finished first."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if ckpt.is_dir() and any(p.stat().st_mtime > since for p in ckpt.glob("*.safetensors")):
            break
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _assert_checkpoints_complete(ckpt: Path) -> None:
    for path in ckpt.glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:               # raises on a torn file
            for key in fh.keys():
                fh.get_tensor(key)


def test_kill_9_then_resume_gives_the_uninterrupted_artifact(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    log = tmp_path / "stderr.log"
    proc = _fit(ref, tmp_path / "ref.log")
    assert proc.wait() == 0, (tmp_path / "ref.log").read_text()
    reference = globe.load(ref)

    rng = random.Random(0)
    kills, finished = 0, False
    for attempt in range(4):
        since = time.time()
        proc = _fit(out, log, *(["--resume"] if attempt else []))
        if not _kill_after_a_new_checkpoint(proc, out / CHECKPOINT_DIR, rng.uniform(0.0, 0.8), since):
            assert proc.returncode == 0, log.read_text()
            finished = True
            break
        kills += 1
        _assert_checkpoints_complete(out / CHECKPOINT_DIR)
        if (out / "banks.safetensors").exists():           # killed while or after the artifact was written
            try:
                globe.load(out)                            # complete: it must then be the final one
            except ArtifactError:
                pass                                       # torn pair: refused, never mixed
            else:
                if not (out / CHECKPOINT_DIR).exists():    # the fit had finished: --resume refuses a finished one
                    finished = True
                    break
    assert kills >= 2, "the fit finished before it could be interrupted twice"
    if not finished:
        proc = _fit(out, log, "--resume")
        assert proc.wait() == 0, log.read_text()
    text = log.read_text()
    resumed_runs = text.count("resuming at restart") + text.count("taken from checkpoint")
    assert resumed_runs >= kills                                           # every restart reused earlier work

    resumed = globe.load(out)
    for name, fam in reference.families.items():
        got = resumed.families[name]
        for key in ("bank", "codes", "adapters", "scales"):
            assert torch.equal(getattr(got, key), getattr(fam, key)), (name, key)
    assert not (out / CHECKPOINT_DIR).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
