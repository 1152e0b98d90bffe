"""Fault-injection battery, part 3: kill -9 at random moments of fit, export (compressed and dense), calibrate and
compress.

After every kill, each output file present is complete (loads) and the previous output, if any, is intact; the
next run on that output succeeds, leaves no staging directory, temporary file or lock behind, and gives the same
result as an uninterrupted run. Kill moments are drawn uniformly over an uninterrupted run's duration (start-up,
reading, fitting, writing), with a fixed seed.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import globe
from globe.assets import DEFAULT_MODEL_DIR
from globe.calibration import load_stats
from tests.helpers.subproc import subprocess_env

FIT = ["--m", "16", "--r", "16", "--target-support", "4", "--am-iters", "6", "--varpro-steps", "10",
       "--checkpoint-every", "1"]
KILLS = 2


def _globe(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "globe.cli.main", "--log-level", "WARNING", *argv],
                            env=subprocess_env(MKL_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _timed(*argv: str) -> float:
    start = time.monotonic()
    proc = _globe(*argv)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return time.monotonic() - start


def _kill_at(argv: list[str], delay: float) -> bool:
    """Start `globe argv`, SIGKILL it after `delay` s; False if it ended first (then it must have succeeded)."""
    proc = _globe(*argv)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    assert proc.returncode == 0, proc.stderr.read()
    return False


def _debris(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".globe-staging-")
            or p.name.endswith(".globe.lock")]


def _complete_safetensors(root: Path) -> None:
    for path in root.rglob("*.safetensors"):
        if path.name.startswith("."):
            continue
        with safe_open(str(path), "pt") as fh:                    # raises on a torn file
            for key in fh.keys():
                fh.get_tensor(key)


def _same_artifact(a: Path, b: Path) -> None:
    x, y = globe.load(a), globe.load(b)
    for name, fam in x.families.items():
        for key in ("bank", "codes", "adapters", "scales"):
            assert torch.equal(getattr(fam, key), getattr(y.families[name], key)), (name, key)


def _delays(duration: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.3, 1.0) * duration for _ in range(KILLS)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted `globe fit` of FIT and its duration: the fit test's reference, the export tests' input."""
    art = tmp_path_factory.mktemp("kill") / "art"
    return art, _timed("fit", "-o", str(art), *FIT)


@pytest.mark.slow
def test_kill_9_during_fit_then_resume(tmp_path, artifact):
    ref, duration = artifact
    for i, delay in enumerate(_delays(duration, 1)):
        out = tmp_path / f"out{i}"
        killed = _kill_at(["fit", "-o", str(out), *FIT], delay)
        _complete_safetensors(out)
        finished = (out / "banks.safetensors").exists() and not (out / ".globe_checkpoint").exists()
        if killed and not finished:                  # (a run killed after its last step has nothing to resume)
            proc = _globe("fit", "-o", str(out), *FIT, "--resume")
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
        assert _debris(out) == [] and not (out / ".globe_checkpoint").exists()
        _same_artifact(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("dense", [False, True], ids=["compressed", "dense"])
def test_kill_9_during_export_then_rerun(tmp_path, artifact, dense):
    artifact = artifact[0]
    extra = ["--dense"] if dense else []
    ref = tmp_path / "ref"
    duration = _timed("export", str(artifact), "-o", str(ref), *extra)
    reference = {p.name: p.read_bytes() for p in ref.iterdir() if p.suffix == ".safetensors"}
    for i, delay in enumerate(_delays(duration, 2 + dense)):
        out = tmp_path / f"out{i}"
        if _kill_at(["export", str(artifact), "-o", str(out), *extra], delay) and out.exists():
            _complete_safetensors(out)
        proc = _globe("export", str(artifact), "-o", str(out), *extra, "--overwrite")
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert _debris(out) == []
        assert {name: (out / name).read_bytes() for name in reference} == reference
    # killed while replacing an earlier export: every file on disk stays complete
    _kill_at(["export", str(artifact), "-o", str(ref), *extra, "--overwrite"], _delays(duration, 9)[0])
    _complete_safetensors(ref)


@pytest.mark.slow
def test_kill_9_during_calibrate_then_rerun(tmp_path):
    text = DEFAULT_MODEL_DIR / "heldout.txt"
    argv = ["calibrate", "--text", str(text), "--max-tokens", "1024", "--window", "128"]
    ref = tmp_path / "ref.safetensors"
    duration = _timed(*argv, "-o", str(ref))
    reference = load_stats(ref)
    for i, delay in enumerate(_delays(duration, 4)):
        out = tmp_path / f"stats{i}.safetensors"
        if _kill_at([*argv, "-o", str(out)], delay) and out.exists():
            load_stats(out)                                   # present means complete
        proc = _globe(*argv, "-o", str(out), "--overwrite")
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert torch.equal(load_stats(out).hidden, reference.hidden)
        assert _debris(tmp_path) == []


@pytest.mark.slow
def test_kill_9_during_compress_then_rerun(tmp_path):
    """globe compress (fit + compressed export in one step) killed at random moments: what is on disk stays
    complete, and a rerun with --overwrite leaves no debris and writes the uninterrupted run's tensors."""
    # every stage of the default pipeline (self-generated calibration text, activation-aware fit, 4-bit factors,
    # export) on less text and fewer activation-aware steps than the defaults (8192 tokens, 100): each run, and so
    # each of the five, is a fraction of a default one, and the kills still fall anywhere in it (256 tokens: one
    # sampled sequence, the least the sampler makes)
    argv = ["compress", *[a for a in FIT if a not in ("--checkpoint-every", "1")], "--calibration-tokens", "256",
            "--activation-steps", "5", "--expert-steps", "0"]
    ref = tmp_path / "ref"
    duration = _timed(*argv, "-o", str(ref))
    reference = {p.name: p.read_bytes() for p in ref.iterdir() if p.suffix == ".safetensors"}
    assert reference
    for i, delay in enumerate(_delays(duration, 5)):
        out = tmp_path / f"out{i}"
        if _kill_at([*argv, "-o", str(out)], delay) and out.exists():
            _complete_safetensors(out)
        proc = _globe(*argv, "-o", str(out), "--overwrite")
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert _debris(out) == []
        assert {name: (out / name).read_bytes() for name in reference} == reference
