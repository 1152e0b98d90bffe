"""globe.core.outputs: output rules (inputs never written, --overwrite, --resume), crash debris and the output lock."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from globe.errors import OutputError
from globe.core.outputs import (LOCK_NAME, check_not_an_input, check_output_dir, check_output_file, holder_alive,
                           is_within, lock_path, output_lock, process_start, remove_debris)


def test_is_within(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert is_within(tmp_path / "a" / "b", tmp_path / "a") and is_within(tmp_path / "a", tmp_path / "a")
    assert not is_within(tmp_path / "ab", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert is_within(tmp_path / "link" / "b" / "c", tmp_path / "a")     # symlinks followed


def test_inputs_are_never_outputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    text = tmp_path / "t.txt"
    text.write_text("x")
    for out in (model, model / "sub", model / "model.safetensors", text):
        with pytest.raises(OutputError, match="input"):
            check_not_an_input(out, [model, text, None, tmp_path / "absent"])
    check_not_an_input(tmp_path / "elsewhere", [model, text])


def test_output_dir_rules(tmp_path):
    out = tmp_path / "out"
    check_output_dir(out, overwrite=False)                   # created, empty: fine
    (out / LOCK_NAME).write_text("{}")
    (out / ".banks.safetensors.x1y2z3w4.tmp").write_bytes(b"")
    check_output_dir(out, overwrite=False)                   # lock and debris are not the user's files
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty.*--overwrite"):
        check_output_dir(out, overwrite=False)
    check_output_dir(out, overwrite=True)
    (out / "banks.safetensors").write_bytes(b"")
    with pytest.raises(OutputError, match="already holds an artifact"):
        check_output_dir(out, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_output_file_rules(tmp_path):
    out = tmp_path / "sub" / "stats.safetensors"
    check_output_file(out, overwrite=False)
    out.write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        check_output_file(out, overwrite=False)
    check_output_file(out, overwrite=True)
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path, overwrite=True)


def test_remove_debris_of_a_directory_and_of_a_file(tmp_path):
    out = tmp_path / "out"
    (out / ".globe_checkpoint").mkdir(parents=True)
    (out / ".globe-staging-abc").mkdir()
    (out / ".globe-staging-abc" / "model.safetensors").write_bytes(b"x")
    for name in (".banks.safetensors.1a2b3c4d.tmp", ".globe_checkpoint/.gate.safetensors.2a2b3c4d.tmp"):
        (out / name).write_bytes(b"x")
    (out / "keep.tmp").write_text("not ours: no leading dot")
    (out / ".hidden").write_text("not ours")
    (out / ".notes.tmp").write_text("not ours: no 8-character random part")
    assert sorted(remove_debris(out)) == sorted([".globe-staging-abc", ".banks.safetensors.1a2b3c4d.tmp",
                                                 ".gate.safetensors.2a2b3c4d.tmp"])
    assert sorted(p.name for p in out.iterdir()) == [".globe_checkpoint", ".hidden", ".notes.tmp", "keep.tmp"]
    stats = tmp_path / "stats.safetensors"
    (tmp_path / ".stats.safetensors.q9w8e7r6.tmp").write_bytes(b"x")
    (tmp_path / ".other.safetensors.q9w8e7r6.tmp").write_bytes(b"x")
    assert remove_debris(stats) == [".stats.safetensors.q9w8e7r6.tmp"]
    assert (tmp_path / ".other.safetensors.q9w8e7r6.tmp").exists()


def test_lock_is_exclusive_released_and_removed(tmp_path):
    with output_lock(tmp_path, "fit") as path:
        assert path == tmp_path / LOCK_NAME
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputError, match="in use by another `globe fit`"):
            with output_lock(tmp_path, "fit"):
                pass
    assert not path.exists()
    with output_lock(tmp_path, "fit"):                        # free again
        pass


def test_lock_of_a_file_output_is_a_sibling(tmp_path):
    assert lock_path(tmp_path / "stats.safetensors") == tmp_path / ".stats.safetensors.globe.lock"
    with output_lock(tmp_path / "stats.safetensors", "calibrate") as path:
        assert path.exists()
    assert not path.exists()


def test_holder_liveness(tmp_path):
    me = {"pid": os.getppid(), "host": socket.gethostname(), "start": process_start(os.getppid())}
    assert holder_alive(me)
    assert not holder_alive({**me, "start": (me["start"] or 0) + 1}) or me["start"] is None   # pid reused
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not holder_alive({**me, "pid": dead.pid})
    assert holder_alive({**me, "host": "another-host"})          # cannot be checked: respected
    assert not holder_alive({}) and not holder_alive({"pid": "x"})


def test_a_lock_file_naming_a_live_process_is_respected(tmp_path):
    """Where flock is not enforced (e.g. some network filesystems) the recorded holder still counts."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                   "start": process_start(os.getppid()), "command": "export"}))
    with pytest.raises(OutputError, match="`globe export`"):
        with output_lock(tmp_path, "fit"):
            pass
    assert (tmp_path / LOCK_NAME).exists()                     # not ours to remove


def test_outputs_of_one_command_apart(tmp_path):
    from globe.core.outputs import check_apart
    check_apart({"-o": tmp_path / "a", "--metrics": tmp_path / "b.jsonl", "--dense-out": None})
    with pytest.raises(OutputError, match="-o .* --metrics"):
        check_apart({"-o": tmp_path / "a", "--metrics": tmp_path / "a" / "m.jsonl"})
    check_apart({"--plots": tmp_path / "a", "--metrics": tmp_path / "a" / "m.jsonl"}, nested=False)
    with pytest.raises(OutputError, match="--plots .* --metrics"):
        check_apart({"--plots": tmp_path / "a", "--metrics": tmp_path / "a"}, nested=False)


def test_a_metrics_log_is_replaced_only_with_overwrite_and_appended_to_only_when_it_is_one(tmp_path):
    from globe.core.outputs import check_log_file, is_metrics_log
    log, notes = tmp_path / "m.jsonl", tmp_path / "notes.txt"
    log.write_text('{"time": 1, "event": "eval"}\n\n')
    notes.write_text("mine\n")
    assert is_metrics_log(log) and not is_metrics_log(notes) and not is_metrics_log(tmp_path / "none")
    check_log_file(tmp_path / "new" / "m.jsonl")                # a new file: fine, and nothing created yet
    assert not (tmp_path / "new").exists()
    check_log_file(log, append=True)
    check_log_file(notes, overwrite=True)
    for path, append, match in ((log, False, "--overwrite"), (notes, True, "not a globe metrics log"),
                                (tmp_path, True, "directory")):
        with pytest.raises(OutputError, match=match):
            check_log_file(path, append=append)


def test_files_an_output_directory_receives_need_overwrite(tmp_path):
    from globe.core.outputs import check_output_files
    (tmp_path / "b.png").write_bytes(b"old")
    (tmp_path / "mine.txt").write_text("mine")
    check_output_files(tmp_path, ["a.png"], overwrite=False, flag="--plots")
    check_output_files(tmp_path, ["a.png", "b.png"], overwrite=True, flag="--plots")
    with pytest.raises(OutputError, match="--plots .* b.png: pass --overwrite"):
        check_output_files(tmp_path, ["a.png", "b.png"], overwrite=False, flag="--plots")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_files(tmp_path / "mine.txt", ["a.png"], overwrite=True, flag="--plots")
