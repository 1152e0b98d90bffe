"""globe.formats.sweep: the sweep document's version is checked on reading."""
from __future__ import annotations

import json

import pytest

from globe.errors import ArtifactError
from globe.formats.sweep import FORMAT_VERSION, new_document, read_sweep, write_sweep


def test_a_sweep_round_trips_and_a_newer_version_is_refused(tmp_path):
    doc = new_document(tmp_path / "model", "abc", {"budgets": [0.5]})
    doc["families"]["gate"] = [{"budget": 0.5}]
    write_sweep(tmp_path / "s.json", doc)
    assert read_sweep(tmp_path / "s.json") == doc and doc["format_version"] == FORMAT_VERSION
    assert doc["model"]["name"] == "model" and doc["model"]["content_hash"] == "abc"
    (tmp_path / "old.json").write_text(json.dumps({"families": {}}))                # no version: version 1
    assert read_sweep(tmp_path / "old.json") == {"families": {}}
    (tmp_path / "new.json").write_text(json.dumps({**doc, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError, match="upgrade globe"):
        read_sweep(tmp_path / "new.json")
