"""`globe sweep` and `globe eval --plots --sweep` through the real dispatcher, globe.cli.main.main."""
from __future__ import annotations

import json

import globe
import globe.cli.main as cli
from tests.helpers.fits import quick_fit

FAST = ["--budgets", "0.5", "--families", "gate", "--target-support", "2", "--am-iters", "2", "--varpro-steps", "0"]


def test_sweep_writes_the_json_eval_plots_reads(tiny_checkpoint, tmp_path, capsys):
    model = tiny_checkpoint("qwen2_moe")
    out = tmp_path / "sweep.json"
    assert cli.main(["sweep", str(model), "-o", str(out), *FAST, "--log-level", "WARNING"]) == 0
    doc = json.loads(out.read_text())
    assert doc["model"]["content_hash"] == quick_fit(model).source["content_hash"]
    assert [row["budget"] for row in doc["families"]["gate"]] == [0.5] and "up" not in doc["families"]
    assert f"--sweep {out}" in capsys.readouterr().out
    assert cli.main(["sweep", str(model), "-o", str(out), *FAST]) == 2                # no --overwrite
    assert "already exists" in capsys.readouterr().err and json.loads(out.read_text()) == doc


def test_eval_refuses_a_sweep_of_another_model_before_evaluating(tiny_checkpoint, tmp_path, capsys):
    model, other = tiny_checkpoint("qwen2_moe"), tiny_checkpoint("qwen2_moe", seed=1)
    globe.save(quick_fit(model), tmp_path / "art")
    sweep = tmp_path / "other.json"
    assert cli.main(["sweep", str(other), "-o", str(sweep), *FAST, "--log-level", "WARNING"]) == 0
    capsys.readouterr()
    code = cli.main(["eval", str(model), "--globe", str(tmp_path / "art"), "--plots", str(tmp_path / "plots"),
                     "--sweep", str(sweep), "--metrics", str(tmp_path / "m.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"globe eval: error: sweep {sweep} is of ") and len(err.splitlines()) == 1
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "plots").exists()    # nothing evaluated
