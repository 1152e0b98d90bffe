"""Round three, class 4 (continued): the dense export (`globe export --dense`, `globe compress --dense`) and a GloBE
model's `save_pretrained` are one atomic step too. Each writes over an existing output holding the user's own file,
and is killed (os._exit) at every rename that touches the output, in turn: afterwards (once a set-aside old output
is renamed back, as the next run or reader does) the output is exactly the old one or exactly the new one, never a
mix, the user's file is kept, and an uninterrupted run then leaves no staging or set-aside directory behind.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import globe
from globe.core import outputs
from tests.helpers.fits import quick_fit
from tests.helpers.subproc import subprocess_env
from tests.reliability.battery import QUICK
from tests.reliability.round3 import Round3, snapshot

# argv: KILL_AT WATCH cli ARGV...   or   KILL_AT WATCH save COMPRESSED_DIR OUT
# Renames (os.rename / os.replace) whose source or destination contains WATCH are counted; the KILL_AT-th kills.
RUNNER = """
import os, sys
count, kill_at, watch = [0], int(sys.argv[1]), sys.argv[2]
def wrap(real):
    def call(src, dst, *a, **k):
        if watch in os.fspath(src) or watch in os.fspath(dst):
            count[0] += 1
            if count[0] == kill_at:
                os._exit(9)
        return real(src, dst, *a, **k)
    return call
def arm():
    os.rename, os.replace = wrap(os.rename), wrap(os.replace)
if sys.argv[3] == "cli":
    arm()
    from globe.cli.main import main
    code = main(["--log-level", "ERROR", *sys.argv[4:]])
else:
    import globe, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[4])
    arm()
    model.save_pretrained(sys.argv[5])
    code = 0
print("RENAMES", count[0])
sys.exit(code)
"""


def _run(kill_at: int, watch: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, str(kill_at), watch, *argv], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


def _state(out: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(out).items() if not k.endswith(outputs.LOCK_NAME)}


def _debris(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if outputs.SWAP_STAGING in p.name or outputs.SWAP_OLD in p.name]


def _kill_at_every_rename(out: Path, command: list[str], new: dict[str, str]) -> int:
    """Run `command` (RUNNER argv after KILL_AT WATCH) killed at rename 1, 2, ...: each time `out` is its old state
    or `new`; returns how many kills were checked. The old state is out's state now."""
    old = _state(out)
    assert old != new
    k = 0
    while True:
        k += 1
        proc = _run(k, out.name, *command)
        if proc.returncode == 0:                     # fewer renames than k: the run finished
            assert _state(out) == new
            return k - 1
        assert proc.returncode == 9, (k, proc.stderr[-2000:])
        outputs.recover_swap(out)                    # what the next run (or reader) does first
        state = _state(out)
        assert state in (old, new), (k, sorted(set(state) ^ set(old)), sorted(set(state) ^ set(new)))
        if state == new:                             # killed after the swap: the rest is clean-up
            shutil.rmtree(out)
            shutil.copytree(out.parent / "old-copy", out)   # start again from the old output


def _prepare(out: Path, fill) -> None:
    fill(out)
    (out / "notes.txt").write_text("the user's own file")
    shutil.copytree(out, out.parent / "old-copy")


def test_dense_export_killed_at_every_rename(tmp_path, round3_base):
    env = Round3.build(tmp_path, round3_base)
    art = tmp_path / "art"
    globe.save(quick_fit(round3_base / "model"), art)
    export = ["export", str(art), "--model", str(env.model)]
    out, ref = tmp_path / "hfdense", tmp_path / "ref"
    _prepare(out, lambda o: _run(0, "-", "cli", *export, "-o", str(o)))          # old: the compressed export
    assert _run(0, "-", "cli", *export, "-o", str(ref), "--dense").returncode == 0
    new = {**_state(ref), "notes.txt": _state(out)["notes.txt"]}
    kills = _kill_at_every_rename(out, ["cli", *export, "-o", str(out), "--dense", "--overwrite"], new)
    assert kills >= 2
    shutil.rmtree(out)
    shutil.copytree(tmp_path / "old-copy", out)
    assert _run(0, "-", "cli", *export, "-o", str(out), "--dense", "--overwrite").returncode == 0
    assert _state(out) == new and _debris(tmp_path) == []


@pytest.mark.slow
def test_compress_dense_killed_at_every_rename_of_the_dense_export(tmp_path, round3_base):
    env = Round3.build(tmp_path, round3_base)
    out = tmp_path / "densecopy"
    compress = ["compress", str(env.model), *QUICK, "--no-calibration", "--dense", "--overwrite"]
    art = tmp_path / "art"
    globe.save(quick_fit(round3_base / "model"), art)
    _prepare(out, lambda o: _run(0, "-", "cli", "export", str(art), "--model", str(env.model), "-o", str(o),
                                 "--dense"))                                   # old: another fit's dense export
    ref = tmp_path / "refdense"
    assert _run(0, "-", "cli", *compress, "-o", str(tmp_path / "ref"), "--dense-out", str(ref)).returncode == 0
    new = {**_state(ref), "notes.txt": _state(out)["notes.txt"]}
    kills = _kill_at_every_rename(out, ["cli", *compress, "-o", str(tmp_path / "c"), "--dense-out", str(out)], new)
    assert kills >= 2 and _debris(tmp_path) == []


def test_save_pretrained_killed_at_every_rename(tmp_path, round3_base):
    env = Round3.build(tmp_path, round3_base)
    out, ref = tmp_path / "saved", tmp_path / "ref"
    _prepare(out, lambda o: shutil.copytree(env.model, o))                    # old: a plain checkpoint
    assert _run(0, "-", "save", str(env.comp), str(ref)).returncode == 0
    new = {**_state(ref), "notes.txt": _state(out)["notes.txt"]}
    assert "globe_config.json" in new and "model.safetensors" in new
    kills = _kill_at_every_rename(out, ["save", str(env.comp), str(out)], new)
    assert kills >= 2
    shutil.rmtree(out)
    shutil.copytree(tmp_path / "old-copy", out)
    assert _run(0, "-", "save", str(env.comp), str(out)).returncode == 0
    assert _state(out) == new and _debris(tmp_path) == []
    assert globe.load_compressed(out) is not None


def test_save_pretrained_into_its_own_directory_keeps_it_loadable(tmp_path, round3_base):
    """The directory a model was loaded from, replaced by its own save: the staged write reads the loaded tensors
    before the old files are set aside."""
    import transformers
    env = Round3.build(tmp_path, round3_base)
    model = transformers.AutoModelForCausalLM.from_pretrained(env.comp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(env.comp)
    again = transformers.AutoModelForCausalLM.from_pretrained(env.comp)
    assert all(bool((again.state_dict()[k] == v).all()) for k, v in before.items())
    assert _debris(tmp_path) == []
