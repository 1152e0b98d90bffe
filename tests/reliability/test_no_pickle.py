"""No pickle anywhere: the code never calls torch.load/pickle on user files, and the whole user path (read a
checkpoint, fit, save and load the artifact, export, reload, apply) runs with torch.load and pickle disabled."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

import globe
from globe.export import export_dense, load_compressed, load_model, save_compressed
from globe.runtime import apply_globe
from tests.helpers.fits import quick_fit

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = re.compile(r"\btorch\.load\(|\bpickle\.(load|loads|dump|dumps|Unpickler)\b|^\s*import pickle|"
                       r"^\s*from pickle import|allow_pickle\s*=\s*True|weights_only\s*=\s*False")


def test_source_tree_has_no_pickle_calls():
    offenders = []
    for folder in ("globe", "scripts", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if FORBIDDEN.search(line.split("#")[0]):
                    offenders.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_user_path_runs_with_pickle_disabled(tiny_checkpoint, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle-based loading was called")
    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, refuse)
    model_dir = tiny_checkpoint("qwen2_moe")
    result = quick_fit(model_dir)
    globe.save(result, tmp_path / "art")
    loaded = globe.load(tmp_path / "art")
    save_compressed(model_dir, loaded, tmp_path / "compressed")
    model = load_compressed(tmp_path / "compressed")
    export_dense(model_dir, loaded, tmp_path / "dense")
    dense = load_model(tmp_path / "dense")
    original = load_model(model_dir)
    apply_globe(original, loaded, mode="cached")
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all() and torch.isfinite(dense(ids).logits).all()
        assert torch.allclose(original(ids).logits, model(ids).logits, atol=1e-5)
