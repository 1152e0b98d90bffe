"""Atomic writes: a crash at any point of a write leaves the previous complete file (or the new one), never a
torn file or a stray temporary."""
from __future__ import annotations

import os

import pytest
import torch

import globe
from globe.core.files import atomic_write
from globe.run.resume_store import RESUME_DIR as CHECKPOINT_DIR, ResumeStore as CheckpointStore
from globe.fit.config import FitConfig
from tests.helpers.fits import quick_fit


class Crash(Exception):
    pass


def test_crash_inside_the_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old complete"))

    def torn(tmp):
        tmp.write_bytes(b"new but half")
        raise Crash
    with pytest.raises(Crash):
        atomic_write(path, torn)
    assert path.read_bytes() == b"old complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_crash_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old complete"))
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        atomic_write(path, lambda tmp: tmp.write_bytes(b"new complete"))
    assert path.read_bytes() == b"old complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_artifact_save_interrupted_between_files_leaves_a_loadable_previous_artifact(tiny_checkpoint, tmp_path,
                                                                                     monkeypatch):
    """banks.safetensors is written before globe_config.json; a crash in between must not make the old
    artifact unloadable in a way that goes unnoticed: the loader either reads a consistent pair or errors."""
    result = quick_fit(tiny_checkpoint("qwen2_moe"))
    globe.save(result, tmp_path / "art")
    real = os.replace
    renames = []

    def crash_on_second_rename(src, dst):                 # both files are renamed into place at the end
        renames.append(dst)
        if len(renames) == 2:
            raise Crash
        real(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_second_rename)          # what atomic_write_all renames with
    with pytest.raises(Crash):
        globe.save(result, tmp_path / "art")
    monkeypatch.setattr(os, "replace", real)
    loaded = globe.load(tmp_path / "art")
    assert torch.equal(loaded.families["gate"].bank, result.families["gate"].bank)
    assert not list((tmp_path / "art").glob(".*.tmp"))


def test_checkpoint_store_write_crash_keeps_the_previous_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    fam = quick_fit(tiny_checkpoint("qwen2_moe")).families["gate"]
    store = CheckpointStore(tmp_path, FitConfig(), "model")
    store.save_family(fam)
    import globe.formats.resume as checkpoint
    monkeypatch.setattr(checkpoint, "save_file", lambda tensors, path, metadata: (open(path, "wb").write(b"torn"),
                                                                                  (_ for _ in ()).throw(Crash())))
    with pytest.raises(Crash):
        store.save_family(fam)
    again = store.finished("gate")
    assert again is not None and torch.equal(again.bank, fam.bank)
    assert sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()) == ["gate.safetensors"]


def test_banks_and_config_from_different_saves_are_detected(tiny_checkpoint, tmp_path):
    """A crash between the two renames leaves a new banks file beside the old config: load must refuse it."""
    import shutil

    import dataclasses
    from globe.errors import ArtifactError
    result = quick_fit(tiny_checkpoint("qwen2_moe"))
    globe.save(result, tmp_path / "old")
    gate = dataclasses.replace(result.families["gate"], bank=result.families["gate"].bank * 0.5)
    other = dataclasses.replace(result, timings={"total_seconds": 123.0},        # another fit, same shapes
                                families={**result.families, "gate": gate})
    globe.save(other, tmp_path / "new")
    shutil.copyfile(tmp_path / "new" / "banks.safetensors", tmp_path / "old" / "banks.safetensors")
    with pytest.raises(ArtifactError, match="come from different fits"):
        globe.load(tmp_path / "old")
    assert globe.load(tmp_path / "new").timings["total_seconds"] == 123.0
