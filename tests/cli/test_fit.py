"""`globe fit` end to end on a tiny checkpoint: outputs, refusal to overwrite, resume from a family checkpoint."""
from __future__ import annotations

import json

import torch

import globe
from globe.run.resume_store import RESUME_DIR, ResumeStore
from globe.cli.main import main

ARGS = ["--m", "4", "--r", "4", "--target-support", "2", "--am-iters", "3", "--varpro-steps", "5"]


def test_fit_writes_artifact_and_refuses_to_overwrite(tiny_checkpoint, tmp_path, capsys):
    model = tiny_checkpoint("qwen2_moe")
    out = tmp_path / "out"
    assert main(["fit", str(model), "-o", str(out), *ARGS, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"gate", "up"} and 0 < summary["gate"]["rel_err"] < 1
    assert (out / "banks.safetensors").is_file() and (out / "globe_config.json").is_file()
    assert not (out / RESUME_DIR).exists()
    assert main(["fit", str(model), "-o", str(out), *ARGS]) == 2
    assert "already holds an artifact" in capsys.readouterr().err


def test_resume_reuses_finished_families(tiny_checkpoint, tmp_path, caplog):
    model = tiny_checkpoint("qwen2_moe")
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["fit", str(model), "-o", str(ref), *ARGS]) == 0
    reference = globe.load(ref)
    # an interrupted run that finished "gate" only: its checkpoint holds gate
    from globe.cli.fit import build_config, register  # noqa: F401
    import argparse
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["fit", str(model), "-o", str(out), *ARGS])
    ResumeStore(out, build_config(args), str(model)).save_family(reference.families["gate"])
    with caplog.at_level("INFO"):
        assert main(["fit", str(model), "-o", str(out), *ARGS, "--resume"]) == 0
    assert "gate: taken from checkpoint" in caplog.text
    resumed = globe.load(out)
    for fam in ("gate", "up"):
        assert torch.equal(resumed.families[fam].bank, reference.families[fam].bank)
        assert torch.equal(resumed.families[fam].adapters, reference.families[fam].adapters)


def test_options_reach_the_fit_config():
    from globe.cli.fit import build_config
    from globe.cli.main import build_parser
    args = build_parser().parse_args(["fit", "-o", "out", *ARGS, "--precision", "bf16", "--checkpoint-every", "3",
                                      "--cycles", "2", "--seed", "7"])
    t = build_config(args).train
    assert (t.precision, t.checkpoint_every, t.cycles, t.seed, t.am_iters) == ("bf16", 3, 2, 7, 3)


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    model = tiny_checkpoint("qwen2_moe")
    out = tmp_path / "out"
    assert main(["fit", str(model), "-o", str(out), *ARGS, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [f["family"] for f in plan["families"]] == ["gate", "up"]
    assert plan["families"][0]["m"] == 4 and plan["families"][0]["memory"]["peak"] > 0
    assert plan["rates"]["wd"] > 0 and plan["rates"]["svd"] > 0 and not out.exists()      # kernels timed
    assert main(["fit", str(model), "-o", str(out), *ARGS, "--dry-run"]) == 0
    assert "predicted" not in capsys.readouterr().err and not out.exists()


def test_compress_dry_run_plans_the_cut_and_writes_nothing(tmp_path, capsys):
    """`globe compress --dry-run --total-cut C` (embedded model) plans the fit at the budget the cut implies and
    writes nothing."""
    out = tmp_path / "small"
    assert main(["compress", "-o", str(out), "--total-cut", "0.25", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "stored params" in text and "peak" in text and not out.exists()
