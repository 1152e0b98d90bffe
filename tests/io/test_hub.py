"""globe.io.hub: local paths pass through; hub ids download, or fail with one clear line without a network."""
from __future__ import annotations

import sys
import types

import pytest

from globe.cli.main import main
from globe.errors import ModelDirError
from globe.io.hub import looks_like_hub_id, resolve_model_dir


def _fake_hub(monkeypatch, download):
    fake = types.ModuleType("huggingface_hub")
    fake.snapshot_download = download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)


def test_local_paths_are_returned_unchanged(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, lambda **kw: pytest.fail("no download for a local directory"))
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("org/name") == tmp_path.joinpath("org", "name").relative_to(tmp_path)
    assert resolve_model_dir(str(tmp_path / "missing")) == tmp_path / "missing"     # absolute: not a hub id
    assert looks_like_hub_id("Qwen/Qwen1.5-MoE-A2.7B") and not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id("../x") and not looks_like_hub_id("/abs/x")


def test_hub_id_downloads_safetensors_and_json_only(tmp_path, monkeypatch):
    seen = {}

    def download(repo_id, revision=None, allow_patterns=None):
        seen.update(repo_id=repo_id, patterns=allow_patterns)
        return str(tmp_path)
    _fake_hub(monkeypatch, download)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("org/model") == tmp_path
    assert seen["repo_id"] == "org/model" and "*.safetensors" in seen["patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in seen["patterns"])


def test_no_network_is_one_clear_line(tmp_path, monkeypatch, capsys):
    def offline(**kwargs):
        raise OSError("Temporary failure in name resolution")
    _fake_hub(monkeypatch, offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelDirError, match="not a local directory and could not be downloaded from the hub"):
        resolve_model_dir("org/model")
    assert main(["info", "org/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("globe info: error: org/model is not a local directory") and "\n" not in err
    assert "pass a local checkpoint directory" in err
