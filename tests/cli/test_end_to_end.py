"""The `globe` console script end to end on the embedded model, as a user runs it: info -> fit -> export -> eval."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers.subproc import subprocess_env
from globe.export import is_compressed


REPO = Path(__file__).resolve().parents[2]


def globe_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed `globe` script (or `python -m globe.cli.main` when it is not on PATH)."""
    script = shutil.which("globe", path=os.path.dirname(sys.executable)) or shutil.which("globe")
    cmd = [script] if script else [sys.executable, "-m", "globe.cli.main"]
    env = subprocess_env()
    proc = subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"globe {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_info_fit_export_eval(tmp_path):
    info = json.loads(globe_cli("info", "--json", cwd=tmp_path).stdout)
    assert info["model_type"] == "qwen2_moe" and info["num_experts"] == 16

    fit = globe_cli("fit", "-o", "art", "--m", "8", "--r", "16", "--target-support", "4", "--am-iters", "2",
                    "--varpro-steps", "5", "--json", "--log-level", "WARNING", cwd=tmp_path)
    summary = json.loads(fit.stdout)
    assert set(summary) == {"gate", "up"} and all(0 < row["rel_err"] < 1 for row in summary.values())
    assert {"am_iter", "varpro", "family_done"} <= {json.loads(l)["event"] for l in
                                                    (tmp_path / "art" / "metrics.jsonl").read_text().splitlines()}

    export = globe_cli("export", "art", "-o", "compressed", cwd=tmp_path)
    assert "compressed checkpoint written" in export.stdout
    assert is_compressed(tmp_path / "compressed")                      # config.json: quant_method "globe"

    report = json.loads(globe_cli("eval", "compressed", "--max-tokens", "512", "--max-length", "128",
                                  "--prefill-tokens", "32", "--decode-tokens", "4", "--repeats", "1",
                                  "--hit-tokens", "32", "--plots", "plots", "--metrics", "eval.jsonl", "--json",
                                  cwd=tmp_path).stdout)
    expected = (summary["gate"]["params_ratio"] + summary["up"]["params_ratio"] + 1) / 3     # down stays dense
    assert report["model"]["globe_mode"] == "cached"
    assert report["footprint"]["routed_ratio"] == pytest.approx(expected, rel=0.02)
    assert 1 < report["perplexity"]["perplexity"] < 4096 and report["speed"]["decode_tok_s"] > 0
    assert {Path(p).name for p in report["plots"]} == {"per_layer_error.png", "support_hist.png",   # no sweep:
                                                       "atom_popularity.png", "am_history.png"}  # no error_vs_budget
    assert all((tmp_path / p).is_file() or Path(p).is_file() for p in report["plots"])
    evals = [json.loads(l) for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["event"] for e in evals] == ["eval"]
    assert evals[0]["perplexity"]["perplexity"] == pytest.approx(report["perplexity"]["perplexity"])


def test_help_lists_every_command_and_option(capsys):
    from globe.cli.main import main

    def help_of(*args: str) -> str:
        with pytest.raises(SystemExit):
            main([*args, "--help"])
        return capsys.readouterr().out
    top = help_of()
    for command in ("info", "fit", "export", "apply", "eval", "bench", "sweep"):
        assert command in top
    fit = help_of("fit")
    for option in ("--budget", "--m", "--r", "--device", "--wandb", "--metrics", "--resume", "--log-level"):
        assert option in fit
    assert "--plots" in help_of("eval") and "--dense" in help_of("apply") and "--modes" in help_of("bench")
    assert "--budgets" in help_of("sweep")
