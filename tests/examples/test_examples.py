"""examples/*.py run on the embedded model with short settings: train -> benchmark -> export and deploy."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import globe
from tests.helpers.subproc import subprocess_env
from globe.export import is_compressed

REPO = Path(__file__).resolve().parents[2]


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = subprocess_env()
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_examples_run_in_sequence(tmp_path):
    out = run_example("train_qwen_moe.py", "--out", "art", "--m", "8", "--r", "16", "--target-support", "4",
                      "--am-iters", "2", "--varpro-steps", "5", "--device", "cpu", cwd=tmp_path)
    assert "qwen2_moe: 6 MoE layers x 16 experts" in out and "artifact written to art" in out
    result = globe.load(tmp_path / "art")
    assert result.families["gate"].shape["m"] == 8 and (tmp_path / "art" / "metrics.jsonl").is_file()

    out = run_example("benchmark_model.py", "--artifact", "art", "--max-tokens", "256", "--modes", "cached",
                      "--json", "bench.json", cwd=tmp_path)
    reports = json.loads((tmp_path / "bench.json").read_text())
    assert list(reports) == ["original", "cached"] and "routed params" in out
    assert reports["cached"]["footprint"]["routed_ratio"] < 1 == reports["original"]["footprint"]["routed_ratio"]

    out = run_example("export_and_deploy.py", "--artifact", "art", "--out", "deploy", "--new-tokens", "4",
                      cwd=tmp_path)
    gaps = [float(g) for g in re.findall(r"max logit gap ([0-9.e+-]+)", out)]
    assert len(gaps) == 2 and max(gaps) < 0.05, out                     # both exports match the patched model
    assert (tmp_path / "deploy" / "dense" / "config.json").is_file()
    assert is_compressed(tmp_path / "deploy" / "compressed")

# the recovery recipe (examples/finetune_compressed.py) runs as the README shows it: tests/docs/test_readme_recipe.py
