"""A directory without config.json: the error says what it is (artifact, hub cache root) and what to pass."""
from __future__ import annotations

import pytest

from globe.errors import ModelDirError
from globe.export import load_model
from globe.io import open_checkpoint


def test_an_artifact_directory_points_to_globe(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "banks.safetensors").write_bytes(b"")
    for open_ in (open_checkpoint, load_model):
        with pytest.raises(ModelDirError, match="is a GloBE artifact, not a model: .* --globe"):
            open_(tmp_path / "art")


def test_a_hub_cache_root_points_to_its_snapshot(tmp_path):
    root = tmp_path / "models--org--name"
    (root / "snapshots" / "abc123").mkdir(parents=True)
    with pytest.raises(ModelDirError, match=r"cache root.*snapshots/abc123 or the hub id org/name"):
        open_checkpoint(root)


def test_any_other_directory_keeps_the_plain_message(tmp_path):
    with pytest.raises(ModelDirError, match="no config.json in"):
        open_checkpoint(tmp_path)
