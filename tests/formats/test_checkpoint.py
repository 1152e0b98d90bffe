"""globe.formats.checkpoint: the one definition of the compressed checkpoint's state keys, shapes and
`quantization_config`, checked against what a patched model really holds and writes."""
from __future__ import annotations

import copy

import pytest
import torch

from globe.errors import ArtifactError
from globe.formats.checkpoint import (FORMAT_VERSION, check_quant, dense_key, family_shapes, is_globe_state,
                                      quant_document, state_key)
from globe.io.model import model_arch
from globe.runtime import apply_globe, globe_modules
from tests.helpers.fits import exact_result
from tests.helpers.tiny_models import TINY


def test_state_keys_and_shapes_are_those_of_a_patched_model(tiny_model):
    model = tiny_model("qwen2_moe")
    patched = apply_globe(copy.deepcopy(model), exact_result(model, ("gate", "down")), mode="factored")
    spec, _ = model_arch(patched)
    quant = patched.config.quantization_config
    layer, module = next(iter(globe_modules(patched).items()))
    prefix = spec.experts_path(layer)
    state = {k: v for k, v in patched.state_dict().items() if k.startswith(prefix + ".")}
    want = {state_key(kind, f, prefix): shape for f, info in quant["families"].items()
            for kind, shape in family_shapes(f, info, TINY.num_experts, TINY.p, TINY.d).items()}
    want[dense_key("up", prefix)] = (TINY.num_experts, TINY.p, TINY.d)           # the untouched projection
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    assert all(is_globe_state(k[len(prefix) + 1:]) for k in want if k != dense_key("up", prefix))
    assert not is_globe_state(dense_key("up"))
    assert quant["format_version"] == 2 == FORMAT_VERSION - 1 and quant["quant_method"] == "globe"   # the lowest that
    # holds it: uniform ranks, nothing packed (3 adds ranks per layer and packed parts)
    assert quant["families"]["down"]["r"] == module.bank["down"].shape[1]        # shapes read from the tensors


def test_quant_document_keeps_extra_keys_but_never_lets_them_override():
    doc = quant_document({"gate": {"m": 4, "r": 2, "k": 1}}, "cached", None, 16, torch.bfloat16, "float32",
                         extra={"mode": "dense", "note": 1})
    assert doc["mode"] == "cached" and doc["note"] == 1 and doc["factor_dtype"] == "bfloat16"
    assert doc["model_dtype"] == "float32"


@pytest.mark.parametrize("version, mode, families, match", [
    (FORMAT_VERSION + 1, "cached", {"gate": {"m": 1, "r": 1, "k": 1}}, "upgrade globe"),
    (1, "cached", {"gate": {"m": 1, "r": 1, "k": 1}}, "format_version 1"),
    (FORMAT_VERSION, "fast", {"gate": {"m": 1, "r": 1, "k": 1}}, "mode must be one of"),
    (FORMAT_VERSION, "cached", {"gate": {"m": 1, "r": 1}}, "missing \\['gate.k'\\]"),
    (FORMAT_VERSION, "cached", {"w1": {"m": 1, "r": 1, "k": 1}}, "must map a subset"),
])
def test_check_quant_refuses_what_cannot_be_read(version, mode, families, match):
    with pytest.raises(ArtifactError, match=match):
        check_quant(version, mode, families)
    check_quant(FORMAT_VERSION, "cached", {"gate": {"m": 1, "r": 1, "k": 1}})


def test_state_key_refuses_unknown_kinds():
    assert state_key("bank", "gate") == "bank.gate" and state_key("adapters", "up", "a.b") == "a.b.adapters.up"
    with pytest.raises(ValueError, match="unknown GloBE state kind"):
        state_key("banks", "gate")
