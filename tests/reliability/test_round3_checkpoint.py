"""Round three, class 1: the compressed checkpoint is an untrusted input. Tampered config values and tensors are
refused before any tensor is used, through load_compressed, transformers' from_pretrained and every command that
reads a compressed checkpoint: exit 2 (ArtifactError / ConfigError / CheckpointError in Python), one line naming
the file and the key or tensor, no traceback, nothing written."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import globe  # noqa: F401  (registers the quantizer)
from globe.errors import GlobeError
from tests.reliability.round3 import (WEIGHTS, Round3, assert_refused, edit_quant, edit_tensors, key_of, snapshot)

# (case id, edit of the checkpoint, what the one line must name)
QUANT_CASES = [
    ("m-huge", lambda c: edit_quant(c, "gate", "m", 10 ** 9), "families.gate.m"),
    ("r-negative", lambda c: edit_quant(c, "up", "r", -4), "families.up.r"),
    ("k-zero", lambda c: edit_quant(c, "gate", "k", 0), "families.gate.k"),
    ("m-string", lambda c: edit_quant(c, "gate", "m", "4"), "families.gate.m"),
    ("phi-unknown", lambda c: edit_quant(c, "gate", "phi", "relu6"), "families.gate.phi"),
    ("mode-unknown", lambda c: edit_quant(c, None, "mode", "turbo"), "quantization_config.mode"),
    ("cache-negative", lambda c: edit_quant(c, None, "cache_bytes", -1), "quantization_config.cache_bytes"),
    ("pairs-bool", lambda c: edit_quant(c, None, "max_gathered_pairs", True), "max_gathered_pairs"),
]


def _config(c, **changes):
    doc = json.loads((c / "config.json").read_text())
    doc.update(changes)
    (c / "config.json").write_text(json.dumps(doc))


def _drop(part):
    def edit(c):
        key = key_of(c, part)
        edit_tensors(c, lambda t: t.pop(key))
    return edit


def _reshape(part):
    def edit(c):
        key = key_of(c, part)
        edit_tensors(c, lambda t: t.__setitem__(key, torch.zeros(t[key].shape[0] + 1, *t[key].shape[1:],
                                                                   dtype=t[key].dtype)))
    return edit


def _index(value):
    def edit(c):
        key = key_of(c, "code_indices.gate")
        def change(t):
            t[key] = t[key].clone()
            t[key].view(-1)[0] = value
        edit_tensors(c, change)
    return edit


def _unknown(c):
    key = key_of(c, "bank.gate").replace("bank.gate", "bank.down")
    edit_tensors(c, lambda t: t.__setitem__(key, torch.zeros(2, 2)))


def _truncate(c):
    data = (c / WEIGHTS).read_bytes()
    (c / WEIGHTS).write_bytes(data[: len(data) - 100])


def _oversize(c):
    with (c / WEIGHTS).open("ab") as fh:
        fh.write(b"\0" * 64)


TENSOR_CASES = [
    ("tensor-missing", _drop("adapters.up"), "adapters.up"),
    ("bank-shape", _reshape("bank.gate"), "bank.gate"),
    ("index-out-of-range", _index(99), "code_indices.gate"),
    ("index-negative", _index(-1), "code_indices.gate"),
    ("unknown-globe-tensor", _unknown, "bank.down"),
    ("truncated", _truncate, WEIGHTS),
    ("oversized", _oversize, WEIGHTS),
    ("layer-count-fewer", lambda c: _config(c, num_hidden_layers=2, layer_types=["full_attention"] * 2),
     "num_hidden_layers"),
    ("layer-count-more", lambda c: _config(c, num_hidden_layers=4, layer_types=["full_attention"] * 4),
     "num_hidden_layers"),
    ("expert-count", lambda c: _config(c, num_experts=3), "expert"),
]
CASES = QUANT_CASES + TENSOR_CASES


@pytest.fixture
def env(tmp_path, round3_base) -> Round3:
    return Round3.build(tmp_path, round3_base)


@pytest.mark.parametrize("case, edit, names", CASES, ids=[c[0] for c in CASES])
def test_tampered_checkpoint_refused_by_every_command(env, capsys, case, edit, names):
    edit(env.comp)
    before = snapshot(env.tmp)
    for command, argv in env.commands().items():
        code, err = env.cli(capsys, *argv)
        assert_refused(code, err, names)
        assert str(env.comp) in err, (command, err)
        assert snapshot(env.tmp) == before, command


@pytest.mark.parametrize("case, edit, names", CASES, ids=[c[0] for c in CASES])
def test_tampered_checkpoint_refused_in_python(env, case, edit, names):
    edit(env.comp)
    before = snapshot(env.tmp)
    with pytest.raises(GlobeError, match=names.replace(".", r"\.")):
        globe.load_compressed(env.comp)
    with pytest.raises(GlobeError, match=names.replace(".", r"\.")):
        transformers.AutoModelForCausalLM.from_pretrained(env.comp)
    assert snapshot(env.tmp) == before


def test_untouched_checkpoint_loads_and_gives_the_same_logits(env):
    ids = torch.randint(3, 30, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = globe.load_compressed(env.comp)(input_ids=ids).logits
        b = transformers.AutoModelForCausalLM.from_pretrained(env.comp)(input_ids=ids).logits
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_compressed_checkpoint_where_a_source_is_expected(env, capsys):
    before = snapshot(env.tmp)
    for argv in (["fit", str(env.comp), "-o", str(env.tmp / "o")],
                 ["compress", str(env.comp), "-o", str(env.tmp / "o")]):
        code, err = env.cli(capsys, *argv)
        assert_refused(code, err, str(env.comp), "compressed checkpoint, not a source model")
        assert "incomplete" not in err
    assert snapshot(env.tmp) == before
