"""Round three, class 2 (integrity) and 3 (no remote code).

The compressed checkpoint records the content hash of its own tensors: a changed tensor (finite, right shape:
nothing else would notice) is refused with one line unless --force; a checkpoint without the hash (an older
globe) loads with an INFO line. `globe bench` on a compressed checkpoint checks the source it compares against.
A checkpoint (compressed or source) whose config.json asks for custom code is refused, nothing run, no prompt."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

import globe
from globe.errors import ArtifactError, GlobeError
from tests.reliability.battery import EVAL
from tests.reliability.round3 import Round3, assert_refused, edit_tensors, key_of, snapshot


@pytest.fixture
def env(tmp_path, round3_base) -> Round3:
    return Round3.build(tmp_path, round3_base)


def _nudge(env: Round3, part: str = "adapters.up") -> None:
    key = key_of(env.comp, part)
    def change(t):
        t[key] = t[key].clone()
        if t[key].dtype.is_floating_point:
            t[key].view(-1)[0] += 0.01
        else:                                            # packed integer codes (a quantized checkpoint)
            t[key].view(-1)[0] ^= 1
    edit_tensors(env.comp, change)


@pytest.mark.parametrize("part", ["adapters.up", "self_attn.q_proj.weight", "embed_tokens"])
def test_changed_tensor_refused_by_every_command_unless_force(env, capsys, part):
    _nudge(env, part)
    before = snapshot(env.tmp)
    for command, argv in env.commands().items():
        code, err = env.cli(capsys, *argv)
        assert_refused(code, err, str(env.comp), "content hash", "--force")
    assert snapshot(env.tmp) == before
    with pytest.raises(ArtifactError, match="content hash"):
        globe.load_compressed(env.comp)
    with pytest.raises(ArtifactError, match="content hash"):
        transformers.AutoModelForCausalLM.from_pretrained(env.comp)
    code, err = env.cli(capsys, *env.commands()["eval"], "--force")
    assert code == 0, err
    assert globe.load_compressed(env.comp, force=True) is not None


def test_checkpoint_without_hash_loads_with_info(env, caplog):
    path = env.comp / "globe_config.json"
    doc = json.loads(path.read_text())
    del doc["checkpoint_hash"]
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.INFO, logger="globe"):
        model = globe.load_compressed(env.comp)
    assert model is not None
    assert any("records no content hash" in r.getMessage() for r in caplog.records)


def test_bench_refuses_a_replaced_source(env, capsys, bench_in_process):
    key = key_of(env.model, "experts.0.gate_proj")
    def change(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] += 0.5
    edit_tensors(env.model, change)                     # the source the checkpoint records, changed in place
    before = snapshot(env.tmp)
    argv = ["bench", str(env.comp), "--modes", "factored", "--text", str(env.text), *EVAL]
    code, err = env.cli(capsys, *argv)
    assert_refused(code, err, str(env.model), "content hash", "--force")
    assert snapshot(env.tmp) == before
    code, err = env.cli(capsys, *argv, "--force")
    assert code == 0, err


def _plant_remote_code(directory) -> None:
    (directory / "custom_model.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n")
    doc = json.loads((directory / "config.json").read_text())
    doc["auto_map"] = {"AutoConfig": "custom_model.Cfg", "AutoModelForCausalLM": "custom_model.Model"}
    (directory / "config.json").write_text(json.dumps(doc))


def test_remote_code_in_a_compressed_checkpoint_is_refused(env, capsys, monkeypatch):
    _plant_remote_code(env.comp)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("prompted"))
    before = snapshot(env.tmp)
    for command, argv in env.commands().items():
        code, err = env.cli(capsys, *argv)
        assert_refused(code, err, "config.json", "custom code")
    with pytest.raises(GlobeError, match="custom code"):
        globe.load_compressed(env.comp)
    assert not (env.comp / "RAN").exists()
    assert snapshot(env.tmp) == before


def test_remote_code_in_a_source_model_is_refused(env, capsys, monkeypatch):
    _plant_remote_code(env.model)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("prompted"))
    before = snapshot(env.tmp)
    for argv in (["compress", str(env.model), "-o", str(env.tmp / "o")],
                 ["fit", str(env.model), "-o", str(env.tmp / "o")],
                 ["eval", str(env.model), "--text", str(env.text), *EVAL]):
        code, err = env.cli(capsys, *argv)
        assert_refused(code, err, "config.json", "custom code")
    assert not (env.model / "RAN").exists()
    assert snapshot(env.tmp) == before
