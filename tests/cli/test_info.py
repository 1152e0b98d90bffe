"""Tests of `globe info` through the real dispatcher, globe.cli.main.main."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import globe.assets
import globe.cli.main as cli
from globe.io import open_checkpoint


@pytest.fixture(autouse=True)
def _only_available_subcommands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Colleagues' subcommands may not exist yet; the dispatcher is tested with the ones that do."""
    present = tuple(n for n in cli.SUBCOMMANDS if importlib.util.find_spec(f"globe.cli.{n}") is not None)
    monkeypatch.setattr(cli, "SUBCOMMANDS", present)


def test_info_text(tiny_checkpoint, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_checkpoint("deepseek_v3", dtype=torch.bfloat16)
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "DeepSeek-V3 (model_type deepseek_v3)" in out
    assert "3: 2 MoE [1-2], 1 dense [0]" in out
    assert "4 per MoE layer (8 in all), top-k 2" in out
    assert "p=8 (intermediate) x d=24 (hidden)" in out
    assert "per_expert layout, bfloat16, 1 shard(s)" in out
    inv = open_checkpoint(path).inventory()
    share = 100 * inv.params["gate"] / inv.total_params
    assert any(line.split()[:2] == ["gate", f"{inv.params['gate']:,}"] and f"{share:6.2f} %" in line
               for line in out.splitlines())
    for group in ("shared_experts", "routers", "dense_mlps", "other"):
        assert f"  {group} " in out


def test_info_json(tiny_checkpoint, capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_checkpoint("mixtral", layout="fused", shards=2)
    assert cli.main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == open_checkpoint(path).inventory().to_dict()
    assert data["layout"] == "fused" and data["model_type"] == "mixtral" and len(data["shards"]) == 2


def test_info_default_model_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(globe.assets, "DEFAULT_MODEL_DIR", tmp_path / "not-trained-yet")
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("globe info: error: the embedded default model") and "pass MODEL_DIR" in err
    assert len(err.splitlines()) == 1


def test_info_default_model_used(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(globe.assets, "DEFAULT_MODEL_DIR", tiny_checkpoint("olmoe"))
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "olmoe"


def test_info_bad_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cli.main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("globe info: error: model_type 'llama' is not supported") and "\n" not in err


def test_info_of_a_compressed_checkpoint(tiny_checkpoint, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from globe.export import save_compressed
    from tests.helpers.fits import quick_fit
    path = tiny_checkpoint("qwen2_moe")
    result = quick_fit(path)
    out = save_compressed(path, result, tmp_path / "c")
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GloBE compressed checkpoint" in text and f"made from    {path}" in text and "family gate" in text
    assert cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    saved = sum(result.params[f"dense_{f}"] - result.params[f] for f in result.families)
    assert info["total_params_before"] - info["total_params_after"] == saved
    assert info["families"]["up"]["m"] == result.families["up"].shape["m"]
