"""globe.tracking: JSONL sink, no-op without a session, wandb never imported (nor any socket opened) when disabled."""
from __future__ import annotations

import os
import socket
import sys
import types
from pathlib import Path

import pytest

from globe import tracking
from globe.cli.main import main
from globe.errors import ConfigError

FIT = ["--m", "4", "--r", "4", "--target-support", "2", "--am-iters", "3", "--varpro-steps", "5"]


def test_jsonl_sink_writes_one_object_per_emit(tmp_path):
    path = tmp_path / "m.jsonl"
    tracking.emit("ignored", x=1)                                  # no session: nothing recorded anywhere
    with tracking.session(jsonl=path):
        tracking.emit("step", loss=0.5, values=[1, 2], nan=float("nan"))
        tracking.emit("done", ok=True)
    assert not tracking.active()
    records = tracking.read_jsonl(path)
    assert [r["event"] for r in records] == ["step", "done"]
    assert records[0]["loss"] == 0.5 and records[0]["values"] == [1, 2] and records[0]["nan"] is None
    assert records[0]["time"] <= records[1]["time"]
    with pytest.raises(ConfigError, match="wandb mode"):
        with tracking.session(wandb_mode="sometimes"):
            pass


class _NoNetwork(Exception):
    pass


def _forbid_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise _NoNetwork(f"network attempt: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_fit_with_wandb_disabled_imports_nothing_and_opens_no_socket(tiny_checkpoint, tmp_path, monkeypatch):
    _forbid_network(monkeypatch)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    out = tmp_path / "out"
    assert main(["fit", str(tiny_checkpoint("qwen2_moe")), "-o", str(out), *FIT, "--wandb", "disabled"]) == 0
    assert "wandb" not in sys.modules
    records = tracking.read_jsonl(out / "metrics.jsonl")
    am = [r for r in records if r["event"] == "am_iter"]
    assert {r["family"] for r in am} == {"gate", "up"} and len(am) == 6
    done = {r["family"]: r for r in records if r["event"] == "family_done"}
    assert set(done) == {"gate", "up"} and 0 < done["gate"]["rel_err"] < 1
    assert any(r["event"] == "varpro" for r in records)


def _fake_wandb(monkeypatch):
    """A wandb module that records init kwargs and logged rows and, like wandb, makes DIR/wandb at init
    (DIR: the dir argument, else $WANDB_DIR, else the current directory)."""
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data):
            calls["log"].append(data)

        def finish(self):
            calls["finish"] += 1

    def init(**kw):
        calls["init"].append(kw)
        (Path(kw.get("dir") or os.environ.get("WANDB_DIR") or Path.cwd()) / "wandb").mkdir(parents=True)
        return Run()

    fake = types.ModuleType("wandb")
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return calls


def test_wandb_offline_logs_the_same_metrics(tiny_checkpoint, tmp_path, monkeypatch):
    model = tiny_checkpoint("qwen2_moe")                   # before the fake: accelerate probes wandb's spec
    calls = _fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    out = tmp_path / "out"
    assert main(["fit", str(model), "-o", str(out), *FIT, "--wandb", "offline",
                 "--wandb-project", "proj"]) == 0
    assert len(calls["init"]) == 1 and calls["finish"] == 1
    init = calls["init"][0]
    assert init["mode"] == "offline" and init["project"] == "proj" and init["config"]["bank"]["m"] == 4
    logged = [k for row in calls["log"] for k in row]
    for family in ("gate", "up"):                          # one series per family, not one zigzag of both
        assert f"{family}/family_done/rel_err" in logged and f"{family}/varpro/rel_err" in logged
        assert len([r for r in calls["log"] if f"{family}/am_iter/rel_err" in r]) == 3
    assert not any(k.startswith("am_iter/") or k.startswith("family_done/") for k in logged)
    records = tracking.read_jsonl(out / "metrics.jsonl")   # the JSONL records keep their plain event names
    assert len([r for r in records if r["event"] == "am_iter"]) == 6
    assert (tmp_path / "wandb_home" / "wandb").is_dir()    # run files in $WANDB_DIR, none in the artifact
    assert not (out / "wandb").exists()


def test_wandb_without_wandb_dir_writes_to_the_current_directory(tiny_checkpoint, tmp_path, monkeypatch):
    model = tiny_checkpoint("qwen2_moe")
    calls = _fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "out"
    assert main(["fit", str(model), "-o", str(out), *FIT, "--wandb", "offline"]) == 0
    assert calls["finish"] == 1 and (tmp_path / "wandb").is_dir()
    assert not (out / "wandb").exists() and (out / "metrics.jsonl").is_file()


def test_wandb_keys_prefix_the_family_only_when_there_is_one():
    assert tracking.wandb_key({"event": "am_iter", "family": "up"}, "rel_err") == "up/am_iter/rel_err"
    assert tracking.wandb_key({"event": "eval", "loss": 1.0}, "loss") == "eval/loss"


def test_wandb_missing_is_a_clear_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)                # import wandb -> ImportError
    assert main(["fit", str(tiny_checkpoint("qwen2_moe")), "-o", str(tmp_path / "o"), *FIT,
                 "--wandb", "online"]) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_jsonl_sink_replaces_its_file_in_one_rename(tmp_path):
    """Records go to a temporary file beside the log, renamed over it on close: until then (a killed run) the old
    log is untouched; append starts from its records; a rename that fails leaves no temporary file."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"time": 0, "event": "old"}')                 # no final newline
    sink = tracking.JsonlSink(path, append=True)
    sink.write({"time": 1, "event": "new"})
    assert path.read_text() == '{"time": 0, "event": "old"}'       # a kill now leaves the old log whole
    sink.close()
    assert [r["event"] for r in tracking.read_jsonl(path)] == ["old", "new"]
    sink = tracking.JsonlSink(path, append=False)
    sink.write({"time": 2, "event": "only"})
    sink.close()
    assert [r["event"] for r in tracking.read_jsonl(path)] == ["only"]
    sink = tracking.JsonlSink(tmp_path / "ro" / "m.jsonl", append=False)
    sink.write({"time": 3, "event": "x"})
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):                     # root ignores the mode
            pytest.skip("directory permissions are not enforced for this user")
        with pytest.raises(OSError):
            sink.close()
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_a_session_whose_log_cannot_be_written_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"

    def no_space(src, dst):
        raise OSError(28, "No space left on device", str(dst))
    with pytest.raises(OSError, match="No space"):
        with tracking.session(jsonl=path):
            tracking.emit("step", loss=1.0)
            monkeypatch.setattr(os, "replace", no_space)
    monkeypatch.undo()
    assert not path.exists() and list(tmp_path.iterdir()) == []      # no temporary file left


def test_attached_sink_gets_records_only_inside_its_block():
    class Listener:
        def __init__(self):
            self.records = []

        def write(self, record):
            self.records.append(record)

        def close(self):
            raise AssertionError("attached never closes its sink")

    listener = Listener()
    with tracking.attached(listener):
        tracking.emit("am_iter", family="gate", iteration=0)
    tracking.emit("am_iter", family="gate", iteration=1)
    assert [(r["event"], r["iteration"]) for r in listener.records] == [("am_iter", 0)]
