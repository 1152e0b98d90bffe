"""Round three, class 1, for a quantized compressed checkpoint: its packed tensors (codes / scales / zeros of the
bank and adapters) and their quantization_config records are checked like every other GloBE tensor. A tampered
one is refused before any tensor is used, through load_compressed, from_pretrained and `globe info`: one line
naming the tensor or key, exit 2, nothing written."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

import globe  # noqa: F401  (registers the quantizer)
from globe.cli.main import main
from globe.errors import GlobeError
from tests.reliability.battery import QUICK
from tests.reliability.round3 import Round3, assert_refused, edit_tensors, key_of, snapshot

PACKED = ["--bits", "4", "--quant-group", "8", "--quant-method", "rtn"]


def _quant(family: str, change):
    def edit(c):
        path = c / "config.json"
        doc = json.loads(path.read_text())
        change(doc["quantization_config"]["families"][family])
        path.write_text(json.dumps(doc))
    return edit


def _version(c, value):
    path = c / "config.json"
    doc = json.loads(path.read_text())
    doc["quantization_config"]["format_version"] = value
    path.write_text(json.dumps(doc))


def _set(part: str, key: str, value):
    return lambda q: q["quant"][part].__setitem__(key, value)


def _tensor(part: str, change):
    def edit(c):
        key = key_of(c, part)
        edit_tensors(c, lambda t: t.__setitem__(key, change(t[key])))
    return edit


def _drop(part: str):
    def edit(c):
        key = key_of(c, part)
        edit_tensors(c, lambda t: t.pop(key))
    return edit


def _float_copy(c):
    """A float `bank.gate` beside the packed one: an unknown GloBE tensor for a packed family."""
    key = key_of(c, "bank.gate.codes").removesuffix(".codes")
    edit_tensors(c, lambda t: t.__setitem__(key, torch.zeros(2, 2)))


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# (case id, edit of the checkpoint, what the one line must name)
CASES = [
    ("codes-short", _tensor("adapters.gate.codes", lambda t: t[:-1].clone()), "adapters.gate.codes"),
    ("codes-int8", _tensor("bank.up.codes", lambda t: t.to(torch.int8)), "bank.up.codes"),
    ("scales-shape", _tensor("adapters.up.scales", lambda t: torch.cat([t, t], -1)), "adapters.up.scales"),
    ("scales-bf16", _tensor("bank.gate.scales", lambda t: t.to(torch.bfloat16)), "bank.gate.scales"),
    ("zeros-missing", _drop("adapters.gate.zeros"), "adapters.gate.zeros"),
    ("scales-nan", _tensor("bank.gate.scales", _nan), "bank.gate.scales"),
    ("float-copy", _float_copy, "bank.gate"),
    ("bits-5", _quant("gate", _set("bank", "bits", 5)), "families.gate.quant.bank.bits"),
    ("group-string", _quant("up", _set("adapters", "group", "8")), "families.up.quant.adapters.group"),
    ("group-changed", _quant("up", _set("bank", "group", 4)), "bank.up.scales"),
    ("part-unknown", _quant("gate", lambda q: q["quant"].__setitem__("codes", {"bits": 4, "group": 8})),
     "families.gate.quant"),
    ("record-removed", _quant("gate", lambda q: q.pop("quant")), "adapters.gate"),
    ("version-2", lambda c: _version(c, 2), "quantization_config.format_version"),
]


@pytest.fixture(scope="module")
def packed_base(round3_base, tmp_path_factory):
    """base/model (as round three's) and base/comp: its compressed checkpoint with 4-bit packed factors."""
    base = tmp_path_factory.mktemp("round3-packed")
    shutil.copytree(round3_base / "model", base / "model")
    assert main(["--log-level", "ERROR", "compress", str(base / "model"), "-o", str(base / "comp"), *QUICK,
                 *PACKED, "--expert-steps", "0"]) == 0
    return base


@pytest.fixture
def env(tmp_path, packed_base) -> Round3:
    return Round3.build(tmp_path, packed_base)


def test_the_base_checkpoint_is_packed_and_loads(env):
    quant = json.loads((env.comp / "config.json").read_text())["quantization_config"]
    assert quant["format_version"] == 3 and quant["families"]["gate"]["quant"]["adapters"]["bits"] == 4
    ids = torch.randint(3, 30, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = globe.load_compressed(env.comp)(input_ids=ids).logits
        b = transformers.AutoModelForCausalLM.from_pretrained(env.comp)(input_ids=ids).logits
    assert torch.equal(a, b) and torch.isfinite(a).all()


@pytest.mark.parametrize("case, edit, names", CASES, ids=[c[0] for c in CASES])
def test_tampered_packed_checkpoint_refused(env, capsys, case, edit, names):
    edit(env.comp)
    before = snapshot(env.tmp)
    pattern = names.replace(".", r"\.")
    with pytest.raises(GlobeError, match=pattern):
        globe.load_compressed(env.comp)
    with pytest.raises(GlobeError, match=pattern):
        transformers.AutoModelForCausalLM.from_pretrained(env.comp)
    if case != "scales-nan":             # a NaN is found by the load (globe info reads headers and the hash)
        code, err = env.cli(capsys, "info", str(env.comp))
        assert_refused(code, err, names)
    assert snapshot(env.tmp) == before
