"""GlobeConfig / GlobeHfQuantizer: registered with transformers on import, JSON round trip, bad configs refused."""
from __future__ import annotations

import pytest
from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

import globe  # noqa: F401  (registers the quantizer)
from globe.errors import ArtifactError
from globe.export import GlobeConfig, GlobeHfQuantizer

FAMILIES = {"gate": {"m": 8, "r": 16, "k": 4, "phi": "identity"}, "up": {"m": 8, "r": 16, "k": 5, "phi": "identity"}}


def test_registered_and_round_trips_through_json():
    config = GlobeConfig(families=FAMILIES, mode="dense", cache_bytes=1024, model_dtype="bfloat16")
    doc = config.to_dict()
    assert doc["quant_method"] == "globe" and doc["format_version"] == 2
    again = AutoQuantizationConfig.from_dict(doc)
    assert isinstance(again, GlobeConfig) and again.to_dict() == doc
    assert isinstance(AutoHfQuantizer.from_config(again, pre_quantized=True), GlobeHfQuantizer)


def test_fitting_through_from_pretrained_is_refused():
    with pytest.raises(ValueError, match="pre-quantized"):
        GlobeHfQuantizer(GlobeConfig(families=FAMILIES), pre_quantized=False)


@pytest.mark.parametrize("change, message", [({"mode": "fast"}, "mode must be one of"),
                                             ({"families": {"gate": {"m": 8}}}, "missing"),
                                             ({"families": {"w9": FAMILIES["gate"]}}, "subset of"),
                                             ({"format_version": 1}, "format_version 1")])
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ArtifactError, match=message):
        GlobeConfig(**{"families": FAMILIES, **change})


@pytest.mark.parametrize("order", ["import globe, sys; assert 'transformers' not in sys.modules; import transformers",
                                   "import transformers; import globe"])
def test_import_globe_registers_in_either_order_without_importing_transformers(order):
    import subprocess
    import sys
    from tests.helpers.subproc import subprocess_env
    code = order + "; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; assert 'globe' in M"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
