"""globe.io.model: the registry applied to loaded models; ModelShape of original, patched and on-disk models."""
from __future__ import annotations

import copy

import pytest

from globe.errors import ArtifactError
from globe.io import checkpoint_shape, experts_modules, model_shape
from globe.runtime import apply_globe
from tests.helpers.fits import exact_result
from tests.helpers.tiny_models import TINY, TINY_DENSE_LAYERS


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_shape_of_a_loaded_model_matches_its_checkpoint(arch, tiny_model, tiny_checkpoint):
    model = tiny_model(arch)
    shape, on_disk = model_shape(model), checkpoint_shape(tiny_checkpoint(arch))
    moe = [layer for layer in range(TINY.num_layers) if layer not in TINY_DENSE_LAYERS[arch]]
    assert (shape.model_type, shape.moe_layers, shape.num_experts, shape.p, shape.d) == \
        (arch, moe, TINY.num_experts, TINY.p, TINY.d)
    assert (on_disk.moe_layers, on_disk.num_experts, on_disk.p, on_disk.d) == \
        (shape.moe_layers, shape.num_experts, shape.p, shape.d)
    assert shape.factored is None and on_disk.factored is None and shape.name == "the model"
    assert list(experts_modules(model)) == moe


def test_a_patched_model_states_its_factored_families(tiny_model):
    model = tiny_model("mixtral")
    patched = apply_globe(copy.deepcopy(model), exact_result(model, ("up",)), mode="factored")
    shape = model_shape(patched)
    assert shape.factored == ("up",)
    assert (shape.num_experts, shape.p, shape.d) == (TINY.num_experts, TINY.p, TINY.d)


def test_a_module_that_is_no_experts_module_is_refused(tiny_model):
    model = copy.deepcopy(tiny_model("mixtral"))
    layer = next(iter(experts_modules(model)))
    del experts_modules(model)[layer].gate_up_proj
    with pytest.raises(ArtifactError, match="is not a fused experts module"):
        model_shape(model)
