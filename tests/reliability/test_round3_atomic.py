"""Round three, class 4: an export is one atomic step. A compressed export over an existing output (here a dense
one) is killed (os._exit) at every rename it makes, in turn: afterwards the output is exactly the old one or
exactly the new one (once the next run, or reader, has renamed a set-aside old output back), and the next run
gives the uninterrupted result and leaves no staging or set-aside directory behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import globe
from globe.core import outputs
from tests.helpers.fits import quick_fit
from tests.helpers.subproc import subprocess_env
from tests.reliability.round3 import Round3, snapshot

RUNNER = """
import os, sys
count, kill_at = [0], int(sys.argv[1])
def wrap(real):
    def call(*a, **k):
        count[0] += 1
        if count[0] == kill_at:
            os._exit(9)
        return real(*a, **k)
    return call
os.rename, os.replace = wrap(os.rename), wrap(os.replace)
from globe.cli.main import main
code = main(sys.argv[2:])
print("RENAMES", count[0])
sys.exit(code)
"""


def _run(kill_at: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, str(kill_at), "--log-level", "ERROR", *argv],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


def _state(out: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(out).items() if not k.endswith(outputs.LOCK_NAME)}


def test_kill_at_every_rename_of_the_export(tmp_path, round3_base):
    env = Round3.build(tmp_path, round3_base)
    art = tmp_path / "art"
    globe.save(quick_fit(round3_base / "model"), art)
    out, ref = tmp_path / "out", tmp_path / "ref"
    export = ["export", str(art), "--model", str(env.model)]
    assert _run(0, *export, "-o", str(out), "--dense").returncode == 0
    (out / "notes.txt").write_text("the user's own file")
    old = _state(out)
    done = _run(0, *export, "-o", str(ref))
    assert done.returncode == 0, done.stderr
    renames = int(done.stdout.split("RENAMES")[-1])
    assert renames >= 2
    new = {**_state(ref), "notes.txt": old["notes.txt"]}
    for k in range(1, renames + 1):
        proc = _run(k, *export, "-o", str(out), "--overwrite")
        assert proc.returncode == 9, (k, proc.stderr)
        outputs.recover_swap(out)                    # what the next run (or reader) does first
        state = _state(out)
        assert state in (old, new), (k, sorted(set(state) ^ set(old)))
        if state == new:                             # killed after the swap: start again from the old one
            break
    rerun = _run(0, *export, "-o", str(out), "--overwrite")
    assert rerun.returncode == 0, rerun.stderr
    assert _state(out) == new
    debris = [p.name for p in tmp_path.iterdir() if outputs.SWAP_STAGING in p.name or outputs.SWAP_OLD in p.name]
    assert debris == []


def test_kill_between_the_two_renames_keeps_the_old_output(tmp_path, round3_base):
    env = Round3.build(tmp_path, round3_base)
    art = tmp_path / "art"
    globe.save(quick_fit(round3_base / "model"), art)
    out = tmp_path / "out"
    export = ["export", str(art), "--model", str(env.model)]
    assert _run(0, *export, "-o", str(out), "--dense").returncode == 0
    old = _state(out)
    total = int(_run(0, *export, "-o", str(tmp_path / "ref")).stdout.split("RENAMES")[-1])
    proc = _run(total, *export, "-o", str(out), "--overwrite")      # the last rename: staging -> OUT
    assert proc.returncode == 9
    assert not out.exists() and outputs.swap_siblings(out, outputs.SWAP_OLD)
    assert outputs.recover_swap(out)
    assert _state(out) == old
